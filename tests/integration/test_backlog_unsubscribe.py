"""UNSUBSCRIBE while a persistent session still has messages queued in its backlog (the log,
core/backlog.py). The queue bounds counted them as queued for the session, and each backlog row
is to become "the delivery the publish would have made" (docs/architecture.md): so, as for the
in-memory queue, an UNSUBSCRIBE stops new messages [MQTT-3.10.4-2] (3.1.1) but does not take
back what was already queued (docs/log.md, "Sessions' backlogs"; the property test
tests/property/test_session_model.py models it so, and found this with its seed
151205217380959987389261017100868179863)."""

from __future__ import annotations

from collections.abc import Callable

from edge_broker.mqtt.packets import Publish
from tests.conftest import BrokerThread
from tests.integration.rawclient import PUBACK, connect

MakeBroker = Callable[..., BrokerThread]


def test_unsubscribe_keeps_what_the_backlog_already_queued(make_broker: MakeBroker) -> None:
    broker = make_broker(max_inflight_messages=3)
    device = connect(broker.port, "dev", version=4, clean=False)
    assert device.subscribe(("t/#", 1)) == (1,)
    device.disconnect()
    publisher = connect(broker.port, "app", version=4)
    for n in range(4):  # offline: into the log, the session's backlog
        assert publisher.publish_acked("t/a", b"m%d" % n, qos=1) == 0
    device = connect(broker.port, "dev", version=4, clean=False)
    first = [device.expect_publish() for _ in range(3)]  # the inflight window
    assert [p.payload for p in first] == [b"m0", b"m1", b"m2"]
    device.unsubscribe("t/#")  # m3 is still queued (in the backlog)
    device.disconnect()
    device = connect(broker.port, "dev", version=4, clean=False)
    resent = [device.expect_publish() for _ in range(3)]  # [MQTT-4.4.0-1] (3.1.1)
    assert [(p.payload, p.dup) for p in resent] == [(b"m0", True), (b"m1", True), (b"m2", True)]
    for packet in resent:
        assert packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    last = device.read(10.0)
    assert isinstance(last, Publish) and last.payload == b"m3", last
    device.disconnect()
    publisher.disconnect()


def test_subscribing_again_keeps_the_qos_the_backlog_queued_at(make_broker: MakeBroker) -> None:
    """SUBSCRIBE again to the same filter at QoS 0 replaces the subscription [MQTT-3.8.4-3]
    (3.1.1), but the QoS 1 messages already queued for it stay QoS 1 deliveries: they must
    not be read back at QoS 0 (and then skipped as QoS 0 messages published while offline).
    Found by the session model (a v5 subscriber lowering its subscription's QoS)."""
    broker = make_broker(max_inflight_messages=3)
    device = connect(broker.port, "dev", version=4, clean=False)
    assert device.subscribe(("t/#", 1)) == (1,)
    device.disconnect()
    publisher = connect(broker.port, "app", version=4)
    for n in range(5):
        assert publisher.publish_acked("t/a", b"m%d" % n, qos=1) == 0
    device = connect(broker.port, "dev", version=4, clean=False)
    assert [device.expect_publish().payload for _ in range(3)] == [b"m0", b"m1", b"m2"]
    assert device.subscribe(("t/#", 0)) == (0,)
    device.disconnect()
    device = connect(broker.port, "dev", version=4, clean=False)
    resent = [device.expect_publish() for _ in range(3)]
    for packet in resent:
        assert packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    rest = [device.read(10.0) for _ in range(2)]
    assert [(p.payload, p.qos) for p in rest if isinstance(p, Publish)] == [
        (b"m3", 1), (b"m4", 1)], rest
    publisher.publish_acked("t/a", b"new", qos=1)  # the new subscription: QoS 0
    new = device.read(10.0)
    assert isinstance(new, Publish) and (new.payload, new.qos) == (b"new", 0), new
    device.disconnect()
    publisher.disconnect()


def test_qos0_dropped_at_disconnect_no_longer_count_against_the_bound(
        make_broker: MakeBroker) -> None:
    """QoS 0 messages queued (in the backlog) for a connected session are dropped when it goes
    offline (docs/configuration.md, queue_qos0_messages = false): they must stop counting
    against max_queued_messages, or drop-oldest drops a queued QoS 1 message for them."""
    broker = make_broker(max_inflight_messages=2, max_queued_messages=3)
    device = connect(broker.port, "dev", version=4, clean=False)
    assert device.subscribe(("t/#", 1)) == (1,)
    device.disconnect()
    publisher = connect(broker.port, "app", version=4)
    for n in range(3):
        assert publisher.publish_acked("t/a", b"m%d" % n, qos=1) == 0
    device = connect(broker.port, "dev", version=4, clean=False)
    assert [device.expect_publish().payload for _ in range(2)] == [b"m0", b"m1"]
    for n in range(2):  # queued behind m2, then dropped when the session goes offline
        publisher.publish("t/a", b"z%d" % n)
    publisher.ping()
    device.disconnect()
    device = connect(broker.port, "dev", version=4, clean=False)
    resent = [device.expect_publish() for _ in range(2)]
    assert publisher.publish_acked("t/a", b"n0", qos=1) == 0  # 2 queued: m2, n0
    for packet in resent:
        assert packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    got = [device.read(10.0) for _ in range(2)]
    assert [p.payload for p in got if isinstance(p, Publish)] == [b"m2", b"n0"], got
    device.disconnect()
    publisher.disconnect()


def test_a_restart_keeps_what_the_backlog_queued_before_an_unsubscribe(
        make_broker: MakeBroker) -> None:
    """The range an UNSUBSCRIBE left to read (`Backlog.closing`) is stored with it: after a
    restart the rows it had queued are still delivered. The session model found it with
    --hypothesis-seed=199989810990584528986420156190249654342 (150 examples)."""
    broker = make_broker(max_inflight_messages=2)
    device = connect(broker.port, "dev", version=4, clean=False)
    assert device.subscribe(("t/#", 1)) == (1,)
    device.disconnect()
    publisher = connect(broker.port, "app", version=4)
    for n in range(4):
        assert publisher.publish_acked("t/a", b"m%d" % n, qos=1) == 0
    publisher.disconnect()
    device = connect(broker.port, "dev", version=4, clean=False)
    assert [device.expect_publish().payload for _ in range(2)] == [b"m0", b"m1"]
    device.unsubscribe("t/#")  # m2 and m3 are still queued (in the backlog)
    device.disconnect()
    broker.stop()
    broker = make_broker(max_inflight_messages=2)  # the same data directory
    device = connect(broker.port, "dev", version=4, clean=False)
    resent = [device.expect_publish() for _ in range(2)]
    assert [(p.payload, p.dup) for p in resent] == [(b"m0", True), (b"m1", True)]
    for packet in resent:
        assert packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    got = [device.read(10.0) for _ in range(2)]
    assert [p.payload for p in got if isinstance(p, Publish)] == [b"m2", b"m3"], got
    device.disconnect()


def test_a_restart_keeps_the_qos_and_the_gap_of_a_subscription_made_again(
        make_broker: MakeBroker) -> None:
    """SUBSCRIBE again at QoS 0 while QoS 1 rows are queued, then UNSUBSCRIBE and SUBSCRIBE
    once more (QoS 1), then a restart: the rows queued before stay QoS 1 deliveries, a
    message published while it was unsubscribed is not delivered [MQTT-3.10.4-2] (3.1.1),
    and one published after the last SUBSCRIBE is (the since of the subscription made again
    is stored with the ranges)."""
    broker = make_broker(max_inflight_messages=2)
    device = connect(broker.port, "dev", version=4, clean=False)
    assert device.subscribe(("t/#", 1)) == (1,)
    device.disconnect()
    publisher = connect(broker.port, "app", version=4)
    for n in range(4):
        assert publisher.publish_acked("t/a", b"m%d" % n, qos=1) == 0
    device = connect(broker.port, "dev", version=4, clean=False)
    assert [device.expect_publish().payload for _ in range(2)] == [b"m0", b"m1"]
    assert device.subscribe(("t/#", 0)) == (0,)
    device.unsubscribe("t/#")
    assert publisher.publish_acked("t/a", b"gap", qos=1) == 0  # not subscribed: not for it
    assert device.subscribe(("t/#", 1)) == (1,)
    assert publisher.publish_acked("t/a", b"new", qos=1) == 0
    device.disconnect()
    publisher.disconnect()
    broker.stop()
    broker = make_broker(max_inflight_messages=2)  # the same data directory
    device = connect(broker.port, "dev", version=4, clean=False)
    resent = [device.expect_publish() for _ in range(2)]
    assert [(p.payload, p.dup) for p in resent] == [(b"m0", True), (b"m1", True)]
    for packet in resent:
        assert packet.packet_id is not None
        device.ack(PUBACK, packet.packet_id)
    got = []
    for _ in range(3):
        packet = device.read(10.0)
        assert isinstance(packet, Publish), (got, packet)
        got.append((packet.payload, packet.qos))
        if packet.packet_id is not None:
            device.ack(PUBACK, packet.packet_id)
    assert got == [(b"m2", 1), (b"m3", 1), (b"new", 1)]
    device.expect_nothing()
    device.disconnect()
