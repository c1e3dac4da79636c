"""Black-box, hand-built bytes: what happens when a persistent session's queue bound is
reached, per `queue_full_policy` and protocol version (docs/configuration.md, "Queue bounds"),
and retained messages on SUBSCRIBE, which no queue bound caps.

Spec references name their version: [MQTT-x.y.z-n] (3.1.1) or (5.0).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import (
    PINGRESP,
    PUBACK,
    PUBLISH,
    RawClient,
    RawWill,
    connect,
    props,
    subscriber,
    unique_id,
)

MakeBroker = Callable[..., BrokerThread]
both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
QUOTA_EXCEEDED = 0x97
BOUND = 5
SENT = 8


def persistent(version: int) -> dict[str, Any]:
    if version == 5:
        return {"clean": False, "properties": props(session_expiry_interval=600)}
    return {"clean": False}


def publish_qos1(client: RawClient, topic: str, payload: bytes) -> int | None:
    """QoS 1 PUBLISH then PINGREQ: the PUBACK reason code (0 on 3.1.1), or None when only the
    PINGRESP came (refused without an acknowledgement, 3.1.1)."""
    packet_id = client.publish(topic, payload, qos=1)
    client.send(b"\xc0\x00")
    packet = client.read()
    assert packet is not None, "neither PUBACK nor PINGRESP"
    if packet.packet_type == PINGRESP:
        return None
    assert packet.packet_type == PUBACK and packet.packet_id == packet_id, packet
    client.expect(PINGRESP)
    return int(packet.reason_code)


def drain(client: RawClient) -> list[bytes]:
    """Receive QoS 1 messages until none comes, acknowledging each."""
    got = []
    while (packet := client.read(0.5)) is not None:
        assert packet.packet_type == PUBLISH, packet
        got.append(packet.payload)
        client.ack(PUBACK, packet.packet_id)
    return got


def sys_values(broker: BrokerThread, client: RawClient, wanted: dict[str, bytes],
               timeout: float = 10.0) -> None:
    """Wait until the retained $SYS topics in `wanted` reached those values."""
    seen: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    while any(seen.get(t) != v for t, v in wanted.items()):
        assert time.monotonic() < deadline, (seen, wanted)
        packet = client.read(max(0.0, deadline - time.monotonic()))
        if packet is not None and packet.packet_type == PUBLISH:
            seen[packet.topic] = packet.payload


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-newest", "refuse"])
@both_versions
def test_a_full_persistent_queue_applies_the_policy(
        tmp_path: Path, make_broker: MakeBroker, caplog: pytest.LogCaptureFixture,
        policy: str, version: int) -> None:
    base = broker_config(tmp_path, max_queued_messages=BOUND, queue_full_policy=policy)
    broker = make_broker(config=dataclasses.replace(
        base, broker=dataclasses.replace(base.broker, sys_interval_s=1)))
    sub_id = unique_id("offline")
    subscriber(broker.port, sub_id, ("q/t", 1), version=version,
               **persistent(version)).disconnect()
    publisher = connect(broker.port, unique_id("pub"), version=version)
    caplog.set_level(logging.WARNING, logger="edge_broker")

    payloads = [b"m%d" % i for i in range(SENT)]
    codes = [publish_qos1(publisher, "q/t", p) for p in payloads]

    back = connect(broker.port, sub_id, version=version, **persistent(version))
    assert back.connack.session_present
    got = drain(back)
    dropped = SENT - BOUND
    watcher = subscriber(broker.port, unique_id("sys"), "$SYS/broker/publish/messages/#",
                         version=version)
    if policy == "refuse":
        # Nothing is dropped: the publisher is told (5.0: 0x97 Quota exceeded) or not
        # acknowledged (3.1.1), and keeps the message.
        refused = [QUOTA_EXCEEDED if version == 5 else None] * dropped
        assert codes == [0] * BOUND + refused
        assert got == payloads[:BOUND]
        sys_values(broker, watcher, {
            "$SYS/broker/publish/messages/refused/queue_full": b"%d" % dropped,
            "$SYS/broker/publish/messages/dropped": b"0"})
        # Room again: the refused message is accepted now.
        assert publish_qos1(publisher, "q/t", b"again") == 0
        assert drain(back) == [b"again"]
        return
    # Acknowledged normally: the subscriber matched, so never 0x10 No matching subscribers.
    assert codes == [0] * SENT
    kept = payloads[dropped:] if policy == "drop-oldest" else payloads[:BOUND]
    assert got == kept
    sys_values(broker, watcher, {
        "$SYS/broker/publish/messages/dropped": b"%d" % dropped,
        "$SYS/broker/publish/messages/dropped/queue_full": b"%d" % dropped,
        "$SYS/broker/publish/messages/dropped/memory_full": b"0"})
    session = broker.call(lambda: broker.app.core.sessions[sub_id])
    assert session.dropped == dropped
    # Logged at warning level with the client id; rate-limited (one line for the burst).
    lines = [r.getMessage() for r in caplog.records
             if r.levelno == logging.WARNING and sub_id in r.getMessage()]
    assert len(lines) == 1 and "dropped" in lines[0], lines


@both_versions
def test_every_retained_message_reaches_a_new_subscriber(make_broker: MakeBroker,
                                                         version: int) -> None:
    """5,000 retained topics, far more than the queue bound: a new r/# subscriber gets them
    all [MQTT-3.3.1-6] (3.1.1), 3.3.1.3 (5.0), without the broker making a queued delivery of
    each at once."""
    count = 5000
    broker = make_broker(max_queued_messages=100)
    publisher = connect(broker.port, unique_id("pub"), version=version)
    for i in range(count):
        publisher.publish(f"r/{i}", b"v%d" % i, retain=True)
    publisher.ping()
    assert broker.call(lambda: len(broker.app.core.retained)) == count

    sub_id = unique_id("sub")
    sub = subscriber(broker.port, sub_id, ("r/#", 1), version=version)
    session = broker.call(lambda: broker.app.core.sessions[sub_id])
    # QoS 0 retained messages at QoS 0: flow control is the socket; never all queued.
    assert broker.call(lambda: len(session.queue)) <= 100
    got = set()
    while len(got) < count:
        packet = sub.read(5.0)
        assert packet is not None, f"received {len(got)} of {count}"
        assert packet.packet_type == PUBLISH and packet.retain, packet
        got.add(packet.topic)
    assert got == {f"r/{i}" for i in range(count)}
    sub.ping()
    sub.expect_nothing()
    assert broker.call(lambda: len(session.queue) + len(session.retained_pending)) == 0


@both_versions
def test_qos1_retained_on_subscribe_respect_the_inflight_window(make_broker: MakeBroker,
                                                                version: int) -> None:
    count = 300
    broker = make_broker(max_queued_messages=10, max_inflight_messages=5)
    publisher = connect(broker.port, unique_id("pub"), version=version)
    for i in range(count):
        publisher.publish(f"r/{i}", b"v%d" % i, qos=1, retain=True)
    for _ in range(count):
        publisher.expect(PUBACK)
    sub = subscriber(broker.port, unique_id("sub"), ("r/#", 1), version=version)
    first = [sub.expect_publish() for _ in range(5)]
    sub.ping()  # only 5 in flight until acknowledged
    sub.expect_nothing()
    got = {p.topic for p in first}
    for packet in first:
        sub.ack(PUBACK, packet.packet_id or 0)
    while (packet := sub.read(1.0)) is not None:
        assert packet.packet_type == PUBLISH and packet.qos == 1 and packet.retain
        got.add(packet.topic)
        sub.ack(PUBACK, packet.packet_id or 0)
    assert got == {f"r/{i}" for i in range(count)}


@both_versions
def test_the_default_bounds_keep_what_an_offline_session_was_acknowledged(
        broker: BrokerThread, version: int) -> None:
    """With the default settings a persistent session offline for a while loses nothing that
    was acknowledged (mosquitto's default of 1000 would have dropped the rest)."""
    count = 1500
    sub_id = unique_id("offline")
    subscriber(broker.port, sub_id, ("d/t", 1), version=version,
               **persistent(version)).disconnect()
    publisher = connect(broker.port, unique_id("pub"), version=version)
    for i in range(count):
        publisher.publish("d/t", b"%d" % i, qos=1, packet_id=i % 60000 + 1)
    codes = [publisher.expect(PUBACK).reason_code for _ in range(count)]
    assert codes == [0] * count  # and not 0x10: the offline subscriber matched
    back = connect(broker.port, sub_id, version=version, **persistent(version))
    assert drain(back) == [b"%d" % i for i in range(count)]
    assert broker.call(lambda: broker.app.core.stats.publish_dropped) == 0


def test_a_drop_no_client_publish_caused_is_logged_too(make_broker: MakeBroker,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A will (like $SYS or the memory bound) can fill a queue; its drop is logged without
    waiting for some client's next PUBLISH."""
    caplog.set_level(logging.WARNING)
    broker = make_broker(max_queued_messages=1, queue_full_policy="drop-newest")
    sub = subscriber(broker.port, "keeper", ("w/#", 1), version=4, clean=False)
    sub.close()
    publisher = connect(broker.port, unique_id("pub"), version=4)
    assert publish_qos1(publisher, "w/first", b"fills the queue") == 0
    publisher.close()
    caplog.clear()
    doomed = connect(broker.port, unique_id("will"), version=4,
                     will=RawWill("w/will", b"gone", 1))
    doomed.sock.close()  # no DISCONNECT: the will goes, and finds the queue full
    deadline = time.monotonic() + 10
    while not any("queue of client 'keeper' full" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.02)  # polling interval, bounded by the deadline


def test_every_drop_is_in_the_log_when_the_broker_stops(make_broker: MakeBroker,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """The log has at most one line per session per 10 s; the drops after that line are
    logged when the broker stops at the latest, so its lines add up to every drop (a stop
    inside the interval used to leave them out)."""
    caplog.set_level(logging.WARNING)
    broker = make_broker(max_queued_messages=1)  # queue_full_policy "drop-oldest"
    subscriber(broker.port, "keeper", ("q/#", 1), version=4, clean=False).close()
    publisher = connect(broker.port, unique_id("pub"), version=4)
    for i in range(5):
        assert publish_qos1(publisher, f"q/{i}", b"x") == 0
    publisher.close()
    dropped = broker.call(lambda: broker.app.core.stats.dropped_queue_full)
    assert dropped == 4
    broker.stop()
    counts = [int(r.getMessage().split("full: ")[1].split()[0]) for r in caplog.records
              if r.getMessage().startswith("queue of client 'keeper' full: ")]
    assert sum(counts) == dropped, [r.getMessage() for r in caplog.records]
