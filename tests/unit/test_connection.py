"""A CLIENT Connection wired to a SERVER Connection, with no network in between."""

from __future__ import annotations

import pytest

from edge_broker.mqtt.codec import decode, split_frame
from edge_broker.mqtt.connection import (
    TRANSITIONS,
    Connection,
    ConnectionState,
    Direction,
    format_transitions,
)
from edge_broker.mqtt.errors import LocalProtocolError, RemoteProtocolError
from edge_broker.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from edge_broker.mqtt.properties import NO_PROPERTIES, Properties
from edge_broker.mqtt.types import PacketType, ReasonCode, Role

S = ConnectionState
LEVELS = [3, 4, 5]


def transfer(sender: Connection, receiver: Connection, packet: Packet) -> list[Packet]:
    return receiver.receive_packets(sender.send(packet))


def connected(level: int = 5, *, connect: Connect | None = None, connack: ConnAck | None = None,
              server_kwargs: dict[str, int] | None = None,
              client_kwargs: dict[str, int] | None = None) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, protocol_level=level, **(client_kwargs or {}))
    server = Connection(Role.SERVER, **(server_kwargs or {}))
    connect = connect or Connect("dev-1", protocol_level=level)
    assert transfer(client, server, connect) == [connect]
    connack = connack or ConnAck()
    assert transfer(server, client, connack) == [connack]
    return client, server


def raises(conn: Connection, data: bytes) -> ReasonCode:
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_packets(data)
    return info.value.reason_code


def decode_one(data: bytes, level: int) -> Packet:
    frame = split_frame(data, 0, len(data))
    assert frame is not None and frame[2] == len(data)
    return decode(frame[0], data[frame[1]:], level)


# ------------------------------------------------------------------ connecting


@pytest.mark.parametrize("level", LEVELS)
def test_connect_and_connack(level: int) -> None:
    client = Connection(Role.CLIENT, protocol_level=level)
    server = Connection(Role.SERVER)
    assert client.state is S.AWAIT_CONNECT and server.state is S.AWAIT_CONNECT
    assert server.protocol_level is None
    transfer(client, server, Connect("dev-1", protocol_level=level, keep_alive=30))
    assert (client.state, server.state) == (S.AWAIT_CONNACK, S.AWAIT_CONNACK)
    assert server.protocol_level == level
    assert transfer(server, client, ConnAck(session_present=level > 3)) == [
        ConnAck(session_present=level > 3)]
    assert client.state is S.CONNECTED and server.state is S.CONNECTED


def test_negotiated_limits_v5() -> None:
    client, server = connected(
        connect=Connect("c", properties=Properties(
            receive_maximum=7, maximum_packet_size=5000, topic_alias_maximum=3)),
        connack=ConnAck(properties=Properties(
            receive_maximum=9, maximum_packet_size=6000, topic_alias_maximum=4,
            maximum_qos=1, retain_available=0)),
        server_kwargs={"receive_maximum": 100, "topic_alias_maximum": 100})
    assert (server.peer_receive_maximum, server.peer_maximum_packet_size,
            server.peer_topic_alias_maximum) == (7, 5000, 3)
    assert (client.receive_maximum, client.maximum_packet_size,
            client.topic_alias_maximum) == (7, 5000, 3)
    assert (client.peer_receive_maximum, client.peer_maximum_packet_size,
            client.peer_topic_alias_maximum) == (9, 6000, 4)
    assert (server.receive_maximum, server.maximum_packet_size,
            server.topic_alias_maximum) == (9, 6000, 4)
    assert client.peer_maximum_qos == 1 and client.peer_retain_available is False


def test_defaults_without_properties() -> None:
    _, server = connected(server_kwargs={"receive_maximum": 10})
    assert server.peer_receive_maximum == 65535
    assert server.peer_topic_alias_maximum == 0
    assert server.receive_maximum == 10  # the constructor value: advertise it yourself


def test_client_may_pipeline_behind_connect() -> None:
    client = Connection(Role.CLIENT, protocol_level=5)
    server = Connection(Role.SERVER)
    data = client.send(Connect("c")) + client.send(Subscribe(1, (Subscription("a/#"),)))
    data += client.send(Publish("a/b", b"x", qos=1, packet_id=2))
    packets = server.receive_packets(data)
    assert [type(p) for p in packets] == [Connect, Subscribe, Publish]
    assert server.state is S.AWAIT_CONNACK
    with pytest.raises(LocalProtocolError):
        server.send(SubAck(1, (0,)))  # not before the CONNACK
    client.receive_packets(server.send(ConnAck()))
    assert [type(p) for p in transfer(server, client, SubAck(1, (0,)))] == [SubAck]


def test_refused_connack_closes_both_ends() -> None:
    client = Connection(Role.CLIENT, protocol_level=4)
    server = Connection(Role.SERVER)
    transfer(client, server, Connect("c", protocol_level=4, username="u", password=b"x"))
    data = server.send(ConnAck(reason_code=ReasonCode.BAD_USER_NAME_OR_PASSWORD))
    assert data == bytes.fromhex("20 02 00 04")
    assert server.state is S.CLOSED
    assert client.receive_packets(data) == [ConnAck(reason_code=0x86)]
    assert client.state is S.CLOSED
    # [MQTT-3.1.4-5] (5.0): the server ignores what the client sent after the CONNECT.
    server.receive_data(b"\x30\x03\x00\x01a")
    assert server.next_event() is None
    with pytest.raises(LocalProtocolError):
        server.send(PingResp())


def test_enhanced_authentication_exchange() -> None:
    client = Connection(Role.CLIENT, protocol_level=5)
    server = Connection(Role.SERVER)
    transfer(client, server, Connect("c", properties=Properties(authentication_method="X")))
    challenge = Auth(0x18, Properties(authentication_method="X", authentication_data=b"n"))
    assert transfer(server, client, challenge) == [challenge]
    answer = Auth(0x18, Properties(authentication_method="X", authentication_data=b"r"))
    assert transfer(client, server, answer) == [answer]
    assert server.state is S.AWAIT_CONNACK
    transfer(server, client, ConnAck(properties=Properties(authentication_method="X")))
    assert client.state is S.CONNECTED
    reauth = Auth(0x19, Properties(authentication_method="X"))
    assert transfer(client, server, reauth) == [reauth]


def test_auth_without_authentication_method() -> None:
    client, server = connected()
    with pytest.raises(LocalProtocolError):
        client.send(Auth(0x19))
    assert raises(server, b"\xf0\x00") == ReasonCode.PROTOCOL_ERROR


# ------------------------------------------------------------------ publishing


@pytest.mark.parametrize("level", LEVELS)
def test_publish_every_qos_both_ways(level: int) -> None:
    client, server = connected(level)
    for sender, receiver in ((client, server), (server, client)):
        p0 = Publish("a/b", b"zero")
        assert transfer(sender, receiver, p0) == [p0]
        p1 = Publish("a/b", b"one", qos=1, packet_id=1)
        assert transfer(sender, receiver, p1) == [p1]
        assert transfer(receiver, sender, PubAck(1)) == [PubAck(1)]
        p2 = Publish("a/c", b"two", qos=2, retain=True, packet_id=2)
        assert transfer(sender, receiver, p2) == [p2]
        assert transfer(receiver, sender, PubRec(2)) == [PubRec(2)]
        assert transfer(sender, receiver, PubRel(2)) == [PubRel(2)]
        assert transfer(receiver, sender, PubComp(2)) == [PubComp(2)]
        assert sender.send_quota == sender.peer_receive_maximum


def test_publish_properties_pass_through() -> None:
    client, server = connected()
    props = Properties(message_expiry_interval=5, content_type="c", user_properties=(("k", "v"),))
    packet = Publish("a", b"x", qos=1, packet_id=3, properties=props)
    assert transfer(client, server, packet) == [packet]


@pytest.mark.parametrize(("level", "code"), [(4, ReasonCode.MALFORMED_PACKET),
                                             (5, ReasonCode.PROTOCOL_ERROR)])
def test_empty_topic(level: int, code: ReasonCode) -> None:
    _, server = connected(level)
    data = b"\x30\x03\x00\x00\x00" if level == 5 else b"\x30\x02\x00\x00"
    assert raises(server, data) == code


@pytest.mark.parametrize("level", [4, 5])
def test_wildcard_in_topic_name(level: int) -> None:
    client, server = connected(level)
    with pytest.raises(LocalProtocolError):
        client.send(Publish("a/+"))
    props = b"\x00" if level == 5 else b""
    assert raises(server, b"\x30" + bytes((4 + len(props),)) + b"\x00\x02a#" + props) == (
        ReasonCode.TOPIC_NAME_INVALID)


def test_client_publish_with_subscription_identifier() -> None:
    _, server = connected()
    assert raises(server, bytes.fromhex("30 06 0001 74 02 0b 01")) == ReasonCode.PROTOCOL_ERROR


def test_subscription_identifiers_from_the_server() -> None:
    client, server = connected()
    packet = Publish("a", properties=Properties(subscription_identifiers=(1, 2)))
    assert transfer(server, client, packet) == [packet]


def test_maximum_qos_and_retain_available() -> None:
    client, server = connected(connack=ConnAck(properties=Properties(maximum_qos=1,
                                                                     retain_available=0)))
    with pytest.raises(LocalProtocolError):
        client.send(Publish("a", qos=2, packet_id=1))
    with pytest.raises(LocalProtocolError):
        client.send(Publish("a", retain=True))
    assert raises(server, bytes.fromhex("34 06 0001 61 0001 00")) == ReasonCode.QOS_NOT_SUPPORTED
    _, server = connected(connack=ConnAck(properties=Properties(retain_available=0)))
    assert raises(server, bytes.fromhex("31 04 0001 61 00")) == ReasonCode.RETAIN_NOT_SUPPORTED


# ------------------------------------------------------------------ subscribing


@pytest.mark.parametrize("level", LEVELS)
def test_subscribe_and_unsubscribe(level: int) -> None:
    client, server = connected(level)
    sub = Subscribe(1, (Subscription("a/#", 1), Subscription("b/+", 2)))
    assert transfer(client, server, sub) == [sub]
    assert transfer(server, client, SubAck(1, (1, 0x80))) == [SubAck(1, (1, 0x80))]
    unsub = Unsubscribe(2, ("a/#", "b/+"))
    assert transfer(client, server, unsub) == [unsub]
    unsuback = UnsubAck(2, (0, 0x11)) if level == 5 else UnsubAck(2)
    assert transfer(server, client, unsuback) == [unsuback]


def test_v5_subscription_options() -> None:
    client, server = connected()
    sub = Subscribe(1, (Subscription("a", 2, no_local=True, retain_as_published=True,
                                     retain_handling=2),),
                    Properties(subscription_identifiers=(77,)))
    assert transfer(client, server, sub) == [sub]


def test_invalid_filter_v311_closes() -> None:
    _, server = connected(4)
    assert raises(server, bytes.fromhex("82 07 0001 0002 612b 00")) == (
        ReasonCode.MALFORMED_PACKET)
    _, server = connected(4)
    assert raises(server, bytes.fromhex("a2 06 0001 0002 2361")) == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("topic_filter", ["#/a", "a/b#", "a+/b", "", "$share/g+/t",
                                          "$share/g/a#"])
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_ill_formed_filter_v5_is_malformed(topic_filter: str, kind: str) -> None:
    # [MQTT-4.7.1-1], [MQTT-4.7.1-2], [MQTT-4.7.3-1] (5.0): not a SUBACK 0x8F but 0x81.
    _, server = connected()
    data = _v5_filters_packet(kind, ["ok/t", topic_filter])
    assert raises(server, data) == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("topic_filter", ["$share//t", "$share/g", "$share/g/"])
def test_bad_shared_filter_v5_is_a_protocol_error(topic_filter: str) -> None:
    # [MQTT-4.8.2-1], [MQTT-4.8.2-2] (5.0): well-formed as a filter, not as a shared one.
    _, server = connected()
    data = _v5_filters_packet("subscribe", [topic_filter])
    assert raises(server, data) == ReasonCode.PROTOCOL_ERROR


def test_well_formed_filters_reach_the_broker() -> None:
    client, server = connected()
    sub = Subscribe(1, (Subscription("a/+/b"), Subscription("#"), Subscription("$share/g/a/#")))
    assert transfer(client, server, sub) == [sub]


def _v5_filters_packet(kind: str, filters: list[str]) -> bytes:
    """A 5.0 SUBSCRIBE (options 0) or UNSUBSCRIBE, packet id 1, built by hand (the encoder
    refuses an empty filter)."""
    body = b"\x00\x01\x00"
    for topic_filter in filters:
        raw = topic_filter.encode()
        body += len(raw).to_bytes(2, "big") + raw + (b"\x00" if kind == "subscribe" else b"")
    return bytes((0x82 if kind == "subscribe" else 0xA2, len(body))) + body


def test_shared_subscription_with_no_local() -> None:
    client, server = connected()
    data = client.send(Subscribe(1, (Subscription("$share/g/a", no_local=True),)))
    assert raises(server, data) == ReasonCode.PROTOCOL_ERROR


def test_suback_must_answer_a_subscribe() -> None:
    client, server = connected()
    assert raises(client, server.send(SubAck(9, (0,)))) == ReasonCode.PROTOCOL_ERROR
    client, server = connected()
    transfer(client, server, Subscribe(1, (Subscription("a"), Subscription("b"))))
    assert raises(client, server.send(SubAck(1, (0,)))) == ReasonCode.PROTOCOL_ERROR


# ------------------------------------------------------------------ topic aliases


def test_topic_aliases_client_to_server() -> None:
    client, server = connected(
        connack=ConnAck(properties=Properties(topic_alias_maximum=2)),
        server_kwargs={"topic_alias_maximum": 2})
    first = client.send(Publish("a/b", b"1"))
    assert decode_one(first, 5) == Publish("a/b", b"1", properties=Properties(topic_alias=1))
    second = client.send(Publish("a/b", b"2"))
    assert decode_one(second, 5) == Publish("", b"2", properties=Properties(topic_alias=1))
    assert len(second) < len(first)
    client.send(Publish("c", b"3"))  # alias 2
    third = client.send(Publish("d", b"4"))  # no alias left: full topic, no alias
    assert decode_one(third, 5) == Publish("d", b"4")
    received = server.receive_packets(first + second + third)
    assert received == [Publish("a/b", b"1"), Publish("a/b", b"2"), Publish("d", b"4")]
    assert all(p.properties is NO_PROPERTIES for p in received)  # type: ignore[union-attr]


def test_topic_aliases_server_to_client_keep_other_properties() -> None:
    client, server = connected(
        connect=Connect("c", properties=Properties(topic_alias_maximum=1)),
        client_kwargs={"topic_alias_maximum": 1})
    props = Properties(content_type="t")
    packets = [Publish("x", b"1", qos=1, packet_id=1, properties=props),
               Publish("x", b"2", qos=1, packet_id=2, properties=props),
               Publish("y", b"3")]
    data = b"".join(server.send(p) for p in packets)
    assert client.receive_packets(data) == packets


def test_caller_chosen_topic_alias() -> None:
    client, server = connected(connect=Connect("c", properties=Properties(topic_alias_maximum=5)),
                               client_kwargs={"topic_alias_maximum": 5})
    data = server.send(Publish("t", properties=Properties(topic_alias=4)))
    data += server.send(Publish("", b"again", properties=Properties(topic_alias=4)))
    assert client.receive_packets(data) == [Publish("t"), Publish("t", b"again")]
    with pytest.raises(LocalProtocolError):
        server.send(Publish("t", properties=Properties(topic_alias=6)))
    with pytest.raises(LocalProtocolError):
        server.send(Publish("", properties=Properties(topic_alias=3)))  # never set


def test_no_aliases_when_the_peer_accepts_none() -> None:
    client, _ = connected()
    assert decode_one(client.send(Publish("a")), 5) == Publish("a")
    assert decode_one(client.send(Publish("a")), 5) == Publish("a")
    with pytest.raises(LocalProtocolError):
        client.send(Publish("a", properties=Properties(topic_alias=1)))


@pytest.mark.parametrize(("data", "code"), [
    ("30 07 0001 61 03 230000", ReasonCode.TOPIC_ALIAS_INVALID),  # alias 0
    ("30 07 0001 61 03 230003", ReasonCode.TOPIC_ALIAS_INVALID),  # above our maximum 2
    ("30 06 0000 03 230001", ReasonCode.PROTOCOL_ERROR),  # unknown alias, empty topic
    ("30 07 0001 2b 03 230001", ReasonCode.TOPIC_NAME_INVALID),  # wildcard with an alias
])
def test_inbound_alias_errors(data: str, code: ReasonCode) -> None:
    _, server = connected(connack=ConnAck(properties=Properties(topic_alias_maximum=2)))
    assert raises(server, bytes.fromhex(data)) == code


# ------------------------------------------------------------------ receive maximum


def test_receive_maximum_exceeded() -> None:
    client, server = connected(connack=ConnAck(properties=Properties(receive_maximum=2)))
    assert client.peer_receive_maximum == 2
    data = client.send(Publish("a", qos=1, packet_id=1))
    data += client.send(Publish("a", qos=2, packet_id=2))
    assert client.send_quota == 0
    with pytest.raises(LocalProtocolError):
        client.send(Publish("a", qos=1, packet_id=3))
    data += client.send(Publish("a", qos=1, dup=True, packet_id=1))  # a resend: no new quota
    data += client.send(Publish("a"))  # QoS 0 is not counted
    assert len(server.receive_packets(data)) == 4
    # One more QoS 1 from a misbehaving client.
    assert raises(server, bytes.fromhex("32 06 0001 61 0003 00")) == (
        ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)


def test_receive_maximum_is_released_by_final_acks() -> None:
    client, server = connected(connack=ConnAck(properties=Properties(receive_maximum=1)))
    transfer(client, server, Publish("a", qos=1, packet_id=1))
    transfer(server, client, PubAck(1))
    transfer(client, server, Publish("a", qos=2, packet_id=2))
    transfer(server, client, PubRec(2))  # not final
    assert client.send_quota == 0
    assert raises(server, bytes.fromhex("32 06 0001 61 0003 00")) == (
        ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
    client, server = connected(connack=ConnAck(properties=Properties(receive_maximum=1)))
    transfer(client, server, Publish("a", qos=2, packet_id=2))
    transfer(server, client, PubRec(2))
    transfer(client, server, PubRel(2))
    transfer(server, client, PubComp(2))
    transfer(client, server, Publish("a", qos=2, packet_id=3))
    transfer(server, client, PubRec(3, ReasonCode.QUOTA_EXCEEDED))  # failing PUBREC is final
    assert client.send_quota == 1
    assert [type(p) for p in transfer(client, server, Publish("a", qos=1, packet_id=4))] == [
        Publish]


def test_receive_maximum_not_enforced_on_v311() -> None:
    client, server = connected(4, server_kwargs={"receive_maximum": 1})
    data = b"".join(client.send(Publish("a", qos=1, packet_id=i)) for i in (1, 2, 3))
    assert len(server.receive_packets(data)) == 3


# ------------------------------------------------------------------ maximum packet size


def test_max_packet_size_client_to_server() -> None:
    client, server = connected(connack=ConnAck(properties=Properties(maximum_packet_size=100)))
    assert server.maximum_packet_size == 100
    assert client.send(Publish("a", b"x" * 200, qos=1, packet_id=1)) == b""  # discarded
    assert client.send_quota == client.peer_receive_maximum  # as if completed
    assert len(client.send(Publish("a", b"x" * 50))) < 100
    assert raises(server, b"\x30\x7f") == ReasonCode.PACKET_TOO_LARGE  # from the header alone


def test_max_packet_size_server_to_client() -> None:
    client, server = connected(
        connect=Connect("c", properties=Properties(maximum_packet_size=30)))
    assert server.send(Publish("a", b"x" * 40)) == b""
    transfer(client, server, Subscribe(1, (Subscription("a"),)))
    suback = SubAck(1, (0,), Properties(reason_string="r" * 40, user_properties=(("k", "v"),)))
    received = transfer(server, client, suback)
    assert received == [SubAck(1, (0,), Properties(user_properties=(("k", "v"),)))]
    transfer(client, server, Subscribe(2, (Subscription("a"),)))
    suback = SubAck(2, (0,), Properties(user_properties=(("k", "v" * 40),)))
    assert transfer(server, client, suback) == [SubAck(2, (0,))]
    transfer(client, server, Subscribe(3, tuple(Subscription(f"t{i}") for i in range(40))))
    with pytest.raises(LocalProtocolError):
        server.send(SubAck(3, (0,) * 40))


def test_max_packet_size_on_v311_is_local_only() -> None:
    _, server = connected(4, server_kwargs={"max_packet_size": 30})
    assert raises(server, b"\x30\x1d") == ReasonCode.PACKET_TOO_LARGE  # 31 bytes


# ------------------------------------------------------------------ disconnecting


def test_disconnect_from_client() -> None:
    client, server = connected()
    assert transfer(client, server, Disconnect(4)) == [Disconnect(4)]
    assert client.state is S.CLOSED and server.state is S.CLOSED
    assert raises(server, b"\xc0\x00") == ReasonCode.PROTOCOL_ERROR  # nothing after it


def test_disconnect_from_server_v5_and_v311() -> None:
    client, server = connected()
    assert transfer(server, client, Disconnect(0x8B)) == [Disconnect(0x8B)]
    client, server = connected(4)
    assert server.send(Disconnect(0x8B)) == b""  # 3.1.1: just close
    assert server.state is S.CLOSED
    assert raises(client, b"\xe0\x00") == ReasonCode.PROTOCOL_ERROR


def test_disconnect_session_expiry_rules() -> None:
    client, server = connected()
    with pytest.raises(LocalProtocolError):
        client.send(Disconnect(properties=Properties(session_expiry_interval=10)))
    assert raises(server, bytes.fromhex("e0 07 00 05 11 0000000a")) == (
        ReasonCode.PROTOCOL_ERROR)
    client, server = connected(connect=Connect("c", properties=Properties(
        session_expiry_interval=60)))
    packet = Disconnect(properties=Properties(session_expiry_interval=10))
    assert transfer(client, server, packet) == [packet]
    client, server = connected()
    with pytest.raises(LocalProtocolError):  # [MQTT-3.14.2-2] (5.0)
        server.send(packet)
    assert raises(client, bytes.fromhex("e0 07 00 05 11 00000000")) == ReasonCode.PROTOCOL_ERROR


# ------------------------------------------------------------------ error bytes


def test_error_before_connack_v5_gives_connack() -> None:
    server = Connection(Role.SERVER)
    # A 5.0 CONNECT with the reserved flag set.
    error_code = raises(server, bytes.fromhex("10 0e 0004 4d515454 05 03 003c 00 0001 61"))
    assert error_code == ReasonCode.MALFORMED_PACKET
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()  # stays failed
    out = decode_one(server.error_bytes(info.value), 5)
    assert isinstance(out, ConnAck) and out.reason_code == ReasonCode.MALFORMED_PACKET
    assert out.properties.reason_string
    assert server.state is S.CLOSED
    assert server.error_bytes(info.value) == b""  # only once


@pytest.mark.parametrize(("data", "expected"), [
    ("10 0d 0004 4d515454 06 02 003c 0001 61", "20 02 00 01"),  # level 6
    ("10 0c 0003 585958 04 02 003c 0001 61", "20 02 00 01"),  # unknown name
    ("10 0d 0004 4d515454 04 03 003c 0001 61", ""),  # 3.1.1 malformed: close, no CONNACK
    ("10 0c 0004 4d515454 04 00 003c 0000", "20 02 00 02"),  # empty id, clean session 0
    ("10 0e 0004 4d515454 04 02 003c 0000 0000", ""),  # trailing bytes: malformed
    ("30 02 0000", ""),  # first packet not CONNECT, level unknown
    ("10 0e 0006 4d5149736470 03 00 003c 0000", "20 02 00 02"),  # 3.1 empty id
])
def test_error_before_connack_v311(data: str, expected: str) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_packets(bytes.fromhex(data))
    assert server.error_bytes(info.value) == bytes.fromhex(expected)


def test_too_large_connect_answered_in_its_version() -> None:
    server = Connection(Role.SERVER, max_packet_size=20)
    data = Connection(Role.CLIENT, protocol_level=5).send(Connect("x" * 40))
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_packets(data[:14])  # the header and the start of the body only
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    out = decode_one(server.error_bytes(info.value), 5)
    assert isinstance(out, ConnAck) and out.reason_code == ReasonCode.PACKET_TOO_LARGE


def test_error_after_connack() -> None:
    client, server = connected()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_packets(b"\x30\x03\x00\x00\x00")
    data = server.error_bytes(info.value)
    received = client.receive_packets(data)
    assert len(received) == 1 and isinstance(received[0], Disconnect)
    assert received[0].reason_code == ReasonCode.PROTOCOL_ERROR
    client, server = connected(4)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_packets(b"\x30\x02\x00\x00")
    assert server.error_bytes(info.value) == b""


def test_error_in_client_role() -> None:
    client, _ = connected()
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_packets(b"\x82\x06\x00\x01\x00\x01a\x00")  # SUBSCRIBE to a client
    out = decode_one(client.error_bytes(info.value), 5)
    assert out == Disconnect(ReasonCode.PROTOCOL_ERROR, out.properties)  # type: ignore[union-attr]
    assert client.state is S.CLOSED


def test_error_code_not_allowed_in_connack_is_mapped() -> None:
    server = Connection(Role.SERVER, receive_maximum=1)
    data = Connection(Role.CLIENT, protocol_level=5).send(Connect("c"))
    data += bytes.fromhex("32 06 0001 61 0001 00 32 06 0001 61 0002 00")
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_packets(data)
    assert info.value.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    out = decode_one(server.error_bytes(info.value), 5)
    assert isinstance(out, ConnAck) and out.reason_code == ReasonCode.PROTOCOL_ERROR


# ------------------------------------------------------------------ the state table


def test_state_table_is_printable() -> None:
    text = format_transitions()
    assert "SERVER  AWAIT_CONNECT  receive  CONNECT      AWAIT_CONNACK" in text
    assert len(text.splitlines()) == len(TRANSITIONS) + 1


def test_state_table_shape() -> None:
    # A server never sends CONNECT and a client never receives one.
    for role, _state, direction, ptype in TRANSITIONS:
        if ptype is PacketType.CONNECT:
            assert (role is Role.SERVER) == (direction is Direction.RECEIVE)
    assert (Role.SERVER, S.CONNECTED, Direction.RECEIVE, PacketType.CONNECT) not in TRANSITIONS


@pytest.mark.parametrize(("data", "why"), [
    ("30 03 0001 61", "first packet not CONNECT"),
    ("c0 00", "PINGREQ first"),
    ("f0 00", "AUTH first"),
])
def test_first_packet_must_be_connect(data: str, why: str) -> None:
    assert raises(Connection(Role.SERVER), bytes.fromhex(data)) == ReasonCode.PROTOCOL_ERROR


def test_packets_a_role_may_not_receive() -> None:
    client, server = connected()
    second_connect = Connection(Role.CLIENT, protocol_level=5).send(Connect("c"))
    assert raises(server, second_connect) == ReasonCode.PROTOCOL_ERROR
    for data in ("20 03 000000", "90 04 0001 00 00", "b0 04 0001 00 00", "d0 00"):
        _, server = connected()
        assert raises(server, bytes.fromhex(data)) == ReasonCode.PROTOCOL_ERROR
    for data in ("82 06 0001 0001 61 00", "a2 05 0001 0001 61", "c0 00", "10 00"):
        client, _ = connected()
        assert raises(client, bytes.fromhex(data)) == ReasonCode.PROTOCOL_ERROR
    # Before its CONNACK, a client accepts only CONNACK (and AUTH).
    client = Connection(Role.CLIENT, protocol_level=4)
    client.send(Connect("c", protocol_level=4))
    assert raises(client, bytes.fromhex("30 03 0001 61")) == ReasonCode.PROTOCOL_ERROR


def test_type_is_checked_before_the_body_arrives() -> None:
    _, server = connected()
    assert raises(server, b"\x20") == ReasonCode.PROTOCOL_ERROR


def test_sending_what_the_state_forbids() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(ConnAck())  # no CONNECT yet
    client = Connection(Role.CLIENT, protocol_level=4)
    with pytest.raises(LocalProtocolError):
        client.send(Publish("a"))  # before CONNECT
    with pytest.raises(LocalProtocolError):
        client.send(Connect("c"))  # level 5 CONNECT on a 3.1.1 connection
    client, server = connected(4)
    with pytest.raises(LocalProtocolError):
        server.send(ConnAck())  # twice
    with pytest.raises(LocalProtocolError):
        server.send(Auth())  # 3.1.1
    with pytest.raises(LocalProtocolError):
        server.send(Connect("c", protocol_level=4))
    with pytest.raises(LocalProtocolError):
        client.send(SubAck(1, (0,)))
    with pytest.raises(LocalProtocolError):
        client.send(PingResp())
    server = Connection(Role.SERVER)
    server.receive_packets(Connection(Role.CLIENT, protocol_level=5).send(Connect("c")))
    with pytest.raises(LocalProtocolError):
        server.send(Publish("a"))  # before CONNACK
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT)


def test_ping() -> None:
    client, server = connected(4)
    assert transfer(client, server, PingReq()) == [PingReq()]
    assert transfer(server, client, PingResp()) == [PingResp()]


def test_request_problem_information_zero_strips_reason_strings() -> None:
    client, server = connected(connect=Connect("c", properties=Properties(
        request_problem_information=0)))
    transfer(client, server, Publish("a", qos=1, packet_id=1))
    assert transfer(server, client, PubAck(1, 0x80, Properties(reason_string="no"))) == [
        PubAck(1, 0x80)]


# ------------------------------------------------------------------ receive buffer


def test_byte_at_a_time_equals_all_at_once() -> None:
    client = Connection(Role.CLIENT, protocol_level=5)
    data = client.send(Connect("c"))
    data += b"".join(client.send(Publish(f"t/{i}", bytes(i), qos=1, packet_id=i + 1))
                     for i in range(50))
    whole = Connection(Role.SERVER).receive_packets(data)
    server = Connection(Role.SERVER)
    trickled = []
    for i in range(len(data)):
        trickled += server.receive_packets(data[i:i + 1])
    assert trickled == whole and len(whole) == 51


def test_large_packet_in_small_reads_and_compaction() -> None:
    client, server = connected()
    payload = bytes(range(256)) * 400
    data = b"".join(client.send(Publish("big", payload)) for _ in range(3))
    received = []
    for i in range(0, len(data), 1000):
        received += server.receive_packets(data[i:i + 1000])
    assert received == [Publish("big", payload)] * 3
    assert server.next_event() is None


# ------------------------------------------------------------------ answers after DISCONNECT


@pytest.mark.parametrize("level", LEVELS)
def test_server_answers_what_came_before_the_clients_disconnect(level: int) -> None:
    # A device writes CONNECT, PUBLISH QoS 1, DISCONNECT at once; the server answers only after
    # its store commits, so the CONNACK ([MQTT-3.1.4-5] (5.0)) and PUBACK follow the DISCONNECT.
    client = Connection(Role.CLIENT, protocol_level=level)
    server = Connection(Role.SERVER)
    data = (client.send(Connect("dev", protocol_level=level))
            + client.send(Publish("t", b"x", qos=1, packet_id=3)) + client.send(Disconnect()))
    assert [type(p) for p in server.receive_packets(data)] == [Connect, Publish, Disconnect]
    assert server.state is S.CLOSED
    assert decode_one(server.send(ConnAck()), level) == ConnAck()
    assert decode_one(server.send(PubAck(3)), level) == PubAck(3)
    with pytest.raises(LocalProtocolError):
        server.send(Publish("t", b"x"))  # nothing new after it
    with pytest.raises(LocalProtocolError):
        client.send(PingReq())


def test_response_topic_must_be_a_topic_name() -> None:
    _, server = connected()
    # PUBLISH "t" with Response Topic "r/#" ([MQTT-3.3.2-14] (5.0)).
    assert raises(server, bytes.fromhex("30 0a 0001 74 06 08 0003 722f23")) == (
        ReasonCode.PROTOCOL_ERROR)
    server = Connection(Role.SERVER)
    will = Connect("c", will=Will("w", b"", properties=Properties(response_topic="r/+")))
    data = Connection(Role.CLIENT, protocol_level=5).send(will)
    assert raises(server, data) == ReasonCode.PROTOCOL_ERROR


# ------------------------------------------------------------------ errors within the peer's limit


@pytest.mark.parametrize("maximum", [1, 2, 3, 4, 5, 6, 20])
def test_error_bytes_fit_the_peers_maximum_packet_size(maximum: int) -> None:
    # [MQTT-3.1.2-24], 3.1.2.11.4 (5.0): the reason string goes first, then the properties,
    # then, if even the bare packet is too large, nothing is sent. It never raises.
    error = RemoteProtocolError(ReasonCode.MALFORMED_PACKET, "a long reason " * 5)
    invalid_publish = bytes.fromhex("30 03 0001 2b")  # wildcard topic name
    connect = Connect("c", properties=Properties(maximum_packet_size=maximum))
    server = Connection(Role.SERVER)
    server.receive_packets(Connection(Role.CLIENT, protocol_level=5).send(connect))
    with pytest.raises(RemoteProtocolError):
        server.receive_packets(invalid_publish)
    data = server.error_bytes(error)  # before the CONNACK: a CONNACK
    assert len(data) <= maximum
    assert data == b"" or data[0] == 0x20

    if maximum < 5:
        return  # no CONNACK fits: nothing can follow (test below)
    _, server = connected(connect=connect)
    with pytest.raises(RemoteProtocolError):
        server.receive_packets(invalid_publish)
    data = server.error_bytes(error)  # after it: a DISCONNECT
    assert len(data) <= maximum
    assert data == b"" or data[0] == 0xE0


@pytest.mark.parametrize("maximum", [1, 2, 3, 4, 30])
def test_disconnect_fits_the_peers_maximum_packet_size(maximum: int) -> None:
    connect = Connect("c", properties=Properties(maximum_packet_size=maximum))
    server = Connection(Role.SERVER)
    server.receive_packets(Connection(Role.CLIENT, protocol_level=5).send(connect))
    if maximum < 5:
        with pytest.raises(LocalProtocolError):
            server.send(ConnAck())  # cannot be sent: the connection is over
        assert server.state is S.CLOSED
        error = RemoteProtocolError(ReasonCode.PROTOCOL_ERROR, "x")
        assert server.error_bytes(error) == b""  # nothing may precede the CONNACK
        return
    server.send(ConnAck())
    data = server.send(Disconnect(ReasonCode.ADMINISTRATIVE_ACTION,
                                  Properties(reason_string="shutting down " * 4)))
    assert 0 < len(data) <= maximum
    assert server.state is S.CLOSED


def test_disconnect_too_large_even_bare_is_not_sent() -> None:
    _, server = connected()
    server.peer_maximum_packet_size = 2  # as if the CONNECT had said 2
    assert server.send(Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)) == b""
    assert server.state is S.CLOSED
