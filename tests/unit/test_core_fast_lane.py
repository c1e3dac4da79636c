"""The fast lane of QoS 0 deliveries to online sessions (core/session.py): what a subscriber
gets, in which order, and what the queue bounds do, must be what the per-delivery queue gives
(these tests pass on the code before the lane as well)."""

from __future__ import annotations

import pytest

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.session import DELIVERY_OVERHEAD, MESSAGE_OVERHEAD
from edge_broker.mqtt.packets import Publish
from tests.unit.test_core_broker import commit, connect, pub, pulled, sub


def _cost(topic: str, payload: bytes) -> int:
    """What one more queued delivery of a message adds to the memory estimate at most
    (core/session.py cost)."""
    return DELIVERY_OVERHEAD + MESSAGE_OVERHEAD + len(payload) + len(topic)


def _payloads(packets: list[object]) -> list[bytes]:
    out = []
    for packet in packets:
        assert isinstance(packet, Publish)
        out.append(packet.payload)
    return out


def test_qos0_and_qos1_deliveries_keep_their_order() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "t", 1)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"a")
    pub(core, "p", "t", b"b")
    pub(core, "p", "t", b"c", qos=1)
    pub(core, "p", "t", b"d")
    assert commit(core) == ["s"]
    assert _payloads(pulled(core, "s")) == [b"a", b"b", b"c", b"d"]
    assert core.stats.publish_sent == 4
    assert core.memory.used == 0 and core.sessions["s"].queued_bytes == 0


def test_a_later_batch_never_overtakes_one_not_yet_committed() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "t", 0)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"a", retain=True)  # the retained copy makes this batch wait
    first = core.drain()
    assert first.changes
    pub(core, "p", "t", b"b")  # a batch with nothing to store: free at once
    second = core.drain()
    assert not second.changes
    core.committed(first.number - 1)
    assert pulled(core, "s") == []
    core.committed(second.number)
    assert _payloads(pulled(core, "s")) == [b"a", b"b"]


@pytest.mark.parametrize(("policy", "kept"), [("drop-oldest", [b"3", b"4", b"5"]),
                                              ("drop-newest", [b"1", b"2", b"3"])])
def test_the_queue_bound_drops_by_policy_and_counts(policy: str, kept: list[bytes]) -> None:
    core = BrokerCore(CoreSettings(max_queued_messages=3, queue_full_policy=policy))
    connect(core, "s")
    sub(core, "s", "t", 0)
    connect(core, "p")
    commit(core)
    for i in range(1, 6):
        pub(core, "p", "t", b"%d" % i)
    session = core.sessions["s"]
    assert session.dropped == 2
    assert core.stats.dropped_queue_full == core.stats.publish_dropped == 2
    assert core.take_drop_reports(100.0) == [("s", 2)]
    commit(core)
    assert _payloads(pulled(core, "s")) == kept
    assert core.memory.used == 0 and session.queued_bytes == 0


def test_the_byte_bound_counts_what_waits_in_the_lane() -> None:
    core = BrokerCore(CoreSettings(max_queued_bytes=10))
    connect(core, "s")
    sub(core, "s", "t", 0)
    connect(core, "p")
    commit(core)
    for i in range(4):
        pub(core, "p", "t", b"%04d" % i)
    assert core.sessions["s"].dropped == 2
    commit(core)
    assert _payloads(pulled(core, "s")) == [b"0002", b"0003"]


def test_a_message_body_counts_once_for_all_subscribers() -> None:
    core = BrokerCore()
    for name in ("s1", "s2"):
        connect(core, name)
        sub(core, name, "t", 0)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"x" * 100)
    one = _cost("t", b"x" * 100)
    assert core.memory.used == one + DELIVERY_OVERHEAD
    commit(core)
    first = pulled(core, "s1")
    assert core.memory.used == one
    second = pulled(core, "s2")
    assert core.memory.used == 0
    assert first == second and first[0] is second[0]  # one shared packet


def test_the_memory_bound_drops_the_oldest_of_the_largest_backlog() -> None:
    one = _cost("big/t", b"b" * 100)
    core = BrokerCore(CoreSettings(max_queued_memory_bytes=5 * one + one // 2))
    connect(core, "big")
    sub(core, "big", "big/t", 0)
    connect(core, "small")
    sub(core, "small", "small/t", 0)
    connect(core, "p")
    commit(core)
    for i in range(5):
        pub(core, "p", "big/t", b"%03d" % i + b"b" * 97)
    assert core.stats.publish_dropped == 0
    pub(core, "p", "small/t", b"s" * 100)
    big = core.sessions["big"]
    assert big.dropped >= 1 and core.sessions["small"].dropped == 0
    assert core.stats.dropped_memory_full == big.dropped
    commit(core)
    numbers = [int(p[:3]) for p in _payloads(pulled(core, "big"))]
    assert numbers == list(range(big.dropped, 5))
    assert _payloads(pulled(core, "small")) == [b"s" * 100]


def test_subscription_identifiers_and_retain_as_published_per_subscriber() -> None:
    core = BrokerCore()
    connect(core, "a")
    sub(core, "a", "t/#", 0, sub_id=7, retain_as_published=True)
    sub(core, "a", "t/+", 0, sub_id=9)
    connect(core, "b")
    sub(core, "b", "t/x", 0)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t/x", b"v", retain=True)
    pub(core, "a", "t/x", b"own")
    commit(core)
    got_a = pulled(core, "a")
    assert len(got_a) == 2
    first = got_a[0]
    assert isinstance(first, Publish) and first.retain
    assert sorted(first.properties.subscription_identifiers) == [7, 9]
    (got_b, own_b) = pulled(core, "b")
    assert isinstance(got_b, Publish) and not got_b.retain and got_b.payload == b"v"
    assert isinstance(own_b, Publish) and own_b.payload == b"own"


def test_no_local_skips_the_publisher() -> None:
    core = BrokerCore()
    connect(core, "a")
    sub(core, "a", "t", 0, no_local=True)
    commit(core)
    pub(core, "a", "t", b"own")
    commit(core)
    assert pulled(core, "a") == []
    assert core.memory.used == 0


def test_a_persistent_session_going_offline_drops_its_qos0_deliveries() -> None:
    core = BrokerCore()
    epoch = connect(core, "s", clean=False, expiry=600)
    sub(core, "s", "t", 1)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"zero")
    pub(core, "p", "t", b"one", qos=1)
    core.disconnect("s", epoch, now=0)
    commit(core)
    connect(core, "s", clean=False, expiry=600)
    commit(core)
    assert _payloads(pulled(core, "s")) == [b"one"]
    assert core.sessions["s"].queued_bytes == 0 and core.memory.used == 0


def test_with_queue_qos0_messages_a_persistent_session_keeps_them_offline() -> None:
    core = BrokerCore(CoreSettings(queue_qos0_messages=True))
    epoch = connect(core, "s", clean=False, expiry=600)
    sub(core, "s", "t", 0)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"zero")
    core.disconnect("s", epoch, now=0)
    commit(core)
    connect(core, "s", clean=False, expiry=600)
    commit(core)
    assert _payloads(pulled(core, "s")) == [b"zero"]


def test_a_pull_limit_leaves_the_rest_in_order() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "t", 1)
    connect(core, "p")
    commit(core)
    for i in range(5):
        pub(core, "p", "t", b"%d" % i)
    pub(core, "p", "t", b"q", qos=1)
    commit(core)
    assert _payloads(core.pull("s", now=0, limit=2)) == [b"0", b"1"]
    assert _payloads(core.pull("s", now=0, limit=2)) == [b"2", b"3"]
    assert _payloads(core.pull("s", now=0, limit=5)) == [b"4", b"q"]
    assert core.memory.used == 0


def test_the_session_ending_frees_what_waited() -> None:
    core = BrokerCore()
    epoch = connect(core, "s")
    sub(core, "s", "t", 0)
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"x" * 50)
    assert core.memory.used > 0
    core.disconnect("s", epoch, now=0)
    assert core.memory.used == 0


def test_a_takeover_by_a_v5_connection_gets_the_subscription_identifiers() -> None:
    core = BrokerCore()
    connect(core, "s", clean=False, expiry=600)
    sub(core, "s", "t", 0, sub_id=5)
    connect(core, "s", level=4, clean=False)  # taken over by a 3.1.1 connection
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", b"m")
    connect(core, "s", clean=False, expiry=600)  # and back to 5.0 before it was pulled
    commit(core)
    (packet,) = pulled(core, "s")
    assert isinstance(packet, Publish) and packet.payload == b"m"
    assert packet.properties.subscription_identifiers == (5,)  # [MQTT-3.3.4-3] (5.0)
