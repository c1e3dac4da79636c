"""BrokerCore semantics with time as an argument: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import (
    DeliveryDeleted,
    DeliverySaved,
    MessageSaved,
    SessionDeleted,
)
from edge_broker.mqtt.packets import (
    Connect,
    Publish,
    PubRel,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.types import ReasonCode
from edge_broker.store.memory import MemoryStore

V311, V5 = 4, 5


def connect(core: BrokerCore, client_id: str, *, now: float = 0.0, level: int = V5,
            clean: bool = True, expiry: int | None = None, will: Will | None = None,
            receive_maximum: int = 65535) -> int:
    props = Properties(session_expiry_interval=expiry) if expiry is not None else Properties()
    result = core.connect(Connect(client_id, level, clean, 60, will=will, properties=props),
                          client_id=client_id, now=now, receive_maximum=receive_maximum)
    return result.epoch


def commit(core: BrokerCore, store: MemoryStore | None = None) -> list[str]:
    batch = core.drain()
    if store is not None:
        store.apply(batch.changes)
    return core.committed(batch.number)


def sub(core: BrokerCore, client_id: str, topic_filter: str, qos: int = 1, *,
        sub_id: int | None = None, **options: bool | int) -> tuple[int, ...]:
    props = Properties(subscription_identifiers=(sub_id,)) if sub_id else Properties()
    packet = Subscribe(1, (Subscription(topic_filter, qos, **options),), props)  # type: ignore[arg-type]
    return core.subscribe(client_id, packet, now=0.0)


def pub(core: BrokerCore, client_id: str, topic: str, payload: bytes = b"x", qos: int = 0, *,
        packet_id: int | None = None, retain: bool = False, now: float = 0.0,
        props: Properties | None = None) -> int:
    if qos and packet_id is None:
        packet_id = 1
    packet = Publish(topic, payload, qos, retain, False, packet_id, props or Properties())
    return core.publish(client_id, packet, now=now)


def pulled(core: BrokerCore, client_id: str, now: float = 0.0) -> list[Publish | PubRel]:
    return core.pull(client_id, now=now)


def test_nothing_is_sent_before_the_batch_that_queued_it_commits() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "t")
    connect(core, "p")
    commit(core)
    pub(core, "p", "t", qos=1)
    assert pulled(core, "s") == []  # queued, but its batch is not durable yet
    assert commit(core) == ["s"]
    (packet,) = pulled(core, "s")
    assert isinstance(packet, Publish) and packet.topic == "t" and packet.packet_id == 1


def test_clean_sessions_write_nothing_persistent_sessions_write_their_deliveries() -> None:
    core = BrokerCore()
    connect(core, "clean")
    connect(core, "durable", clean=False, expiry=100)
    sub(core, "clean", "t")
    sub(core, "durable", "t")
    connect(core, "p")
    core.drain()
    pub(core, "p", "t", qos=1)
    changes = core.drain().changes
    assert [type(c) for c in changes] == [MessageSaved, DeliverySaved]
    assert changes[1].record.client_id == "durable"


def test_qos2_duplicate_publish_is_acknowledged_but_routed_once() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "t", qos=2)
    connect(core, "p")
    assert pub(core, "p", "t", qos=2, packet_id=7) == ReasonCode.SUCCESS
    assert pub(core, "p", "t", qos=2, packet_id=7) == ReasonCode.SUCCESS  # DUP resend
    commit(core)
    assert len(pulled(core, "s")) == 1
    assert core.pubrel("p", 7, now=0) == ReasonCode.SUCCESS
    assert core.pubrel("p", 7, now=0) == ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
    pub(core, "p", "t", qos=2, packet_id=7)  # the id is free again: a new message
    commit(core)
    assert len(pulled(core, "s")) == 1


def test_inflight_window_is_the_smaller_of_server_limit_and_receive_maximum() -> None:
    core = BrokerCore(CoreSettings(max_inflight_messages=3))
    connect(core, "s", receive_maximum=2)
    sub(core, "s", "t")
    connect(core, "p")
    for i in range(5):
        pub(core, "p", "t", qos=1, packet_id=i + 1)
    commit(core)
    first = pulled(core, "s")
    assert [p.packet_id for p in first] == [1, 2]
    assert pulled(core, "s") == []
    core.puback("s", 1, now=0)
    assert [p.packet_id for p in pulled(core, "s")] == [3]


@pytest.mark.parametrize(("policy", "kept", "dropped", "refused"), [
    ("drop-oldest", [b"0", b"4", b"5"], 3, 0),
    ("drop-newest", [b"0", b"1", b"2"], 3, 0),
    ("refuse", [b"0", b"1", b"2"], 0, 3),
])
def test_full_queue_applies_the_policy_and_counts_it(policy: str, kept: list[bytes],
                                                     dropped: int, refused: int) -> None:
    core = BrokerCore(CoreSettings(max_inflight_messages=1, max_queued_messages=2,
                                   queue_full_policy=policy))
    connect(core, "s")
    sub(core, "s", "t")
    connect(core, "p")
    pub(core, "p", "t", b"0", qos=1, packet_id=1)
    commit(core)
    (first,) = pulled(core, "s")  # inflight now (never dropped); the queue is empty
    codes = [pub(core, "p", "t", str(i).encode(), qos=1, packet_id=i + 1) for i in range(1, 6)]
    commit(core)
    # A subscriber whose queue dropped the message still matched it: never 0x10.
    assert codes == [0, 0] + [ReasonCode.QUOTA_EXCEEDED if refused else 0] * 3
    assert core.stats.publish_dropped == core.stats.dropped_queue_full == dropped
    assert core.sessions["s"].dropped == dropped
    assert core.stats.refused_queue_full == refused
    assert core.take_drop_reports(0.0) == ([("s", dropped)] if dropped else [])
    core.puback("s", first.packet_id or 0, now=0)
    received = [b"0"]
    while packets := pulled(core, "s"):
        for packet in packets:
            assert isinstance(packet, Publish)
            received.append(packet.payload)
            core.puback("s", packet.packet_id or 0, now=0)
    assert received == kept


def test_queued_bytes_bound_counts_payload_bytes() -> None:
    core = BrokerCore(CoreSettings(max_queued_messages=0, max_queued_bytes=10))
    connect(core, "s")
    sub(core, "s", "t", qos=0)
    connect(core, "p")
    for _ in range(4):
        pub(core, "p", "t", b"abcd")
    assert core.stats.publish_dropped == 2


def test_overlapping_subscriptions_give_one_copy_with_every_identifier() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "a/+", qos=0, sub_id=1)
    sub(core, "s", "a/#", qos=2, sub_id=2)
    connect(core, "p")
    pub(core, "p", "a/b", qos=2, packet_id=3)
    commit(core)
    (packet,) = pulled(core, "s")
    assert isinstance(packet, Publish)
    assert packet.qos == 2  # the highest granted [MQTT-3.3.5-1] (3.1.1)
    assert sorted(packet.properties.subscription_identifiers) == [1, 2]


def test_no_local_suppresses_only_the_publishers_own_copy() -> None:
    core = BrokerCore()
    connect(core, "a")
    connect(core, "b")
    sub(core, "a", "t", no_local=True)
    sub(core, "b", "t")
    pub(core, "a", "t")
    commit(core)
    assert pulled(core, "a") == []
    assert len(pulled(core, "b")) == 1


def test_retained_message_delivered_on_subscribe_then_cleared() -> None:
    core = BrokerCore()
    connect(core, "p")
    pub(core, "p", "r/1", b"on", qos=1, retain=True)
    connect(core, "s")
    sub(core, "s", "r/#")
    commit(core)
    (packet,) = pulled(core, "s")
    assert isinstance(packet, Publish) and packet.retain and packet.payload == b"on"
    pub(core, "p", "r/1", b"", retain=True)
    assert core.retained.get("r/1") is None


@pytest.mark.parametrize(("handling", "resubscribe_gets"), [(0, 1), (1, 0), (2, 0)])
def test_retain_handling(handling: int, resubscribe_gets: int) -> None:
    core = BrokerCore()
    connect(core, "p")
    pub(core, "p", "r", b"v", retain=True)
    connect(core, "s")
    sub(core, "s", "r", retain_handling=handling)
    commit(core)
    assert len(pulled(core, "s")) == (0 if handling == 2 else 1)
    sub(core, "s", "r", retain_handling=handling)  # the subscription exists now
    commit(core)
    assert len(pulled(core, "s")) == resubscribe_gets


def test_will_waits_for_its_delay() -> None:
    core = BrokerCore()
    connect(core, "w")
    sub(core, "w", "will")
    will = Will("will", b"gone", 0, False, Properties(will_delay_interval=5))
    epoch = connect(core, "d", clean=False, expiry=60, will=will)
    core.disconnect("d", epoch, now=100.0)
    core.tick(104.0)
    commit(core)
    assert pulled(core, "w") == []
    assert core.next_deadline() == 105.0
    core.tick(105.0)
    commit(core)
    assert [p.payload for p in pulled(core, "w")] == [b"gone"]  # type: ignore[union-attr]


def test_will_goes_when_the_session_ends_before_the_delay() -> None:
    core = BrokerCore()
    connect(core, "w")
    sub(core, "w", "will")
    will = Will("will", b"gone", 0, False, Properties(will_delay_interval=600))
    epoch = connect(core, "d", clean=False, expiry=10, will=will)
    core.disconnect("d", epoch, now=100.0)
    core.tick(110.0)
    commit(core)
    assert [p.payload for p in pulled(core, "w")] == [b"gone"]  # type: ignore[union-attr]
    assert "d" not in core.sessions
    assert core.stats.clients_expired == 1


def test_reconnect_within_the_will_delay_cancels_the_will() -> None:
    core = BrokerCore()
    connect(core, "w")
    sub(core, "w", "will")
    will = Will("will", b"gone", 0, False, Properties(will_delay_interval=5))
    epoch = connect(core, "d", clean=False, expiry=60, will=will)
    core.disconnect("d", epoch, now=100.0)
    connect(core, "d", now=102.0, clean=False, expiry=60)
    core.tick(200.0)
    commit(core)
    assert pulled(core, "w") == []


def test_normal_disconnect_deletes_the_will_and_0x04_sends_it() -> None:
    core = BrokerCore()
    connect(core, "w")
    sub(core, "w", "will")
    will = Will("will", b"gone")
    core.disconnect("a", connect(core, "a", will=will), now=1, reason_code=0)
    core.disconnect("b", connect(core, "b", will=will), now=1, reason_code=0x04)
    commit(core)
    assert len(pulled(core, "w")) == 1


def test_takeover_reports_it_and_ignores_the_stale_connection() -> None:
    core = BrokerCore()
    first = connect(core, "c", clean=False, expiry=60)
    sub(core, "c", "t")
    result = core.connect(Connect("c", V5, False, 60,
                                  properties=Properties(session_expiry_interval=60)),
                          client_id="c", now=1)
    assert result.taken_over and result.session_present
    core.disconnect("c", first, now=2)  # the old connection's close arrives late
    assert core.sessions["c"].online


def test_session_expiry_ends_an_offline_session() -> None:
    core = BrokerCore()
    epoch = connect(core, "d", clean=False, expiry=30)
    sub(core, "d", "t")
    core.disconnect("d", epoch, now=0)
    core.tick(29.0)
    assert "d" in core.sessions
    core.tick(30.0)
    assert "d" not in core.sessions
    assert core.router.count == 0
    assert SessionDeleted("d") in core.drain().changes


def test_v311_clean_session_0_never_expires_unless_configured() -> None:
    core = BrokerCore(CoreSettings(persistent_client_expiration=3600))
    epoch = connect(core, "old", level=V311, clean=False)
    core.disconnect("old", epoch, now=0)
    assert core.sessions["old"].expires_at == 3600


def test_message_expiry_counts_down_while_queued() -> None:
    core = BrokerCore()
    epoch = connect(core, "d", clean=False, expiry=600)
    sub(core, "d", "t")
    core.disconnect("d", epoch, now=0)
    connect(core, "p")
    pub(core, "p", "t", b"short", qos=1, now=0, props=Properties(message_expiry_interval=5))
    pub(core, "p", "t", b"long", qos=1, packet_id=2, now=0,
        props=Properties(message_expiry_interval=60))
    commit(core)
    connect(core, "d", now=20.0, clean=False, expiry=600)
    (packet,) = pulled(core, "d", now=20.0)
    assert isinstance(packet, Publish) and packet.payload == b"long"
    assert packet.properties.message_expiry_interval == 40  # [MQTT-3.3.2-6] (5.0)
    assert core.stats.messages_expired == 1


def test_offline_qos0_is_not_queued_unless_configured() -> None:
    for queue_qos0, expected in ((False, 0), (True, 1)):
        core = BrokerCore(CoreSettings(queue_qos0_messages=queue_qos0))
        epoch = connect(core, "d", clean=False, expiry=60)
        sub(core, "d", "t", qos=0)
        core.disconnect("d", epoch, now=0)
        connect(core, "p")
        pub(core, "p", "t")
        commit(core)
        connect(core, "d", clean=False, expiry=60)
        assert len(pulled(core, "d")) == expected


def test_unsubscribe_reports_missing_subscriptions() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "a")
    codes = core.unsubscribe("s", Unsubscribe(2, ("a", "b", "a/#/b")), now=0)
    assert codes == (ReasonCode.SUCCESS, ReasonCode.NO_SUBSCRIPTION_EXISTED,
                     ReasonCode.TOPIC_FILTER_INVALID)


def test_sys_topics_are_refused_to_clients() -> None:
    core = BrokerCore()
    connect(core, "s")
    sub(core, "s", "$SYS/#")
    connect(core, "p")
    assert pub(core, "p", "$SYS/broker/uptime", qos=1) == ReasonCode.NOT_AUTHORIZED
    core.publish_internal("$SYS/broker/uptime", b"5 seconds", now=0, retain=True)
    commit(core)
    assert [p.payload for p in pulled(core, "s")] == [b"5 seconds"]  # type: ignore[union-attr]


async def test_restart_from_a_store_resends_inflight_with_dup_in_order() -> None:
    store = MemoryStore()
    core = BrokerCore()
    epoch = connect(core, "d", clean=False, expiry=600)
    sub(core, "d", "t", qos=2)
    connect(core, "p")
    for i in range(3):
        pub(core, "p", "t", str(i).encode(), qos=1, packet_id=i + 1)
    commit(core, store)
    sent = pulled(core, "d")
    commit(core, store)
    assert [p.packet_id for p in sent] == [1, 2, 3]
    core.puback("d", 2, now=0)
    core.disconnect("d", epoch, now=1)
    pub(core, "p", "t", b"3", qos=1, packet_id=4)  # queued while offline
    commit(core, store)

    restarted = BrokerCore()
    restarted.restore(await store.open(), now=10)
    connect(restarted, "d", now=10, clean=False, expiry=600)
    again = pulled(restarted, "d", now=10)
    assert [(p.packet_id, p.payload, p.dup) for p in again] == [  # type: ignore[union-attr]
        (1, b"0", True), (3, b"2", True), (2, b"3", False)]
    assert [type(c) for c in restarted.drain().changes].count(DeliveryDeleted) == 0


def test_a_clean_start_takeover_is_not_ended_by_the_old_connections_close() -> None:
    core = BrokerCore()
    old = connect(core, "x")
    result = core.connect(Connect("x", V5, True, 60), client_id="x", now=1)
    assert result.taken_over and not result.session_present
    core.disconnect("x", old, now=2)  # the replaced connection's close arrives late
    assert core.sessions["x"].online
    assert sub(core, "x", "t") == (1,)


def test_qos0_fan_out_shares_one_packet_between_subscribers() -> None:
    core = BrokerCore()
    for name in ("a", "b"):
        connect(core, name)
        sub(core, name, "t", qos=0)
    connect(core, "p")
    pub(core, "p", "t")
    commit(core)
    (first,) = pulled(core, "a")
    (second,) = pulled(core, "b")
    assert first is second  # encoded once by the server for both


def test_a_body_is_saved_again_in_any_later_batch_that_refers_to_it() -> None:
    # A store may drop a body at the end of a batch once nothing refers to it; a later batch
    # that refers to it again (here: a retained message still to be sent on SUBSCRIBE when
    # its persistent session disconnects, so it is queued then) must carry it.
    core = BrokerCore()
    connect(core, "p")
    pub(core, "p", "t", qos=1, retain=True)
    first = core.drain().changes
    assert sum(isinstance(c, MessageSaved) for c in first) == 1
    epoch = connect(core, "d", clean=False, expiry=60)
    sub(core, "d", "t")
    commit(core)
    core.disconnect("d", epoch, now=1)
    later = core.drain().changes
    saved = [c for c in later if isinstance(c, MessageSaved)]
    deliveries = [c for c in later if isinstance(c, DeliverySaved)]
    assert len(saved) == 1 and [d.record.client_id for d in deliveries] == ["d"]
    assert later.index(saved[0]) < later.index(deliveries[0])


def test_a_batch_with_nothing_to_store_goes_out_before_earlier_commits_but_in_order() -> None:
    """Under load other clients' commits are pending; a delivery that nothing stores need not
    wait for them, but it never overtakes a delivery queued before it in the same session."""
    core = BrokerCore()
    connect(core, "durable", level=V5, clean=False, expiry=600)
    sub(core, "durable", "t/#", qos=1)
    connect(core, "fast")
    sub(core, "fast", "t/fast", qos=0)
    commit(core)
    connect(core, "p")
    pub(core, "p", "t/slow", b"stored", qos=1)  # queued for the persistent session: stored
    stored = core.drain()
    assert stored.changes
    pub(core, "p", "t/fast", b"free", qos=0)  # stored for nobody: a batch with no changes
    free = core.drain()
    assert not free.changes
    woken = core.committed(stored.number - 1)  # the stored batch is still pending
    assert "fast" in woken
    assert [p.payload for p in pulled(core, "fast")] == [b"free"]
    # The persistent session got both, in order: the free one waits behind the stored one.
    assert pulled(core, "durable") == []
    core.committed(free.number)
    assert [p.payload for p in pulled(core, "durable")] == [b"stored", b"free"]
