"""A v5 session that resumes its stored session with Session Expiry Interval 0 (or sets 0
in its DISCONNECT) while it still has a backlog in the log: the session is no longer stored,
but its reader lives as long as the session does, so nothing the publishers got acknowledged
is lost or left behind.

Clean Start 0 resumes the existing session [MQTT-3.1.2-4] (5.0); with Session Expiry
Interval 0 it ends when the network connection closes, 3.1.2.11.2 (5.0). Its backlog is
delivered during that connection; retention (run here after every commit group) must not
delete the rows it has not read yet."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_broker.store.log import keeper
from tests.conftest import BrokerThread, broker_config
from tests.integration import rawclient
from tests.integration.test_paho import V5, Paho

MakeBroker = Callable[..., BrokerThread]


def _count(tmp_path: Path, sql: str) -> int:
    path = tmp_path / "data" / "edge-broker.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute(sql).fetchone()[0])


def _until_none(tmp_path: Path, sql: str) -> None:
    """Wait (with a deadline) until `sql` counts nothing: the broker handles a DISCONNECT
    after the client saw its connection close."""
    deadline = time.monotonic() + 10
    while _count(tmp_path, sql):
        assert time.monotonic() < deadline, f"still there: {sql}"
        time.sleep(0.05)  # polling the file, with a deadline


def _session_gone(tmp_path: Path) -> None:
    _until_none(tmp_path, "SELECT count(*) FROM sessions WHERE client_id = 'dev'")


def _offline_with_backlog(make_broker: MakeBroker, count: int) -> tuple[BrokerThread, Paho]:
    broker = make_broker()
    device = Paho(broker, V5, "dev", clean=False, session_expiry=3600)
    device.connect()
    device.subscribe("t/#", 1)
    device.disconnect()
    publisher = Paho(broker, V5, "app")
    publisher.connect()
    for n in range(count):  # each acknowledged (PUBACK) before the next
        publisher.publish("t/x", str(n).encode(), qos=1)
    return broker, publisher


@pytest.fixture(autouse=True)
def _retention_after_every_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # A retention step after every commit group (and when idle), not every 5 s: a row nobody
    # holds is deleted at once, so a reader that went missing shows as lost messages.
    monkeypatch.setattr(keeper, "RETENTION_INTERVAL_S", 0.0)


def test_resuming_with_expiry_zero_delivers_the_whole_backlog(
        make_broker: MakeBroker, tmp_path: Path) -> None:
    broker, publisher = _offline_with_backlog(make_broker, 600)  # more than two pages (256)
    device = Paho(broker, V5, "dev", clean=False, session_expiry=0)
    assert device.connect()[0] is True  # the session is resumed [MQTT-3.1.2-4] (5.0)
    got = [int(device.expect().payload) for _ in range(600)]
    assert got == list(range(600))
    # then live traffic, no duplicate
    publisher.publish("t/x", b"live", qos=1)
    assert device.expect().payload == b"live"
    assert device.drain_until_marker(publisher) == []
    device.disconnect()
    publisher.disconnect()
    # the session ended with the connection: nothing of it is left in the file
    _until_none(tmp_path, "SELECT count(*) FROM log_readers")
    assert _count(tmp_path, "SELECT count(*) FROM sessions WHERE client_id = 'dev'") == 0
    assert _count(tmp_path, "SELECT count(*) FROM log_reader_filters") == 0
    assert _count(tmp_path, "SELECT count(*) FROM log_inflight") == 0


def test_disconnect_with_expiry_zero_while_the_backlog_is_read(
        make_broker: MakeBroker, tmp_path: Path) -> None:
    broker, publisher = _offline_with_backlog(make_broker, 600)
    # Receive Maximum 1 and no PUBACK: the rest of the backlog is still to be read, and
    # nothing is on its way to the client when it sends its DISCONNECT.
    device = rawclient.connect(broker.port, "dev", version=5, clean=False,
                               properties=rawclient.props(session_expiry_interval=3600,
                                                          receive_maximum=1))
    assert device.connack.session_present
    assert device.expect_publish().payload == b"0"
    # Session Expiry Interval 0 in the DISCONNECT: the session ends now, 3.14.2.2.2 (5.0)
    device.disconnect(0, rawclient.props(session_expiry_interval=0))
    _session_gone(tmp_path)
    publisher.publish("t/x", b"after", qos=1)  # a group after the disconnect's
    publisher.disconnect()
    assert _count(tmp_path, "SELECT count(*) FROM log_readers") == 0
    assert _count(tmp_path, "SELECT count(*) FROM log_inflight") == 0
    # a new session starts empty, and the broker goes on serving
    fresh = Paho(broker, V5, "dev", clean=False, session_expiry=0)
    assert fresh.connect()[0] is False
    fresh.subscribe("t/#", 1)
    publisher = Paho(broker, V5, "app")
    publisher.connect()
    publisher.publish("t/x", b"new", qos=1)
    assert fresh.expect().payload == b"new"
    fresh.disconnect()
    publisher.disconnect()


def test_a_session_resumed_with_expiry_zero_ends_mid_backlog_without_leftovers(
        make_broker: MakeBroker, tmp_path: Path) -> None:
    broker, publisher = _offline_with_backlog(make_broker, 600)
    device = rawclient.connect(broker.port, "dev", version=5, clean=False,
                               properties=rawclient.props(receive_maximum=1))  # expiry 0
    assert device.connack.session_present  # [MQTT-3.1.2-4] (5.0)
    assert device.expect_publish().payload == b"0"
    device.disconnect(0)  # the session ends with the connection, 3.1.2.11.2 (5.0)
    _until_none(tmp_path, "SELECT count(*) FROM log_readers")  # (its record went at CONNECT)
    publisher.disconnect()
    assert _count(tmp_path, "SELECT count(*) FROM log_reader_filters") == 0
    assert _count(tmp_path, "SELECT count(*) FROM log_inflight") == 0


def test_a_crash_during_such_a_connection_leaves_no_reader_behind(
        make_broker: MakeBroker, tmp_path: Path) -> None:
    broker, publisher = _offline_with_backlog(make_broker, 300)
    device = rawclient.connect(broker.port, "dev", version=5, clean=False,
                               properties=rawclient.props(receive_maximum=1))  # expiry 0
    assert device.expect_publish().payload == b"0"
    publisher.publish("other", b"x", qos=1)  # a group after the CONNECT's: it is in the file
    assert _count(tmp_path, "SELECT count(*) FROM sessions WHERE client_id = 'dev'") == 0
    assert _count(tmp_path, "SELECT count(*) FROM log_readers") == 1  # holds the backlog
    # The file as a crash now would leave it (the kernel keeps what was written: WAL mode).
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "data", crashed / "data",
                    ignore=shutil.ignore_patterns("*.sock"))
    device.close()
    publisher.disconnect()
    after = make_broker(config=broker_config(crashed))
    # The session ended with the crash [MQTT-3.1.2-5] (5.0): its reader goes at start-up,
    # and with it the rows only it held (retention runs after every group here).
    probe = Paho(after, V5, "dev", clean=False, session_expiry=0)
    assert probe.connect()[0] is False
    probe.disconnect()
    _until_none(crashed, "SELECT count(*) FROM log WHERE topic_id IN (SELECT id FROM"
                         " log_topics WHERE name = 't/x')")
    assert _count(crashed, "SELECT count(*) FROM log_readers") == 0
