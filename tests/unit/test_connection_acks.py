"""The acknowledgement rules of a Connection: the right ack type for each outbound QoS 1/2
PUBLISH, and the 3.1 (protocol level 3) rules that differ from 3.1.1. No network."""

from __future__ import annotations

import pytest

from edge_broker.mqtt.codec import decode
from edge_broker.mqtt.connection import Connection
from edge_broker.mqtt.errors import RemoteProtocolError
from edge_broker.mqtt.packets import (
    ConnAck,
    Connect,
    Packet,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.types import ReasonCode, Role

LEVELS = [3, 4, 5]


def connected(level: int, receive_maximum: int | None = None) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, protocol_level=level)
    server = Connection(Role.SERVER)
    props = Properties(receive_maximum=receive_maximum) if level == 5 else Properties()
    server.receive_packets(client.send(Connect("dev-1", protocol_level=level,
                                               properties=props)))
    client.receive_packets(server.send(ConnAck()))
    return client, server


def deliver(server: Connection, client: Connection, qos: int, packet_id: int) -> None:
    """The server sends a QoS 1/2 PUBLISH; the client receives it."""
    assert client.receive_packets(server.send(Publish("t", b"x", qos, packet_id=packet_id)))


def raises(conn: Connection, data: bytes) -> ReasonCode:
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_packets(data)
    return info.value.reason_code


def ack(packet: Packet) -> bytes:
    """The bytes of an acknowledgement, encoded without a Connection's checks (5.0 layout
    without reason code is the same on every level)."""
    ptype = int(packet.packet_type)
    first = (ptype << 4) | (2 if ptype == 6 else 0)
    packet_id: int = packet.packet_id  # type: ignore[attr-defined]
    return bytes((first, 2)) + packet_id.to_bytes(2, "big")


WRONG_ACKS = [
    (2, PubAck(1)),   # PUBACK for a QoS 2 delivery
    (2, PubComp(1)),  # PUBCOMP before PUBREC
    (1, PubRec(1)),   # PUBREC for a QoS 1 delivery
    (1, PubComp(1)),  # PUBCOMP for a QoS 1 delivery
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("qos", "wrong"), WRONG_ACKS)
def test_wrong_ack_type_is_a_protocol_error(level: int, qos: int, wrong: Packet) -> None:
    # [MQTT-4.8.0-1] (3.1.1): close on a protocol violation; 4.13 (5.0): Protocol Error.
    client, server = connected(level)
    deliver(server, client, qos, 1)
    assert raises(server, ack(wrong)) == ReasonCode.PROTOCOL_ERROR
    # On 5.0 the error is a DISCONNECT 0x82; on 3.1/3.1.1 just the close.
    error = RemoteProtocolError(ReasonCode.PROTOCOL_ERROR, "wrong ack")
    data = server.error_bytes(error)
    assert data[:1] + data[2:3] == b"\xe0\x82" if level == 5 else data == b""


@pytest.mark.parametrize("level", LEVELS)
def test_pubcomp_after_pubrec_but_before_our_pubrel(level: int) -> None:
    client, server = connected(level)
    deliver(server, client, 2, 1)
    assert server.receive_packets(ack(PubRec(1))) == [PubRec(1)]
    assert raises(server, ack(PubComp(1))) == ReasonCode.PROTOCOL_ERROR


def test_failing_pubrec_after_a_pubrec_is_a_protocol_error() -> None:
    # It would end the exchange in the session while our PUBREL is on its way.
    client, server = connected(5)
    deliver(server, client, 2, 1)
    server.receive_packets(ack(PubRec(1)))
    assert raises(server, b"\x50\x03\x00\x01\x80") == ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize("level", LEVELS)
def test_right_acks_pass(level: int) -> None:
    client, server = connected(level)
    deliver(server, client, 1, 1)
    deliver(server, client, 2, 2)
    assert server.receive_packets(client.send(PubAck(1))) == [PubAck(1)]
    assert server.receive_packets(client.send(PubRec(2))) == [PubRec(2)]
    assert server.receive_packets(ack(PubRec(2))) == [PubRec(2)]  # repeated: tolerated
    client.receive_packets(server.send(PubRel(2)))
    assert server.receive_packets(client.send(PubComp(2))) == [PubComp(2)]
    # The ids are free again: the same ids may be used for new deliveries.
    deliver(server, client, 2, 1)
    assert server.receive_packets(ack(PubRec(1))) == [PubRec(1)]


@pytest.mark.parametrize("level", LEVELS)
def test_acks_for_ids_not_sent_on_this_connection_pass(level: int) -> None:
    # After a reconnect a client may acknowledge what an earlier connection delivered; the
    # session answers (a PUBREC for an unknown id gets PUBREL 0x92, 4.3.3 (5.0)).
    _, server = connected(level)
    for packet in (PubAck(7), PubRec(8), PubComp(9)):
        assert server.receive_packets(ack(packet)) == [packet]


def test_a_wrong_ack_does_not_open_the_receive_window() -> None:
    # The client's Receive Maximum 1 is taken by a QoS 2 delivery: a PUBACK or a PUBCOMP
    # before the PUBREC must not free the slot (it closes the connection instead).
    client, server = connected(5, receive_maximum=1)
    deliver(server, client, 2, 1)
    assert server.send_quota == 0
    with pytest.raises(RemoteProtocolError):
        server.receive_packets(ack(PubComp(1)))
    assert server.send_quota == 0


def test_receive_window_freed_by_the_right_ack_only() -> None:
    client, server = connected(5, receive_maximum=1)
    deliver(server, client, 2, 1)
    server.receive_packets(ack(PubRec(1)))
    assert server.send_quota == 0  # PUBREC is not final
    client.receive_packets(server.send(PubRel(1)))
    server.receive_packets(ack(PubComp(1)))
    assert server.send_quota == 1


# ------------------------------------------------------------------ MQTT 3.1


def test_v31_empty_client_id_is_rejected() -> None:
    # MQTT 3.1 CONNECT payload: the Client Identifier is 1 to 23 characters -> return code 2.
    server = Connection(Role.SERVER)
    body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00"
    data = bytes((0x10, len(body))) + body
    assert raises(server, data) == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    error = RemoteProtocolError(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "empty")
    assert server.error_bytes(error) == b"\x20\x02\x00\x02"


def test_v311_empty_client_id_with_clean_session_passes() -> None:
    server = Connection(Role.SERVER)
    body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
    assert len(server.receive_packets(bytes((0x10, len(body))) + body)) == 1


@pytest.mark.parametrize("first", [0x6A, 0x8A, 0xAA])
def test_v31_allows_dup_on_pubrel_subscribe_unsubscribe(first: int) -> None:
    # MQTT 3.1, 2.1 Fixed header: DUP is set on a resent PUBREL, SUBSCRIBE or UNSUBSCRIBE.
    body = {0x6A: b"\x00\x01", 0x8A: b"\x00\x01\x00\x01t\x00", 0xAA: b"\x00\x01\x00\x01t"}
    packet = decode(first, body[first], 3)
    assert packet.packet_type == first >> 4
    for level in (4, 5):
        with pytest.raises(RemoteProtocolError) as info:
            decode(first, body[first], level)  # [MQTT-2.2.2-1] (3.1.1), [MQTT-2.1.3-1] (5.0)
        assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_v31_resent_pubrel_with_dup_is_answered() -> None:
    client, server = connected(3)
    server.receive_packets(client.send(Publish("t", b"x", 2, packet_id=3)))
    assert server.receive_packets(b"\x6a\x02\x00\x03") == [PubRel(3)]
