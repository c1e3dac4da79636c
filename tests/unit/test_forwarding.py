"""Forwarding a QoS 0 PUBLISH as received (issue 12): `Connection.received_publish_bytes`
gives the received bytes only when they are exactly what encoding the packet makes, and the
core hands subscribers that very packet, so the server can send those bytes unchanged."""

from __future__ import annotations

import pytest

from edge_broker.core.broker import BrokerCore
from edge_broker.mqtt.codec import encode_publish
from edge_broker.mqtt.connection import Connection
from edge_broker.mqtt.packets import ConnAck, Connect, Publish, Subscribe, Subscription
from edge_broker.mqtt.properties import NO_PROPERTIES, Properties
from edge_broker.mqtt.types import Role

LEVELS = [3, 4, 5]


def server_for(level: int, *, topic_alias_maximum: int = 0) -> Connection:
    client = Connection(Role.CLIENT, protocol_level=level)
    server = Connection(Role.SERVER, topic_alias_maximum=topic_alias_maximum)
    server.receive_packets(client.send(Connect("pub", protocol_level=level)))
    server.send(ConnAck())
    return server


def received(server: Connection, data: bytes) -> tuple[Publish, bytes | None]:
    server.receive_data(data)
    packet = server.next_event()
    assert isinstance(packet, Publish)
    return packet, server.received_publish_bytes(packet)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("size", [0, 10, 200, 20_000])
def test_qos0_publish_bytes_are_its_encoding(level: int, retain: bool, size: int) -> None:
    server = server_for(level)
    data = encode_publish(Publish("a/b", b"x" * size, 0, retain), level)
    packet, raw = received(server, data)
    assert raw == data == encode_publish(packet, level)


@pytest.mark.parametrize("level", LEVELS)
def test_only_the_publish_just_received(level: int) -> None:
    server = server_for(level)
    first = encode_publish(Publish("a", b"1"), level)
    second = encode_publish(Publish("b", b"22"), level)
    server.receive_data(first + second)
    one = server.next_event()
    assert isinstance(one, Publish)
    assert server.received_publish_bytes(one) == first
    two = server.next_event()
    assert isinstance(two, Publish)
    assert server.received_publish_bytes(one) is None  # no longer the last one
    assert server.received_publish_bytes(two) == second


@pytest.mark.parametrize("level", LEVELS)
def test_nothing_is_held_once_the_buffer_is_worked_off(level: int) -> None:
    # A large payload must not stay alive while its publisher idles.
    server = server_for(level)
    server.receive_data(encode_publish(Publish("a", b"x" * 100_000), level))
    packet = server.next_event()
    assert isinstance(packet, Publish)
    assert server.next_event() is None
    assert server.received_publish_bytes(packet) is None


@pytest.mark.parametrize("level", LEVELS)
def test_qos1_publish_is_not_forwarded_as_received(level: int) -> None:
    server = server_for(level)
    raw = received(server, encode_publish(Publish("a", b"p", 1, packet_id=7), level))[1]
    assert raw is None


@pytest.mark.parametrize("level", LEVELS)
def test_a_longer_than_needed_remaining_length_is_encoded_again(level: int) -> None:
    canonical = encode_publish(Publish("a/b", b"hello"), level)
    assert canonical[1] < 0x80
    padded = bytes([canonical[0], canonical[1] | 0x80, 0x00]) + canonical[2:]
    server = server_for(level)
    packet, raw = received(server, padded)
    assert packet.topic == "a/b" and packet.payload == b"hello"
    assert raw is None


def test_v5_properties_or_a_topic_alias_are_encoded_again() -> None:
    server = server_for(5, topic_alias_maximum=10)
    with_props = Publish("a", b"p", properties=Properties(content_type="text/plain"))
    assert received(server, encode_publish(with_props, 5))[1] is None
    # The alias is set with the topic, then used with an empty topic: neither is forwarded
    # as received (the subscriber gets the topic, never our client's alias).
    aliased = encode_publish(Publish("a/b", b"1"), 5, topic_alias=3)
    packet, raw = received(server, aliased)
    assert packet.topic == "a/b" and packet.properties is NO_PROPERTIES and raw is None
    packet, raw = received(server, encode_publish(Publish("a/b", b"2"), 5, topic="",
                                                  topic_alias=3))
    assert packet.topic == "a/b" and raw is None


def test_v5_empty_property_length_in_two_bytes_is_encoded_again() -> None:
    canonical = encode_publish(Publish("t", b"p"), 5)
    # fixed header (2), topic length + topic (3), property length 0x00, payload
    padded_body = canonical[2:5] + b"\x80\x00" + canonical[6:]
    padded = bytes([canonical[0], len(padded_body)]) + padded_body
    server = server_for(5)
    packet, raw = received(server, padded)
    assert packet.properties is NO_PROPERTIES and raw is None


def subscribed_core(qos: int = 0) -> BrokerCore:
    core = BrokerCore()
    for client_id in ("pub", "sub"):
        core.connect(Connect(client_id, 5, True, 60), client_id=client_id, now=0.0)
    core.subscribe("sub", Subscribe(1, (Subscription("a/#", qos),)), now=0.0)
    commit(core)
    return core


def commit(core: BrokerCore) -> None:
    core.committed(core.drain().number)


def test_core_sends_the_received_qos0_packet_itself() -> None:
    core = subscribed_core()
    packet = Publish("a/b", b"hello")
    core.publish("pub", packet, now=0.0)
    commit(core)
    out = core.pull("sub", now=0.0)
    assert len(out) == 1 and out[0] is packet


def test_core_builds_its_own_packet_when_it_differs_from_the_received_one() -> None:
    core = subscribed_core(qos=1)
    retained = Publish("a/b", b"r", retain=True)  # live delivery: retain flag cleared
    with_props = Publish("a/c", b"p", properties=Properties(content_type="text/plain"))
    qos1 = Publish("a/d", b"q", 1, packet_id=5)  # delivered with a packet id of ours
    for packet in (retained, with_props, qos1):
        core.publish("pub", packet, now=0.0)
    commit(core)
    out = core.pull("sub", now=0.0)
    assert [p.topic for p in out] == ["a/b", "a/c", "a/d"]
    assert all(a is not b for a, b in zip(out, (retained, with_props, qos1), strict=True))
    first, second, third = out
    assert isinstance(first, Publish) and first.retain is False
    assert isinstance(second, Publish) and second.properties.content_type == "text/plain"
    assert isinstance(third, Publish) and third.qos == 1
