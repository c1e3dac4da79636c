"""The QoS 1 hot paths of a server Connection give what the general paths give: a plain
PUBACK taken as its packet id (`next_event_or_ack`) and a QoS 1 PUBLISH without properties
encoded in one step by `send`. No network."""

from __future__ import annotations

import pytest

from edge_broker.mqtt.codec import encode_publish
from edge_broker.mqtt.connection import Connection
from edge_broker.mqtt.errors import LocalProtocolError, RemoteProtocolError
from edge_broker.mqtt.packets import ConnAck, Connect, PingReq, PubAck, Publish, PubRec
from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.types import ReasonCode, Role

LEVELS = [3, 4, 5]


def connected(level: int, receive_maximum: int | None = None,
              maximum_packet_size: int | None = None) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, protocol_level=level)
    server = Connection(Role.SERVER)
    props = (Properties(receive_maximum=receive_maximum,
                        maximum_packet_size=maximum_packet_size)
             if level == 5 else Properties())
    server.receive_packets(client.send(Connect("dev-1", protocol_level=level,
                                               properties=props)))
    client.receive_packets(server.send(ConnAck()))
    return client, server


def drain(server: Connection) -> list[object]:
    out: list[object] = []
    while (event := server.next_event_or_ack()) is not None:
        out.append(event)
    return out


@pytest.mark.parametrize("level", LEVELS)
def test_plain_pubacks_come_as_ids_and_free_the_window(level: int) -> None:
    client, server = connected(level, receive_maximum=2)
    for packet_id in (1, 2):
        client.receive_packets(server.send(Publish("t", b"x", 1, packet_id=packet_id)))
    if level == 5:
        assert server.send_quota == 0
    server.receive_data(b"\x40\x02\x00\x01" + b"\xc0\x00" + b"\x40\x02\x00\x02"
                        + b"\x40\x02\x00\x09")  # the last one for an id not sent here
    assert drain(server) == [1, PingReq(), 2, 9]
    assert server.send_quota == server.peer_receive_maximum
    assert server.buffered_bytes == 0


def test_a_puback_with_a_reason_code_comes_as_a_packet() -> None:
    client, server = connected(5)
    client.receive_packets(server.send(Publish("t", b"x", 1, packet_id=3)))
    server.receive_data(b"\x40\x03\x00\x03\x10")
    assert drain(server) == [PubAck(3, ReasonCode.NO_MATCHING_SUBSCRIBERS)]
    assert server.send_quota == server.peer_receive_maximum


@pytest.mark.parametrize("level", LEVELS)
def test_a_puback_for_a_qos2_delivery_is_still_a_protocol_error(level: int) -> None:
    # [MQTT-4.8.0-1] (3.1.1), 4.13 (5.0): the wrong acknowledgement closes the connection.
    client, server = connected(level)
    client.receive_packets(server.send(Publish("t", b"x", 2, packet_id=4)))
    server.receive_data(b"\x40\x02\x00\x04")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event_or_ack()
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR
    with pytest.raises(RemoteProtocolError):  # and on every later call
        server.next_event_or_ack()


def test_a_puback_with_packet_id_zero_is_a_protocol_error() -> None:
    # [MQTT-2.2.1-3] (5.0)
    _, server = connected(5)
    server.receive_data(b"\x40\x02\x00\x00")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event_or_ack()
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_pubrec_and_a_split_puback_go_the_general_way() -> None:
    client, server = connected(4)
    client.receive_packets(server.send(Publish("t", b"x", 2, packet_id=5)))
    client.receive_packets(server.send(Publish("t", b"x", 1, packet_id=6)))
    server.receive_data(b"\x50\x02\x00\x05\x40\x02")
    assert drain(server) == [PubRec(5)]
    server.receive_data(b"\x00\x06")
    assert drain(server) == [6]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("size", [0, 10, 200, 20_000])
def test_qos1_publish_bytes_are_encode_publish_bytes(level: int, retain: bool, dup: bool,
                                                     size: int) -> None:
    client, server = connected(level)
    packet = Publish("a/b/\u00e9", bytes(range(256)) * (size // 256) + b"p" * (size % 256),
                     1, retain, dup, 0x1234)
    data = server.send(packet)
    assert data == encode_publish(packet, level)
    assert client.receive_packets(data) == [packet]


def test_qos1_publish_over_the_receive_maximum_is_refused() -> None:
    # [MQTT-3.3.4-7] (5.0)
    client, server = connected(5, receive_maximum=1)
    client.receive_packets(server.send(Publish("t", b"x", 1, packet_id=1)))
    with pytest.raises(LocalProtocolError):
        server.send(Publish("t", b"x", 1, packet_id=2))
    # Sending the same id again (a resend) is allowed.
    assert server.send(Publish("t", b"x", 1, dup=True, packet_id=1))


def test_qos1_publish_too_large_for_the_peer_is_discarded() -> None:
    # [MQTT-3.1.2-25] (5.0): not sent, as if sent; it does not take a receive slot.
    _, server = connected(5, receive_maximum=1, maximum_packet_size=20)
    assert server.send(Publish("t", b"x" * 30, 1, packet_id=1)) == b""
    assert server.send_quota == 1


@pytest.mark.parametrize("topic", ["a/+", "a/#", "", "a\x00b"])
def test_qos1_publish_with_an_invalid_topic_is_refused(topic: str) -> None:
    _, server = connected(4)
    with pytest.raises(LocalProtocolError):
        server.send(Publish(topic, b"x", 1, packet_id=1))
