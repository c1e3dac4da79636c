"""Black-box, hand-built bytes: topic wildcards, retained messages, overlapping and shared
subscriptions.

Spec references name their version: [MQTT-x.y.z-n] (3.1.1) or (5.0).
"""

from __future__ import annotations

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    PUBLISH,
    RawClient,
    connect,
    props,
    sub_options,
    subscriber,
    unique_id,
)

both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


def drain(client: RawClient, quiet_s: float = 0.15) -> list[tuple[str, bytes]]:
    """Every PUBLISH that arrives until `quiet_s` passes without one (QoS 0 only).

    Call it after the publisher's PINGREQ was answered: the broker writes the deliveries in
    the same event-loop step as the PINGRESP, so they are in the socket buffer by then.
    """
    got = []
    while (packet := client.read(quiet_s)) is not None:
        assert packet.packet_type == PUBLISH, packet
        got.append((packet.topic, packet.payload))
    return got


# -- wildcards --------------------------------------------------------------------------


@both_versions
def test_single_and_multi_level_wildcards(broker: BrokerThread, version: int) -> None:
    plus = subscriber(broker.port, unique_id(), "a/+/c", version=version)
    hash_ = subscriber(broker.port, unique_id(), "a/#", version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    topics = ["a/b/c", "a/x/c", "a/b/d", "a/b/c/d", "a", "b/a/c", "a/", "a//c"]
    for topic in topics:
        publisher.publish(topic, topic.encode())
    publisher.ping()
    # "+" matches exactly one level, an empty one too (4.7.1.3, 3.1.1 and 5.0).
    assert [t for t, _ in drain(plus)] == ["a/b/c", "a/x/c", "a//c"]
    # "#" matches any number of levels, and the parent level itself ("a/#" matches "a")
    # (4.7.1.2, 3.1.1 and 5.0).
    assert [t for t, _ in drain(hash_)] == ["a/b/c", "a/x/c", "a/b/d", "a/b/c/d", "a", "a/",
                                             "a//c"]


@both_versions
def test_dollar_topics_not_matched_by_leading_wildcards(broker: BrokerThread,
                                                        version: int) -> None:
    # [MQTT-4.7.2-1] (3.1.1) and (5.0): a filter starting with a wildcard does not match a
    # topic starting with "$".
    wild = subscriber(broker.port, unique_id(), "#", "+/bar", "+/+", version=version)
    dollar = subscriber(broker.port, unique_id(), "$foo/#", "$foo/+", version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish("$foo/bar", b"dollar")
    publisher.publish("foo/bar", b"plain")
    publisher.ping()
    assert drain(wild) == [("foo/bar", b"plain")]  # one copy for three matches
    assert drain(dollar) == [("$foo/bar", b"dollar")]
    # The same holds for retained messages sent on subscribe.
    publisher.publish_acked("$foo/kept", b"dollar", qos=1, retain=True)
    publisher.publish_acked("foo/kept", b"plain", qos=1, retain=True)
    late = connect(broker.port, unique_id(), version=version)
    late.subscribe("#")
    assert drain(late) == [("foo/kept", b"plain")]
    late.subscribe("+/kept")
    assert drain(late) == [("foo/kept", b"plain")]


@both_versions
def test_unsubscribe_stops_delivery(broker: BrokerThread, version: int) -> None:
    client = subscriber(broker.port, unique_id(), "un/a", "un/b", version=version)
    client.unsubscribe("un/a")
    client.publish("un/a", b"gone")
    client.publish("un/b", b"kept")
    assert client.expect_publish().payload == b"kept"  # [MQTT-3.10.4-2] (3.1.1)
    client.expect_nothing()


# -- retained messages ------------------------------------------------------------------


@both_versions
def test_retained_message_is_sent_on_subscribe(broker: BrokerThread, version: int) -> None:
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish_acked("r/one", b"v1", qos=1, retain=True)
    publisher.publish_acked("r/one", b"v2", qos=1, retain=True)  # replaces v1
    # [MQTT-3.3.1-5] (3.1.1): stored; [MQTT-3.3.1-6] (3.1.1): sent to a new subscription,
    # with RETAIN 1 [MQTT-3.3.1-8] (3.1.1), at the lower of the two QoS.
    late = connect(broker.port, unique_id(), version=version)
    late.subscribe(("r/#", 1))
    message = late.expect_publish()
    assert (message.topic, message.payload, message.retain, message.qos) == (
        "r/one", b"v2", True, 1)
    late.ack(4, message.packet_id)
    late.expect_nothing()
    qos0 = connect(broker.port, unique_id(), version=version)
    qos0.subscribe("r/one")
    assert qos0.expect_raw(PUBLISH) == b"\x31" + bytes((9 + (version == 5),)) + (
        b"\x00\x05r/one" + (b"\x00" if version == 5 else b"") + b"v2")


@both_versions
def test_empty_retained_payload_clears_the_retained_message(broker: BrokerThread,
                                                            version: int) -> None:
    existing = subscriber(broker.port, unique_id(), "r/clear", version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish("r/clear", b"keep", retain=True)
    publisher.publish("r/clear", b"", retain=True)
    publisher.ping()
    # The empty message still goes to existing subscribers as a normal message
    # [MQTT-3.3.1-10] (3.1.1).
    assert drain(existing) == [("r/clear", b"keep"), ("r/clear", b"")]
    # [MQTT-3.3.1-10] / [MQTT-3.3.1-11] (3.1.1), [MQTT-3.3.1-6] / [MQTT-3.3.1-7] (5.0):
    # nothing retained any more, and the empty message is not retained either.
    late = connect(broker.port, unique_id(), version=version)
    late.subscribe("r/#")
    late.expect_nothing()


def test_v311_retain_flag_is_zero_for_established_subscriptions(broker: BrokerThread) -> None:
    # [MQTT-3.3.1-9] (3.1.1): RETAIN 0 when a message matches an established subscription.
    existing = subscriber(broker.port, unique_id(), "r/flag")
    publisher = connect(broker.port, unique_id())
    publisher.publish("r/flag", b"x", retain=True)
    assert existing.expect_raw(PUBLISH) == b"\x30\x09\x00\x06r/flagx"
    # ... and RETAIN 1 for the copy sent because of a new subscription [MQTT-3.3.1-8].
    late = subscriber(broker.port, unique_id(), "r/flag")
    assert late.expect_raw(PUBLISH) == b"\x31\x09\x00\x06r/flagx"


def test_v5_retain_handling(broker: BrokerThread) -> None:
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("rh/t", b"kept", qos=1, retain=True)
    client = connect(broker.port, unique_id(), version=5)
    # 0: send at subscribe, every time [MQTT-3.3.1-9] (5.0).
    client.subscribe(("rh/t", sub_options(retain_handling=0)))
    assert client.expect_publish().payload == b"kept"
    client.subscribe(("rh/t", sub_options(retain_handling=0)))
    assert client.expect_publish().payload == b"kept"
    # 1: only if the subscription did not exist [MQTT-3.3.1-10] (5.0).
    client.subscribe(("rh/+", sub_options(retain_handling=1)))
    assert client.expect_publish().payload == b"kept"
    client.subscribe(("rh/+", sub_options(retain_handling=1)))
    client.expect_nothing()
    # 2: never [MQTT-3.3.1-11] (5.0).
    client.subscribe(("rh/#", sub_options(retain_handling=2)))
    client.expect_nothing()
    # The subscription works nevertheless (one copy for the three matching filters).
    publisher.publish("rh/t", b"live")
    assert client.expect_publish().payload == b"live"
    client.expect_nothing()


def test_v5_retain_as_published(broker: BrokerThread) -> None:
    as_published = subscriber(broker.port, unique_id(),
                              ("rap/t", sub_options(retain_as_published=True)), version=5)
    cleared = subscriber(broker.port, unique_id(), ("rap/t", sub_options()), version=5)
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish("rap/t", b"r", retain=True)
    publisher.publish("rap/t", b"n", retain=False)
    # [MQTT-3.3.1-13] (5.0): the RETAIN flag as published; [MQTT-3.3.1-12] (5.0): else 0.
    first, second = as_published.expect_publish(), as_published.expect_publish()
    assert (first.payload, first.retain, second.payload, second.retain) == (
        b"r", True, b"n", False)
    first, second = cleared.expect_publish(), cleared.expect_publish()
    assert (first.retain, second.retain) == (False, False)


# -- overlapping subscriptions ----------------------------------------------------------


def test_v311_overlapping_subscriptions_one_copy_at_highest_qos(broker: BrokerThread) -> None:
    # [MQTT-3.3.5-1] (3.1.1): the maximum QoS of all matching subscriptions.
    client = connect(broker.port, unique_id())
    assert client.subscribe(("ov/#", 0)) == (0,)
    assert client.subscribe(("ov/+", 2)) == (2,)
    assert client.subscribe(("ov/x", 1)) == (1,)
    publisher = connect(broker.port, unique_id())
    publisher.publish_acked("ov/x", b"m", qos=2)
    message = client.expect_publish()
    assert (message.topic, message.qos) == ("ov/x", 2)
    client.expect_nothing()


def test_v5_overlapping_subscriptions_carry_every_subscription_identifier(
        broker: BrokerThread) -> None:
    client = connect(broker.port, unique_id(), version=5)
    client.subscribe(("ov/#", 0), properties=props(subscription_identifier=1))
    client.subscribe(("ov/+", 1), properties=props(subscription_identifier=2))
    client.subscribe(("ov/y", 0))  # no identifier
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("ov/x", b"m", qos=1)
    message = client.expect_publish()
    # [MQTT-3.3.4-4] (5.0): one copy with the identifiers of every matching subscription.
    assert sorted(message.properties.subscription_identifiers) == [1, 2]
    assert message.qos == 1
    client.expect_nothing()
    publisher.publish("ov/y", b"m2")
    message = client.expect_publish()
    assert sorted(message.properties.subscription_identifiers) == [1, 2]
    client.expect_nothing()


# -- shared subscriptions ---------------------------------------------------------------


@both_versions
def test_shared_subscription_spreads_messages_over_members(broker: BrokerThread,
                                                           version: int) -> None:
    # 4.8.2 (5.0): each message goes to exactly one member of the group.
    members = [subscriber(broker.port, unique_id(), "$share/g/sh/t", version=version)
               for _ in range(2)]
    plain = subscriber(broker.port, unique_id(), "sh/t", version=version)
    publisher = connect(broker.port, unique_id(), version=version)
    sent = [f"m{i}".encode() for i in range(10)]
    for payload in sent:
        publisher.publish("sh/t", payload)
    publisher.ping()
    received = [drain(member) for member in members]
    assert all(received), received  # both got some
    payloads = [p for got in received for _, p in got]
    assert sorted(payloads) == sorted(sent)  # each exactly once
    assert [p for _, p in drain(plain)] == sent  # a normal subscription still gets all


@both_versions
def test_shared_subscribe_gets_no_retained_messages(broker: BrokerThread, version: int) -> None:
    publisher = connect(broker.port, unique_id(), version=version)
    publisher.publish_acked("sh/r", b"retained", qos=1, retain=True)
    member = connect(broker.port, unique_id(), version=version)
    member.subscribe("$share/g/sh/r")
    member.expect_nothing()  # 4.8.2 (5.0): no retained messages for a shared subscription
    publisher.publish("sh/r", b"live")
    assert member.expect_publish().payload == b"live"
