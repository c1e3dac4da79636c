"""Restarts with the SQLite store (the default persistence): what a device relies on when the
gateway's broker is stopped (systemctl restart, an upgrade) and started again on the same data
directory.

A graceful stop is `BrokerThread.stop()` (what SIGTERM does: v5 clients get DISCONNECT 0x8B,
the store commits and closes); the next broker is a new `BrokerApp` on the same configuration,
so on a new port. Clients are hand-built raw sockets (tests/integration/rawclient.py). The
start-up refusals (damaged store, a second broker) run the `edge-broker` console script, since
they are about exit codes and stderr.

Spec references name their version: [MQTT-x.y.z-n] (3.1.1) or (5.0).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_broker.mqtt.packets import Publish, PubRel
from tests.conftest import BrokerThread, broker_config
from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.integration.rawclient import (
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    RawClient,
    RawWill,
    connect,
    props,
    sub_options,
    subscriber,
    unique_id,
)

MakeBroker = Callable[..., BrokerThread]
both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
SERVER_SHUTTING_DOWN = 0x8B


def persistent(version: int, expiry: int = 600) -> dict[str, Any]:
    """CONNECT arguments for a session that outlives its connection: clean session 0 on
    3.1.1, clean start 0 and a Session Expiry Interval on 5.0."""
    if version == 5:
        return {"clean": False, "properties": props(session_expiry_interval=expiry)}
    return {"clean": False}


def restart(make_broker: MakeBroker, broker: BrokerThread) -> BrokerThread:
    """Stop the broker gracefully and start a new one on the same configuration/data dir."""
    broker.stop()
    return make_broker(config=broker.config)


def receive(client: RawClient, count: int, timeout: float = 5.0) -> list[Publish]:
    """Receive `count` PUBLISH packets as a well-behaved client: PUBACK a QoS 1 message,
    PUBREC a QoS 2 message and PUBCOMP its PUBREL. Returns when every flow is complete."""
    got: list[Publish] = []
    awaiting_pubrel: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(got) < count or awaiting_pubrel:
        packet = client.read(max(0.0, deadline - time.monotonic()))
        assert packet is not None, (f"received {len(got)} of {count} messages "
                                    f"({[p.payload for p in got]}) within {timeout} s")
        if isinstance(packet, Publish):
            got.append(packet)
            assert packet.packet_id is not None or packet.qos == 0
            if packet.qos == 1:
                client.ack(PUBACK, packet.packet_id or 0)
            elif packet.qos == 2:
                client.ack(PUBREC, packet.packet_id or 0)
                awaiting_pubrel.add(packet.packet_id or 0)
        elif isinstance(packet, PubRel):
            assert packet.packet_id in awaiting_pubrel, f"unexpected {packet!r}"
            awaiting_pubrel.discard(packet.packet_id)
            client.ack(PUBCOMP, packet.packet_id)
        else:
            raise AssertionError(f"unexpected {packet!r}")
    return got


def assert_silent(client: RawClient) -> None:
    """Nothing is queued for this client: PINGRESP is the next packet, then nothing."""
    client.ping()
    client.expect_nothing()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate()` holds; returns time.time() then. Fails at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return time.time()


# -- queued messages ----------------------------------------------------------------------


@both_versions
def test_messages_queued_for_an_offline_session_are_delivered_after_a_restart(
        make_broker: MakeBroker, version: int) -> None:
    broker = make_broker()
    sub_id = unique_id("offline")
    sub = subscriber(broker.port, sub_id, ("r/hi/#", 2), ("r/lo/#", 1), version=version,
                     **persistent(version))
    sub.disconnect()
    publisher = connect(broker.port, unique_id("pub"), version=version)
    v5_props = (props(content_type="text/plain", message_expiry_interval=600,
                      user_properties=[("k", "v")]) if version == 5 else b"\x00")
    expected = []
    for i in range(12):
        qos = 1 + i % 2
        level = "lo" if i % 3 == 0 else "hi"
        topic, payload = f"r/{level}/{i}", f"m{i}".encode()
        assert publisher.publish_acked(topic, payload, qos=qos, properties=v5_props) == 0
        # Delivered at the lower of the message's and the subscription's QoS [MQTT-3.8.4-6]
        # (3.1.1), [MQTT-3.8.4-8] (5.0).
        expected.append((topic, payload, min(qos, 1 if level == "lo" else 2)))
    publisher.disconnect()

    broker = restart(make_broker, broker)

    sub = connect(broker.port, sub_id, version=version, **persistent(version))
    assert sub.connack.session_present  # [MQTT-3.2.2-2] (3.1.1), [MQTT-3.2.2-2] (5.0)
    got = receive(sub, len(expected))
    # Every message, in order [MQTT-4.6.0-6] (3.1.1), at the right QoS, sent for the first
    # time (no DUP: the subscriber never saw them).
    assert [(p.topic, p.payload, p.qos) for p in got] == expected
    assert not any(p.dup for p in got)
    if version == 5:
        for p in got:  # the properties are kept with the message, 3.3.2.3 (5.0)
            assert p.properties.content_type == "text/plain"
            assert p.properties.user_properties == (("k", "v"),)
            assert p.properties.message_expiry_interval is not None
            assert 0 < p.properties.message_expiry_interval <= 600
    assert_silent(sub)
    sub.disconnect()

    # The acknowledgements were stored too: another restart sends nothing again (QoS 2
    # exactly once, QoS 1 not again after its PUBACK).
    broker = restart(make_broker, broker)
    sub = connect(broker.port, sub_id, version=version, **persistent(version))
    assert sub.connack.session_present
    assert_silent(sub)


def test_subscriptions_keep_their_options_and_retained_messages_survive_a_restart(
        make_broker: MakeBroker) -> None:
    broker = make_broker()
    v5_id, v311_id = unique_id("opts5"), unique_id("opts311")
    v5 = connect(broker.port, v5_id, version=5, **persistent(5))
    assert v5.subscribe(("opt/nl", sub_options(1, no_local=True)),
                        properties=props(subscription_identifier=7)) == (1,)
    assert v5.subscribe(("opt/rap", sub_options(2, retain_as_published=True)),
                        properties=props(subscription_identifier=9)) == (2,)
    assert v5.subscribe(("opt/plain/+", sub_options(1))) == (1,)
    v311 = subscriber(broker.port, v311_id, ("old/#", 1), version=4, clean=False)
    publisher = connect(broker.port, unique_id("pub"), version=5)
    assert publisher.publish_acked("keep/a", b"A", qos=1, retain=True) == 0x10
    assert publisher.publish_acked("keep/b", b"B", qos=2, retain=True) == 0x10
    publisher.publish_acked("keep/gone", b"G", qos=1, retain=True)
    publisher.publish_acked("keep/gone", b"", qos=1, retain=True)  # clears it [MQTT-3.3.1-10]
    for client in (v5, v311, publisher):
        client.disconnect()

    broker = restart(make_broker, broker)

    v5 = connect(broker.port, v5_id, version=5, **persistent(5))
    v311 = connect(broker.port, v311_id, version=4, clean=False)
    assert v5.connack.session_present and v311.connack.session_present
    publisher = connect(broker.port, unique_id("pub"), version=5)

    # No Local: the client's own message is not sent back to it [MQTT-3.8.3-3] (5.0); one
    # from another client is, at the granted QoS, with subscription identifier 7.
    v5.publish_acked("opt/nl", b"own", qos=1)
    publisher.publish_acked("opt/nl", b"other", qos=2)
    got = v5.expect_publish()
    assert (got.topic, got.payload, got.qos, got.retain) == ("opt/nl", b"other", 1, False)
    assert got.properties.subscription_identifiers == (7,)
    v5.ack(PUBACK, got.packet_id or 0)

    # Retain As Published keeps the RETAIN flag of a live message [MQTT-3.3.1-12] (5.0).
    publisher.publish_acked("opt/rap", b"rap", qos=2, retain=True)
    (got,) = receive(v5, 1)
    assert (got.payload, got.qos, got.retain) == (b"rap", 2, True)
    assert got.properties.subscription_identifiers == (9,)

    # Without it the flag is cleared [MQTT-3.3.1-13] (5.0), and there is no identifier.
    publisher.publish_acked("opt/plain/x", b"plain", qos=2, retain=True)
    (got,) = receive(v5, 1)
    assert (got.payload, got.qos, got.retain) == (b"plain", 1, False)
    assert got.properties.subscription_identifiers == ()
    assert_silent(v5)  # the own message never came

    publisher.publish_acked("old/x", b"old", qos=2)
    (got,) = receive(v311, 1)
    assert (got.topic, got.payload, got.qos) == ("old/x", b"old", 1)

    # Retained messages are sent to a new subscription [MQTT-3.3.1-6] (3.1.1), with RETAIN
    # set; the cleared one stays cleared.
    fresh = connect(broker.port, unique_id("fresh"), version=5)
    assert fresh.subscribe(("keep/#", sub_options(2))) == (2,)
    got_retained = {p.topic: p for p in receive(fresh, 2)}
    assert {t: (p.payload, p.qos, p.retain) for t, p in got_retained.items()} == {
        "keep/a": (b"A", 1, True), "keep/b": (b"B", 2, True)}
    assert_silent(fresh)


# -- inflight state ------------------------------------------------------------------------


@both_versions
def test_unacknowledged_deliveries_are_resent_with_dup_and_their_packet_ids(
        make_broker: MakeBroker, version: int) -> None:
    broker = make_broker()
    sub_id = unique_id("inflight")
    sub = subscriber(broker.port, sub_id, ("inf/#", 2), version=version, **persistent(version))
    publisher = connect(broker.port, unique_id("pub"), version=version)
    qos_levels = (1, 2, 2, 1, 2)
    for i, qos in enumerate(qos_levels):
        publisher.publish_acked(f"inf/{i}", f"m{i}".encode(), qos=qos)
    first = [sub.expect_publish() for _ in qos_levels]
    assert [(p.topic, p.qos, p.dup) for p in first] == [
        (f"inf/{i}", qos, False) for i, qos in enumerate(qos_levels)]
    ids = [p.packet_id or 0 for p in first]
    # m1 (QoS 2): PUBREC received, PUBREL sent, no PUBCOMP yet. m3 (QoS 1): acknowledged.
    # m0, m2, m4: no acknowledgement at all.
    sub.ack(PUBREC, ids[1])
    assert sub.expect(PUBREL).packet_id == ids[1]
    sub.ack(PUBACK, ids[3])
    sub.ping()  # the broker has handled both acknowledgements

    broker.stop()
    if version == 5:  # 3.1.2.5 / 3.14 (5.0): told why the connection ends
        assert sub.expect(DISCONNECT).reason_code == SERVER_SHUTTING_DOWN
    sub.expect_closed()
    broker = make_broker(config=broker.config)

    sub = connect(broker.port, sub_id, version=version, **persistent(version))
    assert sub.connack.session_present
    # [MQTT-4.4.0-1] (3.1.1, 5.0): resend unacknowledged PUBLISH (DUP set, [MQTT-3.3.1-1])
    # and PUBREL packets with their original packet identifiers, in the original order
    # [MQTT-4.6.0-1] (3.1.1).
    resent = [sub.read() for _ in range(4)]
    assert resent[1] == PubRel(ids[1])
    publishes = [resent[0], resent[2], resent[3]]
    assert all(isinstance(p, Publish) for p in publishes), resent
    assert [(p.topic, p.payload, p.qos, p.dup, p.packet_id) for p in publishes] == [
        (f"inf/{i}", f"m{i}".encode(), qos_levels[i], True, ids[i]) for i in (0, 2, 4)]

    sub.ack(PUBACK, ids[0])
    sub.ack(PUBCOMP, ids[1])
    for packet_id in (ids[2], ids[4]):
        sub.ack(PUBREC, packet_id)
        assert sub.expect(PUBREL).packet_id == packet_id
        sub.ack(PUBCOMP, packet_id)
    assert_silent(sub)
    sub.disconnect()

    broker = restart(make_broker, broker)  # every flow completed: nothing comes back
    sub = connect(broker.port, sub_id, version=version, **persistent(version))
    assert sub.connack.session_present
    assert_silent(sub)


@both_versions
def test_incoming_qos2_state_survives_a_restart(make_broker: MakeBroker, version: int) -> None:
    broker = make_broker()
    online_id, offline_id, pub_id = unique_id("on"), unique_id("off"), unique_id("pub")
    online = subscriber(broker.port, online_id, ("in2/#", 2), version=version,
                        **persistent(version))
    offline = subscriber(broker.port, offline_id, ("in2/#", 2), version=version,
                         **persistent(version))
    offline.disconnect()
    publisher = connect(broker.port, pub_id, version=version, **persistent(version))
    for packet_id, payload in ((42, b"A"), (43, b"B")):
        publisher.publish("in2/t", payload, qos=2, packet_id=packet_id)
        rec = publisher.expect(PUBREC)
        assert (rec.packet_id, rec.reason_code) == (packet_id, 0)
    # Forwarded on receipt (method B, 4.3.3 (3.1.1)); the online subscriber completes both.
    assert [p.payload for p in receive(online, 2)] == [b"A", b"B"]
    online.ping()

    broker = restart(make_broker, broker)

    publisher = connect(broker.port, pub_id, version=version, **persistent(version))
    assert publisher.connack.session_present
    # 42: the PUBREC may have been lost, so the publisher sends the PUBLISH again (DUP). It is
    # acknowledged and NOT forwarded again [MQTT-4.3.3-2] (3.1.1), 4.3.3 (5.0).
    publisher.publish("in2/t", b"A", qos=2, packet_id=42, dup=True)
    rec = publisher.expect(PUBREC)
    assert (rec.packet_id, rec.reason_code) == (42, 0)
    publisher.ack(PUBREL, 42)
    assert publisher.expect_raw(PUBCOMP) == b"\x70\x02\x00\x2a"  # 0x00, not 0x92
    # 43: the publisher got the PUBREC and goes on with PUBREL: the broker still knows the id.
    publisher.ack(PUBREL, 43)
    assert publisher.expect_raw(PUBCOMP) == b"\x70\x02\x00\x2b"

    online = connect(broker.port, online_id, version=version, **persistent(version))
    assert online.connack.session_present
    assert_silent(online)  # A was not forwarded a second time
    offline = connect(broker.port, offline_id, version=version, **persistent(version))
    assert offline.connack.session_present
    assert [p.payload for p in receive(offline, 2)] == [b"A", b"B"]  # exactly once each
    assert_silent(offline)


# -- timers across a restart ----------------------------------------------------------------


@both_versions
def test_session_expiry_keeps_counting_across_a_restart(tmp_path: Path,
                                                        make_broker: MakeBroker,
                                                        version: int) -> None:
    """The expiry interval starts when the client disconnects [MQTT-3.1.2-23] (5.0), not when
    the broker starts again. (3.1.1 sessions expire after persistent_client_expiration.)"""
    expiry, downtime = 3, 1.5
    config = broker_config(tmp_path, persistent_client_expiration_s=expiry)
    broker = make_broker(config=config)
    ids = {"expiring": unique_id("exp")}
    if version == 5:
        ids |= {"gone": unique_id("gone"), "kept": unique_id("kept")}
    intervals = {"expiring": expiry, "gone": 1, "kept": 600}
    disconnected_at = {}  # just before the DISCONNECT: the broker's clock starts after it
    for name, client_id in ids.items():
        client = connect(broker.port, client_id, version=version,
                         **persistent(version, intervals[name]))
        disconnected_at[name] = time.time()
        client.disconnect()

    broker.stop()
    # Not synchronisation: the gateway is down for a while, and that time counts.
    time.sleep(downtime)
    broker = make_broker(config=config)
    restarted_at = time.time()

    sessions = broker.app.core.sessions if broker.app else {}
    if version == 5:  # expired while the broker was down: gone at start-up
        assert broker.call(lambda: ids["gone"] not in sessions)
        assert broker.call(lambda: ids["kept"] in sessions)
    assert broker.call(lambda: ids["expiring"] in sessions)
    expired_at = wait_until(lambda: broker.call(lambda: ids["expiring"] not in sessions),
                            expiry + 3, "session expiry")
    assert expired_at - disconnected_at["expiring"] >= expiry - 0.05
    # Counting again from the restart would end it at restarted_at + expiry or later.
    assert expired_at < restarted_at + expiry - 0.5, (
        f"expired {expired_at - disconnected_at['expiring']:.2f} s after the disconnect, "
        f"{expired_at - restarted_at:.2f} s after the restart")

    for name, client_id in ids.items():
        client = connect(broker.port, client_id, version=version,
                         **persistent(version, intervals[name]))
        assert client.connack.session_present == (name == "kept"), name


@pytest.mark.parametrize("when", ["before_stop", "at_stop"])
def test_v5_will_with_a_delay_is_published_after_the_delay_across_a_restart(
        make_broker: MakeBroker, when: str) -> None:
    """3.1.3.2.2 (5.0): the will goes Will Delay Interval seconds after the connection ended
    (unless the session resumes first). A restart in between must neither lose it nor
    publish it early. "at_stop": the client was still connected when the broker stopped (the
    server closed the connection: the will applies [MQTT-3.1.2-8] (5.0))."""
    delay, downtime = 2, 1.0
    broker = make_broker()
    watcher_id, will_id = unique_id("watch"), unique_id("will")
    watcher = subscriber(broker.port, watcher_id, ("will/#", 1), version=5, **persistent(5))
    will = RawWill("will/t", b"last words", qos=1,
                   properties=props(will_delay_interval=delay))
    client = connect(broker.port, will_id, version=5, will=will, **persistent(5))
    client.ping()
    ended_at = time.time()  # the broker's clock for the delay starts after this
    if when == "before_stop":
        client.close()  # no DISCONNECT: the will applies
        core = broker.app.core if broker.app else None
        assert core is not None
        wait_until(lambda: broker.call(lambda: not core.sessions[will_id].online), 5,
                   "the broker sees the connection closed")
    broker.stop()
    watcher.close()
    client.close()
    time.sleep(downtime)  # not synchronisation: the gateway is down for a while
    broker = make_broker(config=broker.config)
    restarted_at = time.time()

    watcher = connect(broker.port, watcher_id, version=5, **persistent(5))
    assert watcher.connack.session_present
    early = watcher.read(timeout=max(0.0, ended_at + delay - 0.3 - time.time()))
    assert early is None, f"published before the will delay: {early!r}"
    (got,) = receive(watcher, 1, timeout=delay + 3)
    arrived_at = time.time()
    assert (got.topic, got.payload, got.qos) == ("will/t", b"last words", 1)
    assert arrived_at - ended_at >= delay - 0.05
    # The delay counts from the end of the connection, not from the restart.
    assert arrived_at < restarted_at + delay - 0.4, (
        f"{arrived_at - ended_at:.2f} s after the connection ended, "
        f"{arrived_at - restarted_at:.2f} s after the restart")
    assert_silent(watcher)  # once


# -- start-up refusals (the console script) --------------------------------------------------


GARBAGE = b"this is not an SQLite database; a torn write left this here\n" * 200


def _roundtrip(port: int) -> None:
    """The broker serves: a QoS 1 message reaches a subscriber."""
    sub = subscriber(port, unique_id("sub"), ("up/#", 1))
    publisher = connect(port, unique_id("pub"))
    assert publisher.publish_acked("up/t", b"ok", qos=1) == 0
    assert sub.expect_publish().payload == b"ok"


def _damage(data_dir: Path, how: str, make_broker: MakeBroker, tmp_path: Path) -> bytes:
    db = data_dir / "edge-broker.db"
    if how == "garbage":
        data_dir.mkdir(parents=True)
        db.write_bytes(GARBAGE)
    else:  # a real store whose pages were overwritten (a torn or bit-rotten flash block)
        broker = make_broker()  # on tmp_path / "data"
        assert broker.config.broker.data_dir == data_dir
        sub = subscriber(broker.port, unique_id("s"), ("a/#", 1), clean=False)
        sub.disconnect()
        publisher = connect(broker.port, unique_id("p"))
        for i in range(50):
            publisher.publish_acked("a/b", b"x" * 500 + bytes([i]), qos=1)
        broker.stop()
        raw = bytearray(db.read_bytes())
        page = int.from_bytes(raw[16:18], "big") or 65536
        assert len(raw) >= 4 * page
        raw[page:3 * page] = GARBAGE[:2 * page].ljust(2 * page, b"#")
        db.write_bytes(bytes(raw))
    return db.read_bytes()


@needs_console_script
@pytest.mark.parametrize("how", ["garbage", "overwritten_pages"])
def test_a_damaged_store_refuses_to_start_and_recover_moves_it_aside(
        tmp_path: Path, make_broker: MakeBroker, how: str) -> None:
    data_dir = tmp_path / "data"
    damaged = _damage(data_dir, how, make_broker, tmp_path)
    db = data_dir / "edge-broker.db"

    refused = BrokerProcess(data_dir)
    code = refused.wait_exit()
    assert code == 2  # the unit's RestartPreventExitStatus: restarting cannot help
    assert str(db) in refused.stderr and "--recover" in refused.stderr, refused.stderr
    assert db.read_bytes() == damaged  # left as it was, for --recover or forensics
    assert not list(data_dir.glob("edge-broker.db.corrupt-*"))

    recovered = BrokerProcess(data_dir, "--recover").wait_listening()
    try:
        moved = list(data_dir.glob("edge-broker.db.corrupt-*"))
        assert [p.name for p in moved if not p.name.endswith(("-wal", "-shm"))], moved
        main = [p for p in moved if not p.name.endswith(("-wal", "-shm"))]
        assert main[0].read_bytes() == damaged
        assert str(main[0]) in recovered.stderr or main[0].name in recovered.stderr
        _roundtrip(recovered.port)
    finally:
        assert recovered.stop() == 0, recovered.stderr
    # The new store is sound: the next start needs no --recover.
    again = BrokerProcess(data_dir).wait_listening()
    try:
        _roundtrip(again.port)
    finally:
        assert again.stop() == 0, again.stderr


@needs_console_script
def test_recover_leaves_a_sound_store_it_cannot_use_alone(tmp_path: Path,
                                                          make_broker: MakeBroker) -> None:
    """--recover is for damaged files. A sound store written by a newer edge-broker (after a
    downgrade) is refused with or without it, and never moved aside (it would start empty)."""
    broker = make_broker()
    subscriber(broker.port, unique_id("s"), ("a/#", 1), clean=False).disconnect()
    broker.stop()
    db = broker.config.broker.data_dir / "edge-broker.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = db.read_bytes()
    for args in ((), ("--recover",)):
        refused = BrokerProcess(db.parent, *args, log_dir=tmp_path)
        assert refused.wait_exit() != 0
        assert "newer" in refused.stderr and str(db) in refused.stderr, refused.stderr
        assert not list(db.parent.glob("*.corrupt-*")), refused.stderr
        assert db.read_bytes() == before


@needs_console_script
def test_a_second_broker_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = BrokerProcess(data_dir).wait_listening()
    try:
        second = BrokerProcess(data_dir)
        assert second.wait_exit() != 0
        assert f"pid {first.pid}" in second.stderr, second.stderr
        assert str(data_dir) in second.stderr, second.stderr
        _roundtrip(first.port)  # the first one was not disturbed (store, admin socket)
        assert (data_dir / "admin.sock").exists()
    finally:
        assert first.stop() == 0, first.stderr
    # Once the first has stopped, the directory is free again.
    third = BrokerProcess(data_dir).wait_listening()
    assert third.stop() == 0, third.stderr


@both_versions
def test_a_graceful_stop_delivers_wills_to_clients_still_connected(
        make_broker: MakeBroker, version: int) -> None:
    """A stop ends every connection without a DISCONNECT from the client, so each will is
    published [MQTT-3.1.2-8] (5.0). A dashboard subscribed to the status topics with a clean
    session gets them before its own DISCONNECT 0x8B, as mosquitto sends them. Before, the
    wills were published after every connection was closed: only stored sessions got them."""
    broker = make_broker()
    dashboard = subscriber(broker.port, unique_id("dash"), ("status/#", 1), version=version)
    devices = []
    for name in ("a", "b"):
        devices.append(connect(broker.port, unique_id(f"dev-{name}"), version=version,
                               will=RawWill(f"status/{name}", b"offline", qos=1)))
    dashboard.ping()  # connected, all of them

    broker.stop()
    wills = sorted((p.topic, p.payload) for p in (dashboard.expect_publish() for _ in devices))
    assert wills == [("status/a", b"offline"), ("status/b", b"offline")]
    if version == 5:
        assert dashboard.expect(DISCONNECT).reason_code == SERVER_SHUTTING_DOWN
    dashboard.expect_closed()
