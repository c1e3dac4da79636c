"""A store written by the release before the log (schema version 2, tests/fixtures/
store-v2.db, made by commit 6993456's store: see tests/fixtures/make_store_v2.py) is upgraded
on first start: a copy is kept beside it as `edge-broker.db.pre-v2`, and the queued messages,
the session and the retained message are all still there."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from edge_broker.config import StreamConfig
from tests.conftest import BrokerThread, broker_config
from tests.integration.test_paho import V311, Paho

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-v2.db"


def test_a_version_2_store_is_upgraded_with_a_copy_kept(make_broker: Callable[..., BrokerThread],
                                                        tmp_path: Path) -> None:
    config = dataclasses.replace(broker_config(tmp_path),
                                 streams=(StreamConfig("telemetry", "sensors/#"),))
    data_dir = Path(config.broker.data_dir)
    data_dir.mkdir(parents=True)
    shutil.copyfile(FIXTURE, data_dir / "edge-broker.db")
    broker = make_broker(config=config)

    copy = data_dir / "edge-broker.db.pre-v2"
    with sqlite3.connect(copy) as conn:  # the file as it was: version 2, three queued
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (3,)
    device = Paho(broker, V311, "dev1", clean=False)
    try:
        assert device.connect()[0] is True  # session present
        got = [device.expect() for _ in range(3)]
        assert [(m.topic, m.payload) for m in got] == [
            ("cmd/1", b"queued-1"), ("cmd/2", b"queued-2"), ("cmd/3", b"queued-3")]
        viewer = Paho(broker, V311, "viewer")
        try:
            viewer.connect()
            viewer.subscribe("cmd/state", 0)
            assert viewer.expect().payload == b"on"  # the retained message survived
            viewer.publish("sensors/1", b"first", qos=1)
            assert viewer.subscribe("$stream/telemetry@earliest", 0) == [0]
            message = viewer.expect()
            assert (message.topic, message.payload) == ("sensors/1", b"first")
        finally:
            viewer.disconnect()
    finally:
        device.disconnect()
    with sqlite3.connect(data_dir / "edge-broker.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (6,)
        assert conn.execute("SELECT offset FROM log").fetchall() == [(1,)]
