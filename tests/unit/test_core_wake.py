"""A subscriber is woken as soon as its oldest held delivery is durable, not only when the
flow pauses: with commits pipelined (a publisher's batches go to the store one after the
other), each commit lets out what it made durable."""

from __future__ import annotations

from edge_broker.core.broker import BrokerCore
from edge_broker.core.downlink import set_uplinks
from edge_broker.mqtt.packets import Connect, Publish, Subscribe, Subscription


def test_pipelined_commits_each_let_out_what_they_made_durable() -> None:
    core = BrokerCore()
    # Every message on t/# is recorded in the log for a bridge: each batch has a change,
    # so its deliveries wait for its commit (QoS 0 included).
    set_uplinks(core, [("bridge:central", ("t/#",))])
    for client_id in ("s", "p"):
        core.connect(Connect(client_id, 5, True, 60), client_id=client_id, now=0.0)
    core.subscribe("s", Subscribe(1, (Subscription("t/#", 0),)), now=0.0)
    core.committed(core.drain().number)
    numbers = []
    for n in range(3):  # three batches in flight at the store at once
        core.publish("p", Publish("t/x", b"%d" % n), now=0.0)
        numbers.append(core.drain().number)
    assert core.pull("s", now=0.0) == []  # nothing durable yet
    for n, number in enumerate(numbers):
        # Before: the wake waited for the newest batch, so nothing went out until the last
        # commit (under a continuous flow: never).
        assert core.committed(number) == ["s"]
        (packet,) = core.pull("s", now=0.0)
        assert isinstance(packet, Publish) and packet.payload == b"%d" % n
    assert core.pull("s", now=0.0) == []
