"""BrokerCore queue bounds and policies, the memory estimate of all queues, drop reports,
retained messages sent on SUBSCRIBE (lazily), and would_store (docs/configuration.md,
"Queue bounds")."""

from __future__ import annotations

import pytest

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import DeliveryDeleted, DeliverySaved
from edge_broker.core.session import DELIVERY_OVERHEAD, cost
from edge_broker.mqtt.packets import Publish, Unsubscribe
from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.types import ReasonCode
from tests.unit.test_core_broker import commit, connect, pub, pulled, sub

PAYLOAD = b"p" * 100


def offline(core: BrokerCore, client_id: str, topic_filter: str, qos: int = 1) -> None:
    epoch = connect(core, client_id, clean=False, expiry=600)
    sub(core, client_id, topic_filter, qos)
    core.disconnect(client_id, epoch, now=0)


def payloads(core: BrokerCore, client_id: str) -> list[bytes]:
    return [d.message.payload for d in core.sessions[client_id].queue]


def memory_core(policy: str) -> BrokerCore:
    # Room for 20 queued messages of 100 bytes on "big/t", and a little more.
    one = cost(_message("big/t"))
    core = BrokerCore(CoreSettings(max_queued_memory_bytes=20 * one + one // 2,
                                   queue_full_policy=policy))
    offline(core, "big", "big/#")
    offline(core, "small", "small/t")
    connect(core, "p")
    for i in range(20):
        assert pub(core, "p", "big/t", b"%03d" % i + PAYLOAD[3:], qos=1) == 0
    assert core.stats.publish_dropped == 0
    return core


def _message(topic: str) -> Publish:
    return Publish(topic, PAYLOAD, 1, False, False, 1, Properties())


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-newest"])
def test_the_memory_bound_drops_from_the_largest_backlog_not_the_receiver(policy: str) -> None:
    core = memory_core(policy)
    assert pub(core, "p", "small/t", PAYLOAD, qos=1) == 0
    assert payloads(core, "small") == [PAYLOAD]
    assert core.sessions["small"].dropped == 0
    big = payloads(core, "big")
    dropped = 20 - len(big)
    assert dropped >= 1 and core.stats.dropped_memory_full == core.stats.publish_dropped == dropped
    assert core.sessions["big"].dropped == dropped
    numbers = [int(p[:3]) for p in big]
    expected = list(range(dropped, 20)) if policy == "drop-oldest" else list(range(len(big)))
    assert numbers == expected
    assert core.memory.used <= core.settings.max_queued_memory_bytes


def test_the_memory_bound_with_refuse_refuses_the_publisher() -> None:
    core = memory_core("refuse")
    assert pub(core, "p", "small/t", PAYLOAD, qos=1) == ReasonCode.QUOTA_EXCEEDED
    assert payloads(core, "small") == [] and len(payloads(core, "big")) == 20
    assert core.stats.refused_queue_full == 1 and core.stats.publish_dropped == 0


def test_refuse_takes_the_whole_message_or_nothing() -> None:
    core = BrokerCore(CoreSettings(max_queued_messages=1, queue_full_policy="refuse"))
    offline(core, "full", "t")
    offline(core, "empty", "t")
    connect(core, "p")
    assert pub(core, "p", "only/full", qos=1) == ReasonCode.NO_MATCHING_SUBSCRIBERS
    sub_full_only = core.sessions["full"]
    assert pub(core, "p", "t", b"1", qos=1) == 0
    assert len(sub_full_only.queue) == 1
    core.unsubscribe("empty", Unsubscribe(1, ("t",)), now=0)  # "empty" drained: re-subscribe
    sub(core, "empty", "t")
    # "empty" has room, "full" has not: nobody gets it, nor is it retained.
    assert pub(core, "p", "t", b"2", qos=2, retain=True) == ReasonCode.QUOTA_EXCEEDED
    assert payloads(core, "full") == [b"1"] and payloads(core, "empty") == [b"1"]
    assert core.retained.get("t") is None
    assert core.sessions["p"].incoming_qos2 == set()  # may be sent again under the same id


def test_a_message_body_counts_once_in_the_memory_estimate() -> None:
    core = BrokerCore()
    for name in ("a", "b", "c"):
        offline(core, name, "t")
    connect(core, "p")
    pub(core, "p", "t", PAYLOAD, qos=1)
    message_cost = cost(next(iter(core.sessions["a"].queue)).message)
    assert core.memory.used == message_cost + 2 * DELIVERY_OVERHEAD
    commit(core)
    for name in ("a", "b", "c"):
        connect(core, name, clean=False, expiry=600)
        pulled(core, name)  # now inflight: no longer queued
    assert core.memory.used == 0


def test_drop_oldest_deletes_the_stored_delivery_in_the_same_batch() -> None:
    core = BrokerCore(CoreSettings(max_queued_messages=2))
    offline(core, "s", "t")
    connect(core, "p")
    pub(core, "p", "t", b"0", qos=1)
    pub(core, "p", "t", b"1", qos=1)
    first = core.drain().changes
    oldest = next(c.record.delivery_id for c in first if isinstance(c, DeliverySaved))
    pub(core, "p", "t", b"2", qos=1)
    changes = core.drain().changes
    assert DeliveryDeleted("s", oldest) in changes
    assert payloads(core, "s") == [b"1", b"2"]


def three_drops_reported() -> BrokerCore:
    """Offline session "s" (a queue of one) dropped 3 of 4 messages from "p" at time 0, and
    they were reported then."""
    core = BrokerCore(CoreSettings(max_queued_messages=1, queue_full_policy="drop-newest"))
    offline(core, "s", "t")
    connect(core, "p")
    for _ in range(4):
        pub(core, "p", "t", qos=1, now=0)
    assert core.take_drop_reports(0.0) == [("s", 3)]
    return core


def test_drops_are_reported_at_most_once_per_session_per_interval() -> None:
    core = three_drops_reported()
    pub(core, "p", "t", qos=1)
    assert core.take_drop_reports(5.0) == []
    pub(core, "p", "t", qos=1)
    assert core.take_drop_reports(10.0) == [("s", 2)]
    assert core.take_drop_reports(30.0) == []
    assert core.sessions["s"].dropped == 5


def test_the_drops_of_a_session_that_ends_are_still_reported_once() -> None:
    """A session that ends (here: its client comes back with Clean Start) with drops not
    reported yet: they are reported when its interval is over, or at once at a stop, and the
    new session under the same client id adds no line of 0."""
    core = three_drops_reported()
    for _ in range(2):
        pub(core, "p", "t", qos=1, now=1)
    connect(core, "s", clean=True, now=2)  # the old session ends with 2 not reported
    assert core.take_drop_reports(5.0) == []
    assert core.has_unlogged_drops
    assert core.take_drop_reports(10.0) == [("s", 2)]
    assert core.take_drop_reports(30.0) == [] and not core.has_unlogged_drops
    offline(core, "q", "t")
    for _ in range(3):
        pub(core, "p", "t", qos=1, now=40)
    assert core.take_drop_reports(40.0) == [("q", 2)]
    pub(core, "p", "t", qos=1, now=41)
    connect(core, "q", clean=True, now=42)
    assert core.take_drop_reports(43.0, every=True) == [("q", 1)]


# -- retained messages on SUBSCRIBE ------------------------------------------------------


def retained_core(count: int) -> BrokerCore:
    core = BrokerCore(CoreSettings(max_queued_messages=10, max_inflight_messages=5))
    connect(core, "p")
    for i in range(count):
        pub(core, "p", f"r/{i}", b"v%d" % i, qos=1, retain=True)
    commit(core)
    return core


def test_retained_on_subscribe_are_not_capped_and_not_queued() -> None:
    core = retained_core(50)
    connect(core, "s")
    sub(core, "s", "r/#", qos=0)
    assert not core.sessions["s"].queue and core.memory.used == 0
    assert pulled(core, "s") == []  # not before the SUBACK's batch committed
    commit(core)
    got = []
    while out := pulled(core, "s"):
        got += [p.topic for p in out if isinstance(p, Publish) and p.retain]
    assert sorted(got) == sorted(f"r/{i}" for i in range(50))


def test_retained_on_subscribe_follow_what_was_queued_before_and_precede_what_comes_after(
        ) -> None:
    core = retained_core(3)
    connect(core, "s")
    sub(core, "s", "live", qos=0)
    pub(core, "p", "live", b"before")
    sub(core, "s", "r/#", qos=0)
    pub(core, "p", "live", b"after")
    commit(core)
    assert [p.payload for p in pulled(core, "s") if isinstance(p, Publish)] == [
        b"before", b"v0", b"v1", b"v2", b"after"]


def test_retained_pending_sends_the_current_message_and_skips_a_cleared_one() -> None:
    core = retained_core(3)
    connect(core, "s")
    sub(core, "s", "r/#", qos=0)
    pub(core, "p", "r/0", b"", retain=True)  # cleared while pending
    pub(core, "p", "r/1", b"new", retain=True)  # replaced while pending
    commit(core)
    # (The clearing and the replacing PUBLISH also reach it as live messages, retain 0.)
    assert sorted(p.payload for p in pulled(core, "s") if isinstance(p, Publish) and p.retain
                  ) == [b"new", b"v2"]


def test_unsubscribe_stops_pending_retained_messages() -> None:
    core = retained_core(30)
    connect(core, "s")
    sub(core, "s", "r/#", qos=1)
    commit(core)
    assert len(pulled(core, "s")) == 5  # the inflight window
    core.unsubscribe("s", Unsubscribe(1, ("r/#",)), now=0)
    for packet_id in range(1, 6):
        core.puback("s", packet_id, now=0)
    assert pulled(core, "s") == []
    assert not core.sessions["s"].retained_pending


def test_pending_qos1_retained_survive_a_persistent_sessions_disconnect() -> None:
    core = retained_core(12)
    pub(core, "p", "r/q0", b"q0", qos=0, retain=True)
    commit(core)
    epoch = connect(core, "s", clean=False, expiry=600)
    sub(core, "s", "r/#", qos=1)
    commit(core)
    sent = pulled(core, "s")  # r/q0 at QoS 0 may be among them; 5 QoS 1 in flight
    assert sum(isinstance(p, Publish) and p.qos == 1 for p in sent) == 5
    core.disconnect("s", epoch, now=1)
    changes = core.drain().changes
    saved = [c for c in changes if isinstance(c, DeliverySaved)]
    assert len(saved) == 12  # 5 inflight + the 7 still pending, now queued and stored
    connect(core, "s", clean=False, expiry=600, now=2)
    commit(core)
    topics = set()
    while out := pulled(core, "s"):
        for packet in out:
            assert isinstance(packet, Publish) and packet.qos == 1 and packet.retain
            topics.add(packet.topic)
            core.puback("s", packet.packet_id or 0, now=2)
    assert topics == {f"r/{i}" for i in range(12)}


# -- would_store -------------------------------------------------------------------------


def test_would_store_says_whether_a_publish_writes_anything() -> None:
    core = BrokerCore()
    connect(core, "clean")
    sub(core, "clean", "c/#", qos=1)
    offline(core, "durable", "d/#")
    connect(core, "p")
    connect(core, "stored-pub", clean=False, expiry=600)

    def would(topic: str, qos: int = 1, retain: bool = False, who: str = "p") -> bool:
        packet = Publish(topic, b"x", qos, retain, False, 1 if qos else None, Properties())
        return core.would_store(who, packet)

    assert not would("c/t")  # to a clean session only
    assert not would("nobody")
    assert not would("c/t", qos=2)
    assert would("d/t")  # a stored session's delivery
    assert not would("d/t", qos=0)  # QoS 0 is not queued for an offline session
    assert would("c/t", retain=True)
    assert would("c/t", qos=2, who="stored-pub")  # its incoming QoS 2 id
