"""No client can stall the others with packets that are each a lot of work (issue 7's fairness,
continued): the per-turn budget counts work, not packets (server/client.py `_cost`), and a
wildcard filter is matched against the retained messages by a tree (core/retain.py), not a
scan of all of them. Found by an adversarial review (round 14); each attack below held every
other client for tens of seconds before:

- SUBSCRIBE / UNSUBSCRIBE packets of 200 wildcard filters, with 20,000 retained messages
  elsewhere (each filter was matched against every one of them);
- MQTT 5 PUBLISH packets with 2,000 user properties each;
- one client holding 16,384 overlapping subscriptions ({a,+}^14/#), publishing to topics that
  all of them match.

The control client's QoS 1 round trips must each be answered within test_fairness.py's
generous ROUND_TRIP_S, as for the floods there.
"""

from __future__ import annotations

import contextlib
import itertools

from tests.integration.brokerprocess import BrokerProcess
from tests.integration.rawclient import (
    connect,
    props,
    publish_packet,
    subscribe_packet,
    unsubscribe_packet,
)
from tests.integration.test_fairness import (
    Load,
    control_round_trips,
    flooding,
    needs_console_script,
)
from tests.integration.test_fairness import broker_process as broker_process  # a fixture

pytestmark = needs_console_script


def test_subscribes_of_many_wildcard_filters_with_many_retained_messages(
        broker_process: BrokerProcess) -> None:
    port = broker_process.port
    setter = connect(port, "retainer")
    for start in range(0, 20_000, 2_000):  # none of them under zz/
        setter.sock.sendall(b"".join(publish_packet(f"rt/{i}/v", b"r", retain=True)
                                     for i in range(start, start + 2_000)))
    setter.publish_acked("rt/last/v", b"r", qos=1, retain=True)  # all handled before it
    setter.close()
    filters = [(f"zz/+/i{n}", 0) for n in range(199)] + [("zz/+/i", 0)]
    ids = itertools.count(1)
    block = b"".join(subscribe_packet(next(ids), filters) + unsubscribe_packet(
        next(ids), [f for f, _ in filters]) for _ in range(4))
    with Load(flooding(port, "subscriber", block), threads=1) as load:
        load.wait_started(at_least=5)
        control_round_trips(port)
        assert load.progress > 5
    assert not load.errors, load.errors


def test_publishes_with_thousands_of_user_properties(broker_process: BrokerProcess) -> None:
    port = broker_process.port
    heavy = props(user_properties=[(f"k{i}", "v") for i in range(2_000)])
    block = publish_packet("up/t", b"p", version=5, properties=heavy) * 8
    with Load(flooding(port, "propertied", block, version=5), threads=1) as load:
        load.wait_started(at_least=5)
        control_round_trips(port)
        assert load.progress > 5
    assert not load.errors, load.errors


def test_publishes_matching_thousands_of_one_clients_subscriptions(
        broker_process: BrokerProcess) -> None:
    port = broker_process.port
    levels = 14
    filters = ["/".join("+" if mask >> bit & 1 else "a" for bit in range(levels)) + "/#"
               for mask in range(2 ** levels)]
    holder = connect(port, "overlapping")
    for chunk in range(0, len(filters), 1024):
        codes = holder.subscribe(*filters[chunk:chunk + 1024])
        assert all(code == 0 for code in codes)
    prefix = "/".join(["a"] * levels)
    block = b"".join(publish_packet(f"{prefix}/{n}", b"x") for n in range(256))

    def flood(load: Load) -> None:  # the holder publishes, and does not read what it gets
        holder.sock.settimeout(1.0)
        while not load.stop.is_set():
            with contextlib.suppress(TimeoutError):
                holder.sock.sendall(block)
                load.count()

    with Load(flood, threads=1) as load:
        load.wait_started(at_least=5)
        control_round_trips(port)
        assert load.progress > 5
    holder.close()
    assert not load.errors, load.errors
