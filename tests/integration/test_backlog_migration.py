"""A store written by the release before sessions' backlogs became log readers (schema
version 3, tests/fixtures/store-v3.db, made by commit aa26eeb's store: see tests/fixtures/
make_store_v3.py) is upgraded on first start: a copy is kept beside it as
`edge-broker.db.pre-v3`; the queued delivery rows stay on their path and are delivered first,
the in-flight QoS 2 delivery is finished, and what is published afterwards while the sessions
are offline goes to the log (no delivery rows), across a restart too."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from edge_broker.config import StreamConfig
from tests.conftest import BrokerThread, broker_config
from tests.integration.test_paho import V5, V311, Paho

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-v3.db"


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def test_a_version_3_store_is_upgraded_with_its_queued_messages(
        make_broker: Callable[..., BrokerThread], tmp_path: Path) -> None:
    config = dataclasses.replace(broker_config(tmp_path),
                                 streams=(StreamConfig("telemetry", "sensors/#"),))
    data_dir = Path(config.broker.data_dir)
    data_dir.mkdir(parents=True)
    db = data_dir / "edge-broker.db"
    shutil.copyfile(FIXTURE, db)
    broker = make_broker(config=config)
    copy = data_dir / "edge-broker.db.pre-v3"
    assert _rows(copy, "PRAGMA user_version") == [(3,)]
    assert _rows(copy, "SELECT count(*) FROM deliveries") == [(5,)]
    assert _rows(db, "PRAGMA user_version") == [(6,)]

    publisher = Paho(broker, V5, "app")
    publisher.connect()
    for n in range(4, 7):  # while both sessions are offline: into the log, once each
        publisher.publish(f"cmd/{n}", f"logged-{n}".encode(), qos=1)
    assert _rows(db, "SELECT count(*) FROM log") == [(4,)]  # sensors/1 and these three
    assert _rows(db, "SELECT count(*) FROM deliveries") == [(5,)]  # the old ones only
    broker.stop()
    broker = make_broker(config=config)

    dev1 = Paho(broker, V311, "dev1", clean=False)
    try:
        assert dev1.connect()[0] is True
        got = [dev1.expect().payload for _ in range(6)]
        assert got == [b"queued-1", b"queued-2", b"queued-3",
                       b"logged-4", b"logged-5", b"logged-6"]
    finally:
        dev1.disconnect()
    dev2 = Paho(broker, V5, "dev2", clean=False, session_expiry=86400)
    try:
        assert dev2.connect()[0] is True
        got = {dev2.expect().payload for _ in range(4)}
        assert got == {b"queued-9", b"logged-4", b"logged-5", b"logged-6"}
        publisher = Paho(broker, V5, "app")
        publisher.connect()
        assert dev2.drain_until_marker(publisher) == []  # nothing twice, nothing more
        publisher.disconnect()
    finally:
        dev2.disconnect()
    viewer = Paho(broker, V5, "viewer")
    try:
        viewer.connect()
        assert viewer.subscribe("$stream/telemetry@earliest", 0) == [0]
        message = viewer.expect()
        assert (message.topic, message.payload) == ("sensors/1", b"first")
    finally:
        viewer.disconnect()
