"""A store written by the release before sessions' usernames were stored (schema version 4,
tests/fixtures/store-v4.db, made by commit 315ad77's store: see tests/fixtures/
make_store_v4.py) is upgraded on first start: a copy is kept beside it as
`edge-broker.db.pre-v4`; its sessions are anonymous (NULL: nobody knows who they were), so the
will of one that is due is authorised as an anonymous client [MQTT-3.1.2-8] (5.0) and the
ACL refuses it; the backlog of an offline session (a reader of the log, version 4) is still
delivered; and the next connection stores its username."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from edge_broker.core.changes import EXPIRY_NEVER
from edge_broker.store.sqlite.readonly import read_session, read_sessions
from tests.conftest import BrokerThread
from tests.integration.authsetup import auth_config
from tests.integration.rawclient import PUBACK, connect, props

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-v4.db"
ACL = """\
user alice
topic readwrite cmd/#
topic write alarms/#

user ops
topic readwrite #
"""
PASSWORDS = {"alice": "alice-pw", "ops": "ops-pw"}


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


def _denied_wills(broker: BrokerThread) -> int:
    app = broker.app
    assert app is not None
    return int(broker.call(lambda: app.metrics.acl_denied["will"]))


def test_a_version_4_store_is_upgraded_with_anonymous_sessions(
        make_broker: Callable[..., BrokerThread], tmp_path: Path) -> None:
    config = auth_config(tmp_path, users=PASSWORDS, acl=ACL, allow_anonymous=True)
    data_dir = Path(config.broker.data_dir)
    data_dir.mkdir(parents=True)
    db = data_dir / "edge-broker.db"
    shutil.copyfile(FIXTURE, db)
    # The read-only access (`edge-broker store ...` without a broker) reads it as it is.
    detail = asyncio.run(read_session(db, "dev1"))
    assert detail is not None and detail.record.username is None
    assert detail.record.will is not None and detail.record.will.topic == "alarms/dev1"
    assert [(s.client_id, s.queued_messages) for s in asyncio.run(read_sessions(db))] == [
        ("dev1", 2), ("ops1", 0)]
    assert _rows(db, "PRAGMA user_version") == [(4,)]
    broker = make_broker(config=config)

    copy = data_dir / "edge-broker.db.pre-v4"
    assert _rows(copy, "PRAGMA user_version") == [(4,)]
    assert _rows(db, "PRAGMA user_version") == [(6,)]
    # dev1's will was due at start: its session has no username (NULL), so it is checked as
    # an anonymous client's, which may write nothing here, and refused.
    deadline = time.monotonic() + 5
    while _denied_wills(broker) == 0:
        assert time.monotonic() < deadline, "the will of the upgraded session was not refused"
        time.sleep(0.02)  # polling interval, bounded by the deadline
    ops = connect(broker.port, "ops1", version=5, clean=False, username="ops",
                  password=PASSWORDS["ops"].encode(),
                  properties=props(session_expiry_interval=EXPIRY_NEVER))
    assert ops.connack is not None and ops.connack.session_present
    ops.ping()
    ops.expect_nothing()  # the refused will did not reach its subscriber

    device = connect(broker.port, "dev1", version=5, clean=False, username="alice",
                     password=PASSWORDS["alice"].encode(),
                     properties=props(session_expiry_interval=EXPIRY_NEVER))
    assert device.connack is not None and device.connack.session_present
    got = []
    for _ in range(2):  # the version 4 backlog, read from the log
        packet = device.expect_publish()
        got.append((packet.topic, packet.payload))
        if packet.packet_id is not None:
            device.ack(PUBACK, packet.packet_id)
    assert got == [("cmd/1", b"backlog-1"), ("cmd/2", b"backlog-2")]
    device.disconnect()
    ops.disconnect()
    broker.stop()
    assert _rows(db, "SELECT client_id, username FROM sessions ORDER BY client_id") == [
        ("dev1", "alice"), ("ops1", "ops")]
