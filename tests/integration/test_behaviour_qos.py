"""Black-box, hand-built bytes: QoS 0/1/2 flows, persistent sessions, resends on reconnect,
the inflight window and the bounded session queue.

Spec references name their version: [MQTT-x.y.z-n] (3.1.1) or (5.0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RawClient,
    connect,
    connect_packet,
    disconnect_packet,
    props,
    publish_packet,
    subscriber,
    unique_id,
)

both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


def persistent(version: int) -> dict[str, Any]:
    """CONNECT arguments for a session that outlives its connection."""
    if version == 5:
        return {"clean": False, "properties": props(session_expiry_interval=60)}
    return {"clean": False}


def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll `predicate` until it holds; returns the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


# -- publisher -> broker ----------------------------------------------------------------


@both_versions
def test_qos1_publish_is_acknowledged_with_puback(broker: BrokerThread, version: int) -> None:
    sub = subscriber(broker.port, unique_id(), "q1/t", version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish("q1/t", b"x", qos=1, packet_id=7)
    assert publisher.expect_raw(PUBACK) == b"\x40\x02\x00\x07"  # [MQTT-4.3.2-2] (3.1.1)
    assert sub.expect_publish().payload == b"x"


def test_v5_puback_says_no_matching_subscribers(broker: BrokerThread) -> None:
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish("nobody/here", b"x", qos=1, packet_id=3)
    assert publisher.expect_raw(PUBACK) == b"\x40\x03\x00\x03\x10"  # 0x10, 3.4.2.1 (5.0)


@both_versions
def test_qos2_publish_flow_pubrec_pubrel_pubcomp(broker: BrokerThread, version: int) -> None:
    sub = subscriber(broker.port, unique_id(), "q2/t", version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish("q2/t", b"x", qos=2, packet_id=9)
    assert publisher.expect_raw(PUBREC) == b"\x50\x02\x00\x09"  # [MQTT-4.3.3-2] (3.1.1)
    publisher.ack(PUBREL, 9)
    assert publisher.expect_raw(PUBCOMP) == b"\x70\x02\x00\x09"  # [MQTT-4.3.3-2] (3.1.1)
    assert sub.expect_publish().payload == b"x"
    sub.expect_nothing()


# -- broker -> subscriber ---------------------------------------------------------------


@both_versions
def test_qos1_delivery_to_subscriber(broker: BrokerThread, version: int) -> None:
    sub = subscriber(broker.port, unique_id(), ("d1/t", 1), version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish_acked("d1/t", b"one", qos=1)
    message = sub.expect_publish()
    assert (message.qos, message.dup, message.payload) == (1, False, b"one")
    assert sub.last_raw[0] == 0x32
    sub.ack(PUBACK, message.packet_id)
    sub.ping()
    sub.expect_nothing()  # acknowledged: never sent again


@both_versions
def test_qos2_delivery_to_subscriber(broker: BrokerThread, version: int) -> None:
    sub = subscriber(broker.port, unique_id(), ("d2/t", 2), version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish_acked("d2/t", b"two", qos=2)
    message = sub.expect_publish()
    assert (message.qos, message.payload) == (2, b"two")
    assert sub.last_raw[0] == 0x34
    sub.ack(PUBREC, message.packet_id)
    # [MQTT-4.3.3-1] (3.1.1): the sender answers PUBREC with PUBREL.
    assert sub.expect_raw(PUBREL) == b"\x62\x02" + message.packet_id.to_bytes(2, "big")
    sub.ack(PUBCOMP, message.packet_id)
    sub.ping()
    sub.expect_nothing()


@both_versions
def test_qos_is_downgraded_to_the_subscription_qos(broker: BrokerThread, version: int) -> None:
    # [MQTT-3.8.4-6] (3.1.1) / 3.8.4 (5.0): delivered at min(published QoS, granted QoS).
    at0 = subscriber(broker.port, unique_id(), ("dg/t", 0), version=version)
    at1 = subscriber(broker.port, unique_id(), ("dg/t", 1), version=version)
    at2 = subscriber(broker.port, unique_id(), ("dg/t", 2), version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish_acked("dg/t", b"q2", qos=2)
    publisher.publish("dg/t", b"q0")
    assert [at0.expect_publish().qos for _ in range(2)] == [0, 0]
    assert [at1.expect_publish().qos for _ in range(2)] == [1, 0]
    assert [at2.expect_publish().qos for _ in range(2)] == [2, 0]  # never upgraded


@both_versions
def test_duplicate_qos2_publish_is_not_forwarded_twice(broker: BrokerThread,
                                                       version: int) -> None:
    # Exactly once, 4.3.3 (3.1.1 and 5.0): a resent PUBLISH with the same packet id before
    # PUBREL is acknowledged again but not delivered again.
    sub = subscriber(broker.port, unique_id(), ("eo/t", 0), version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish("eo/t", b"once", qos=2, packet_id=5)
    assert publisher.expect(PUBREC).packet_id == 5
    publisher.publish("eo/t", b"once", qos=2, packet_id=5, dup=True)
    assert publisher.expect(PUBREC).packet_id == 5
    publisher.ack(PUBREL, 5)
    assert publisher.expect(PUBCOMP).packet_id == 5
    assert sub.expect_publish().payload == b"once"
    sub.expect_nothing()
    # After PUBCOMP the id is free again: a new message with it is a new message.
    publisher.publish_acked("eo/t", b"again", qos=2)
    publisher.publish("eo/t", b"new", qos=2, packet_id=5)
    assert publisher.expect(PUBREC).packet_id == 5
    assert sub.expect_publish().payload == b"again"
    assert sub.expect_publish().payload == b"new"


@both_versions
def test_qos2_exactly_once_across_a_publisher_reconnect(broker: BrokerThread,
                                                        version: int) -> None:
    # The PUBREC'd packet id is part of the session [MQTT-4.1.0-1] (3.1.1): a resend after
    # reconnecting is acknowledged but not delivered again.
    sub = subscriber(broker.port, unique_id(), "eo2/t", version=version)
    client_id = unique_id()
    publisher = connect(broker.port, client_id, version=version, **persistent(version))
    publisher.publish("eo2/t", b"once", qos=2, packet_id=11)
    assert publisher.expect(PUBREC).packet_id == 11
    publisher.close()  # the PUBREC "got lost"
    publisher = connect(broker.port, client_id, version=version, **persistent(version))
    assert publisher.last_raw[2] == 1
    publisher.publish("eo2/t", b"once", qos=2, packet_id=11, dup=True)
    assert publisher.expect(PUBREC).packet_id == 11
    publisher.ack(PUBREL, 11)
    assert publisher.expect(PUBCOMP).packet_id == 11
    assert sub.expect_publish().payload == b"once"
    sub.expect_nothing()


# -- persistent sessions ----------------------------------------------------------------


@both_versions
def test_persistent_session_keeps_subscriptions_and_queues_messages(broker: BrokerThread,
                                                                    version: int) -> None:
    client_id = unique_id()
    sub = connect(broker.port, client_id, version=version, **persistent(version))
    sub.subscribe(("ps/#", 1))
    sub.disconnect()
    publisher = connect(broker.port, unique_id(), version=version)
    for payload in (b"1", b"2", b"3"):
        publisher.publish_acked("ps/t", payload, qos=1)
    # [MQTT-3.1.2-4] (3.1.1) / 3.1.2.4 (5.0): the session, subscriptions included, resumes,
    # with the messages queued while offline [MQTT-3.1.2-5] (3.1.1); session present 1.
    sub = connect(broker.port, client_id, version=version, **persistent(version))
    assert sub.last_raw[2] == 1
    got = []
    for _ in range(3):
        message = sub.expect_publish()
        got.append(message.payload)
        sub.ack(PUBACK, message.packet_id)
    assert got == [b"1", b"2", b"3"]
    publisher.publish("ps/live", b"live")
    assert sub.expect_publish().payload == b"live"


def test_v5_session_expiry_zero_ends_the_session_at_disconnect(broker: BrokerThread) -> None:
    client_id = unique_id()
    sub = connect(broker.port, client_id, version=5, clean=False)  # no Session Expiry: 0
    sub.subscribe(("se/t", 1))
    sub.disconnect()
    publisher = connect(broker.port, unique_id(), version=5)
    assert publisher.publish_acked("se/t", b"lost", qos=1) == 0x10  # nobody subscribed
    sub = connect(broker.port, client_id, version=5, **persistent(5))
    assert sub.last_raw[2] == 0  # 3.1.2.11.2 (5.0): the session ended with the connection
    sub.expect_nothing()


def test_v5_disconnect_can_end_the_session(broker: BrokerThread) -> None:
    client_id = unique_id()
    sub = connect(broker.port, client_id, version=5, **persistent(5))
    sub.subscribe(("se/t", 1))
    # 3.14.2.2.2 (5.0): the DISCONNECT's Session Expiry Interval replaces the CONNECT's.
    sub.disconnect(0x00, props(session_expiry_interval=0))
    sub = connect(broker.port, client_id, version=5, **persistent(5))
    assert sub.last_raw[2] == 0


def test_v5_session_expiry_interval_elapses(broker: BrokerThread) -> None:
    client_id = unique_id()
    one_second = {"clean": False, "properties": props(session_expiry_interval=1)}
    sub = connect(broker.port, client_id, version=5, **one_second)
    sub.subscribe(("se/t", 1))
    sub.disconnect()
    sub = connect(broker.port, client_id, version=5, **one_second)
    assert sub.last_raw[2] == 1  # within the interval the session is there
    sub.disconnect()
    started = time.monotonic()
    elapsed = wait_until(lambda: broker.call(lambda: client_id not in broker.app.core.sessions),
                         timeout=3.0)
    assert elapsed >= 0.8, f"session ended after {elapsed:.2f} s, expiry is 1 s"
    assert time.monotonic() - started >= 0.8
    sub = connect(broker.port, client_id, version=5, **one_second)
    assert sub.last_raw[2] == 0
    publisher = connect(broker.port, unique_id(), version=5)
    assert publisher.publish_acked("se/t", b"x", qos=1) == 0x10  # the subscription is gone


# -- resends on reconnect ---------------------------------------------------------------


@both_versions
def test_unacknowledged_qos1_resent_with_dup_in_order(broker: BrokerThread,
                                                      version: int) -> None:
    client_id = unique_id()
    sub = subscriber(broker.port, client_id, ("rs/t", 1), version=version,
                     **persistent(version))
    publisher = connect(broker.port, unique_id(), version=version)
    for payload in (b"a", b"b", b"c", b"d"):
        publisher.publish_acked("rs/t", payload, qos=1)
    first = [sub.expect_publish() for _ in range(4)]
    sub.ack(PUBACK, first[1].packet_id)  # "b" is done; the others are not
    sub.ping()
    sub.close()  # no DISCONNECT
    sub = connect(broker.port, client_id, version=version, **persistent(version))
    assert sub.last_raw[2] == 1
    # [MQTT-4.4.0-1] (3.1.1 and 5.0): resent with the original packet ids, in order, DUP 1
    # [MQTT-3.3.1-1] (3.1.1).
    resent = []
    for _ in range(3):
        resent.append(sub.expect_publish())
        assert sub.last_raw[0] == 0x3A, sub.last_raw  # PUBLISH, DUP, QoS 1
    assert [(m.packet_id, m.payload) for m in resent] == [
        (m.packet_id, m.payload) for m in (first[0], first[2], first[3])]
    for message in resent:
        sub.ack(PUBACK, message.packet_id)
    sub.ping()
    sub.expect_nothing()


@both_versions
def test_pubrel_is_resent_for_a_qos2_delivery_after_pubrec(broker: BrokerThread,
                                                           version: int) -> None:
    client_id = unique_id()
    sub = subscriber(broker.port, client_id, ("rs2/t", 2), version=version,
                     **persistent(version))
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish_acked("rs2/t", b"recd", qos=2)
    publisher.publish_acked("rs2/t", b"not yet", qos=2)
    received = sub.expect_publish()
    unreceived = sub.expect_publish()
    sub.ack(PUBREC, received.packet_id)
    assert sub.expect(PUBREL).packet_id == received.packet_id
    sub.close()  # without PUBCOMP, and without PUBREC for the second
    sub = connect(broker.port, client_id, version=version, **persistent(version))
    assert sub.last_raw[2] == 1
    # [MQTT-4.4.0-1]: the PUBREL goes again, the other PUBLISH again with DUP, in order.
    assert sub.expect_raw(PUBREL) == b"\x62\x02" + received.packet_id.to_bytes(2, "big")
    again = sub.expect_publish()
    assert sub.last_raw[0] == 0x3C  # PUBLISH, DUP, QoS 2
    assert (again.packet_id, again.payload) == (unreceived.packet_id, b"not yet")
    sub.ack(PUBCOMP, received.packet_id)
    sub.ack(PUBREC, again.packet_id)
    assert sub.expect(PUBREL).packet_id == again.packet_id
    sub.ack(PUBCOMP, again.packet_id)
    sub.ping()
    sub.expect_nothing()


# -- inflight window and bounded queue --------------------------------------------------


@both_versions
def test_inflight_window_and_queue_limit(make_broker: Callable[..., BrokerThread],
                                         version: int) -> None:
    broker = make_broker(max_inflight_messages=2, max_queued_messages=5,
                         queue_full_policy="drop-newest")
    sub = subscriber(broker.port, unique_id(), ("win/t", 1), version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    for i in range(20):
        publisher.publish_acked("win/t", b"%d" % i, qos=1)
    first = [sub.expect_publish() for _ in range(2)]
    sub.expect_nothing()  # the window is full until the subscriber acknowledges
    assert broker.call(lambda: broker.app.core.stats.publish_dropped) == 13
    got = [m.payload for m in first]
    pending = [m.packet_id for m in first]
    while pending:
        sub.ack(PUBACK, pending.pop(0))
        message = sub.read(0.3)
        if message is not None:
            assert message.packet_type == PUBLISH
            got.append(message.payload)
            pending.append(message.packet_id)
    # The oldest 2 + 5 are kept, the newer ones dropped (drop-newest, docs/configuration.md).
    assert got == [b"%d" % i for i in range(7)]


def test_queue_byte_limit(make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(max_inflight_messages=1, max_queued_messages=0, max_queued_bytes=10,
                         queue_full_policy="drop-newest")
    sub = subscriber(broker.port, unique_id(), ("bytes/t", 1))
    publisher = connect(broker.port, unique_id())
    for i in range(10):
        publisher.publish_acked("bytes/t", b"msg%d" % i, qos=1)  # 4 bytes each
    got = []
    while (message := sub.read(0.3)) is not None:
        got.append(message.payload)
        sub.ack(PUBACK, message.packet_id)
    # One inflight, then 8 of the 10 queued bytes; the rest dropped.
    assert got == [b"msg0", b"msg1", b"msg2"]
    assert broker.call(lambda: broker.app.core.stats.publish_dropped) == 7


def test_expect_nothing_detects_a_packet(broker: BrokerThread) -> None:
    """The absence checks above would be worthless if `expect_nothing` could not fail."""
    client = subscriber(broker.port, unique_id(), "self/t")
    client.publish("self/t", b"x")
    with pytest.raises(AssertionError):
        client.expect_nothing()



@both_versions
def test_qos1_publish_followed_by_disconnect_in_one_write_is_acknowledged(
        broker: BrokerThread, version: int) -> None:
    sub = subscriber(broker.port, unique_id(), ("qd/t", 1), version=version)
    client = RawClient(broker.port, version=version)
    # CONNECT, a QoS 1 PUBLISH and DISCONNECT in one write: the PUBACK is sent after the
    # DISCONNECT was read, and is still owed ([MQTT-4.3.2-2] (3.1.1), 4.3.2 (5.0)).
    client.send(connect_packet(unique_id(), version=version)
                + publish_packet("qd/t", b"last", version=version, qos=1, packet_id=7)
                + disconnect_packet())
    client.expect(CONNACK)
    ack = client.expect(PUBACK)
    assert (ack.packet_id, ack.reason_code) == (7, 0)
    client.expect_closed()
    message = sub.expect_publish()
    assert (message.topic, message.payload, message.qos) == ("qd/t", b"last", 1)
