"""Persistent sessions' backlogs are readers of the log (core/backlog.py, issue 8 item 1): a
message published while sessions are offline is stored once in the log, never as a delivery
row per session; they read it back in pages when they resume, in order, then live traffic,
with no gap and no duplicate; a restart does not load the backlog into memory."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from tests.conftest import BrokerThread, broker_config
from tests.integration.test_paho import V5, V311, Paho

MakeBroker = Callable[..., BrokerThread]


def _db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "edge-broker.db"


def _count(path: Path, sql: str) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute(sql).fetchone()[0])


def _offline(broker: BrokerThread, client_id: str, version: int, topic_filter: str,
             qos: int) -> None:
    device = Paho(broker, version, client_id, clean=False,
                  session_expiry=3600 if version == V5 else None)
    device.connect()
    device.subscribe(topic_filter, qos)
    device.disconnect()


def test_a_message_for_offline_sessions_is_stored_once_and_read_back_in_order(
        make_broker: MakeBroker, tmp_path: Path) -> None:
    broker = make_broker()
    for n in range(5):
        _offline(broker, f"dev{n}", V5 if n % 2 else V311, "cmd/#", 1 + n % 2)
    publisher = Paho(broker, V5, "app")
    publisher.connect()
    for n in range(300):  # more than a page (256)
        publisher.publish(f"cmd/{n % 3}", f"m{n}".encode(), qos=1 + n % 2)
    db = _db(tmp_path)
    assert _count(db, "SELECT count(*) FROM log") == 300  # once, not once per session
    assert _count(db, "SELECT count(*) FROM deliveries") == 0
    for n in range(5):
        device = Paho(broker, V5 if n % 2 else V311, f"dev{n}", clean=False,
                      session_expiry=3600 if n % 2 else None)
        assert device.connect()[0] is True
        # the 300, and the live messages published for the devices before it
        got = [device.expect() for _ in range(300 + n)]
        assert sum(m.payload == b"live" for m in got) == n
        got = [m for m in got if m.payload != b"live"]
        # In order (paho hands a QoS 2 message over at PUBREL, so per QoS level)
        for qos in (1, 2):
            assert [m.payload for m in got if m.qos == qos] == [
                f"m{i}".encode() for i in range(300) if min(1 + n % 2, 1 + i % 2) == qos]
        # QoS = min(subscription, message)
        assert {m.qos for m in got} == ({1} if n % 2 == 0 else {1, 2})
        # then live traffic, after the backlog: no gap, no duplicate at the seam
        publisher.publish("cmd/live", b"live", qos=1)
        assert device.expect().payload == b"live"
        assert device.drain_until_marker(publisher) == []
        device.disconnect()
    publisher.disconnect()


def test_the_seam_between_backlog_and_live_under_a_running_publisher(
        make_broker: MakeBroker) -> None:
    broker = make_broker()
    _offline(broker, "dev", V5, "t/#", 1)
    publisher = Paho(broker, V5, "app")
    publisher.connect()
    for n in range(500):
        publisher.client.publish("t/x", str(n).encode(), qos=1)
    device = Paho(broker, V5, "dev", clean=False, session_expiry=3600)
    device.connect()
    for n in range(500, 1000):  # published while the device reads its backlog
        publisher.client.publish("t/x", str(n).encode(), qos=1)
    got = [int(device.expect().payload) for _ in range(1000)]
    assert got == list(range(1000))
    device.disconnect()
    publisher.disconnect()


def test_backlog_qos_expiry_and_overlapping_subscriptions(
        make_broker: MakeBroker) -> None:
    broker = make_broker()
    device = Paho(broker, V5, "dev", clean=False, session_expiry=3600)
    device.connect()
    device.subscribe([("a/#", 1), ("a/b", 2)], SubscriptionIdentifier=7)
    device.disconnect()
    other = Paho(broker, V5, "other")
    other.connect()
    other.publish("a/b", b"both", qos=2)
    other.publish("a/c", b"one", qos=2)
    other.publish("a/c", b"short", qos=1, MessageExpiryInterval=1)
    other.publish("a/c", b"long", qos=1, MessageExpiryInterval=3600)
    other.disconnect()
    device = Paho(broker, V5, "dev", clean=False, session_expiry=3600)
    device.connect()
    got = {}
    while not {b"both", b"one", b"long"} <= got.keys():
        message = device.expect()
        assert message.payload not in got  # one copy each
        got[message.payload] = message
    # overlapping subscriptions: one copy, at the highest QoS, with every identifier
    assert got[b"both"].qos == 2
    assert got[b"both"].properties.SubscriptionIdentifier == [7, 7]
    assert got[b"one"].qos == 1  # min(subscription, message)
    # the expiry interval is decremented ("short", 1 s, may have expired by now)
    assert 0 < got[b"long"].properties.MessageExpiryInterval <= 3600
    device.disconnect()


def test_a_restart_keeps_the_backlog_in_the_file(tmp_path: Path,
                                                  make_broker: MakeBroker) -> None:
    config = broker_config(tmp_path)
    broker = make_broker(config=config)
    _offline(broker, "dev", V311, "q/#", 2)
    publisher = Paho(broker, V5, "app")
    publisher.connect()
    for n in range(400):
        publisher.publish("q/1", f"{n}".encode(), qos=2)
    publisher.disconnect()
    broker.stop()
    assert _count(_db(tmp_path), "SELECT count(*) FROM deliveries") == 0
    broker = make_broker(config=config)
    device = Paho(broker, V311, "dev", clean=False)
    assert device.connect()[0] is True
    got = [int(device.expect().payload) for _ in range(400)]
    assert got == list(range(400))
    device.disconnect()
