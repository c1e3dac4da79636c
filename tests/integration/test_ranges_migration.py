"""A store written by the release before the ranges an UNSUBSCRIBE leaves in a session's
backlog were stored (schema version 5, tests/fixtures/store-v5.db, made by commit 34f8a2b's
store: see tests/fixtures/make_store_v5.py) is upgraded on first start: a copy is kept beside
it as `edge-broker.db.pre-v5`; the backlog of its offline session is delivered (the range
version 5 did not store is lost, as it was at any restart of that release); and on the
upgraded file the range an UNSUBSCRIBE leaves survives a restart and is forgotten once
read."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from edge_broker.mqtt.packets import Publish
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import PUBACK, connect

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-v5.db"


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


def test_a_version_5_store_is_upgraded_and_keeps_unsubscribed_ranges(
        make_broker: Callable[..., BrokerThread], tmp_path: Path) -> None:
    config = broker_config(tmp_path, max_inflight_messages=2)
    data_dir = Path(config.broker.data_dir)
    data_dir.mkdir(parents=True)
    db = data_dir / "edge-broker.db"
    shutil.copyfile(FIXTURE, db)
    assert _rows(db, "PRAGMA user_version") == [(5,)]
    broker = make_broker(config=config)
    assert _rows(data_dir / "edge-broker.db.pre-v5", "PRAGMA user_version") == [(5,)]
    assert _rows(db, "PRAGMA user_version") == [(6,)]
    assert _rows(db, "SELECT count(*) FROM log_reader_ranges") == [(0,)]

    device = connect(broker.port, "dev1", version=4, clean=False)
    assert device.connack is not None and device.connack.session_present
    assert [device.expect_publish().payload for _ in range(2)] == [b"m0", b"m1"]
    device.unsubscribe("t/#")  # m2 and m3 are still queued (in the backlog)
    device.disconnect()
    broker.stop()
    assert _rows(db, "SELECT reader, filter, since, until, qos FROM log_reader_ranges") == [
        ("session:dev1", "t/#", 0, 5, 1)]

    broker = make_broker(config=config)
    device = connect(broker.port, "dev1", version=4, clean=False)
    resent = [device.expect_publish() for _ in range(2)]
    assert [(p.payload, p.dup) for p in resent] == [(b"m0", True), (b"m1", True)]
    for packet in resent:
        assert packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    got = [device.read(10.0) for _ in range(2)]
    assert [p.payload for p in got if isinstance(p, Publish)] == [b"m2", b"m3"], got
    for packet in got:
        assert isinstance(packet, Publish) and packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    device.ping()
    device.disconnect()
    broker.stop()
    assert _rows(db, "SELECT count(*) FROM log_reader_ranges") == [(0,)]  # read: forgotten
