"""Property tests of the codec and the connection.

1. Round trip: every valid packet of every type, for 3.1, 3.1.1 and 5.0, decodes to what was
   encoded (for 3.1/3.1.1, after dropping what those versions cannot carry).
2. Garbage: bytes fed to a SERVER or a CLIENT connection give packets or a RemoteProtocolError,
   nothing else, and the same result whether fed whole or one byte at a time; the error's
   answer (`error_bytes`) never raises and fits the peer's Maximum Packet Size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_broker.mqtt.codec import (
    CONNACK_V3_TO_V5,
    REASON_CODES,
    connack_return_code,
    decode,
    encode,
    split_frame,
)
from edge_broker.mqtt.connection import Connection
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
from edge_broker.mqtt.properties import (
    NO_PROPERTIES,
    PROPERTY_TABLE,
    WILL,
    Properties,
    PropertyType,
)
from edge_broker.mqtt.types import MAX_VARIABLE_BYTE_INTEGER, PacketType, PropertyId, Role

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ strategies

_chars = st.characters(codec="utf-8", exclude_characters="\x00")
texts = st.text(_chars, max_size=12)
topic_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00+#"), min_size=1,
                      max_size=12)
filters = st.text(_chars, min_size=1, max_size=12)
binaries = st.binary(max_size=16)
packet_ids = st.integers(1, 0xFFFF)
levels = st.sampled_from([3, 4, 5])

_ZERO_ONE = {PropertyId.PAYLOAD_FORMAT_INDICATOR, PropertyId.REQUEST_PROBLEM_INFORMATION,
             PropertyId.REQUEST_RESPONSE_INFORMATION, PropertyId.MAXIMUM_QOS,
             PropertyId.RETAIN_AVAILABLE, PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,
             PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
             PropertyId.SHARED_SUBSCRIPTION_AVAILABLE}
_NON_ZERO = {PropertyId.RECEIVE_MAXIMUM, PropertyId.MAXIMUM_PACKET_SIZE}


def _value_strategy(pid: PropertyId, ptype: PropertyType) -> st.SearchStrategy[Any]:
    if pid in _ZERO_ONE:
        return st.sampled_from([0, 1])
    if pid is PropertyId.TOPIC_ALIAS:
        return st.integers(0, 6)
    low = 1 if pid in _NON_ZERO else 0
    if ptype is PropertyType.BYTE:
        return st.integers(0, 0xFF)
    if ptype is PropertyType.TWO_BYTE_INTEGER:
        return st.integers(low, 0xFFFF)
    if ptype is PropertyType.FOUR_BYTE_INTEGER:
        return st.integers(low, 0xFFFF_FFFF)
    if ptype is PropertyType.VARIABLE_BYTE_INTEGER:
        return st.integers(1, MAX_VARIABLE_BYTE_INTEGER)
    if ptype is PropertyType.UTF8_STRING:
        return texts
    if ptype is PropertyType.BINARY_DATA:
        return binaries
    return st.tuples(texts, texts)


@functools.cache
def properties(kind: PacketType | str) -> st.SearchStrategy[Properties]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for spec in PROPERTY_TABLE.values():
        if kind not in spec.allowed_in:
            continue
        value = _value_strategy(spec.id, spec.type)
        if spec.id is PropertyId.USER_PROPERTY:
            fields[spec.attribute] = st.lists(value, max_size=3).map(tuple)
        elif spec.id is PropertyId.SUBSCRIPTION_IDENTIFIER:
            most = 3 if kind is PacketType.PUBLISH else 1
            fields[spec.attribute] = st.lists(value, max_size=most).map(tuple)
        else:
            fields[spec.attribute] = value
    sparse = st.fixed_dictionaries({}, optional=fields).map(lambda kw: Properties(**kw))
    return st.just(NO_PROPERTIES) | sparse


def reason_codes(ptype: PacketType) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted(REASON_CODES[ptype]))


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(draw(topic_names), draw(binaries), draw(st.integers(0, 2)),
                    draw(st.booleans()), draw(properties(WILL)))
    username = draw(st.none() | texts)
    password = draw(st.none() | binaries)
    if level < 5 and username is None:
        password = None
    return Connect(draw(texts), level, draw(st.booleans()), draw(st.integers(0, 0xFFFF)),
                   username, password, will, draw(properties(PacketType.CONNECT)))


@st.composite
def connacks(draw: st.DrawFn, level: int) -> ConnAck:
    code = draw(reason_codes(PacketType.CONNACK))
    return ConnAck(code < 0x80 and draw(st.booleans()), code,
                   draw(properties(PacketType.CONNACK)))


@st.composite
def publishes(draw: st.DrawFn, level: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties(PacketType.PUBLISH))
    topic = draw(topic_names)
    if level == 5 and props.topic_alias is not None and draw(st.booleans()):
        topic = ""
    return Publish(topic, draw(st.binary(max_size=64)), qos, draw(st.booleans()),
                   qos > 0 and draw(st.booleans()), draw(packet_ids) if qos else None, props)


def acks(cls: type[PubAck] | type[PubRec] | type[PubRel] | type[PubComp],
         ptype: PacketType) -> st.SearchStrategy[Packet]:
    return st.builds(cls, packet_ids, reason_codes(ptype), properties(ptype))


subscriptions = st.builds(Subscription, filters, st.integers(0, 2), st.booleans(), st.booleans(),
                          st.integers(0, 2))


@functools.cache
def packet_strategies(level: int) -> dict[type, st.SearchStrategy[Packet]]:
    strategies: dict[type, st.SearchStrategy[Packet]] = {
        Connect: connects(level),
        ConnAck: connacks(level),
        Publish: publishes(level),
        PubAck: acks(PubAck, PacketType.PUBACK),
        PubRec: acks(PubRec, PacketType.PUBREC),
        PubRel: acks(PubRel, PacketType.PUBREL),
        PubComp: acks(PubComp, PacketType.PUBCOMP),
        Subscribe: st.builds(Subscribe, packet_ids,
                             st.lists(subscriptions, min_size=1, max_size=4).map(tuple),
                             properties(PacketType.SUBSCRIBE)),
        SubAck: st.builds(SubAck, packet_ids,
                          st.lists(reason_codes(PacketType.SUBACK), min_size=1, max_size=4)
                          .map(tuple), properties(PacketType.SUBACK)),
        Unsubscribe: st.builds(Unsubscribe, packet_ids,
                               st.lists(filters, min_size=1, max_size=4).map(tuple),
                               properties(PacketType.UNSUBSCRIBE)),
        UnsubAck: st.builds(UnsubAck, packet_ids,
                            st.lists(reason_codes(PacketType.UNSUBACK), min_size=1, max_size=4)
                            .map(tuple), properties(PacketType.UNSUBACK)),
        PingReq: st.just(PingReq()),
        PingResp: st.just(PingResp()),
        Disconnect: st.builds(Disconnect, reason_codes(PacketType.DISCONNECT),
                              properties(PacketType.DISCONNECT)),
    }
    if level == 5:
        strategies[Auth] = st.builds(Auth, reason_codes(PacketType.AUTH),
                                     properties(PacketType.AUTH))
    return strategies


@functools.cache
def packets(level: int, types: tuple[type, ...] | None = None) -> st.SearchStrategy[Packet]:
    strategies = packet_strategies(level)
    return st.one_of([strategy for cls, strategy in strategies.items()
                      if types is None or cls in types])


def downgrade(packet: Packet, level: int) -> Packet:
    """What a 3.1/3.1.1 receiver decodes from `packet` encoded for `level`."""
    if level == 5:
        return packet
    replace: dict[str, Any] = {}
    if hasattr(packet, "properties"):
        replace["properties"] = NO_PROPERTIES
    if isinstance(packet, Connect) and packet.will is not None:
        replace["will"] = dataclasses.replace(packet.will, properties=NO_PROPERTIES)
    elif isinstance(packet, ConnAck):
        code = packet.reason_code
        replace["reason_code"] = CONNACK_V3_TO_V5[connack_return_code(code)] if code else 0
        if level == 3:
            replace["session_present"] = False
    elif isinstance(packet, PubAck | PubRec | PubRel | PubComp | Disconnect):
        replace["reason_code"] = 0
    elif isinstance(packet, SubAck):
        replace["reason_codes"] = tuple(min(code, 0x80) for code in packet.reason_codes)
    elif isinstance(packet, UnsubAck):
        replace["reason_codes"] = ()
    elif isinstance(packet, Subscribe):
        replace["subscriptions"] = tuple(Subscription(s.topic_filter, s.qos)
                                         for s in packet.subscriptions)
    return dataclasses.replace(packet, **replace) if replace else packet


def decode_all(data: bytes, level: int) -> Packet:
    frame = split_frame(data, 0, len(data))
    assert frame is not None
    first, body_start, body_end = frame
    assert body_end == len(data)
    return decode(first, data[body_start:], level)


# ------------------------------------------------------------------ round trips


@FAST
@given(st.data())
def test_round_trip_v5(data: st.DataObject) -> None:
    packet = data.draw(packets(5))
    encoded = encode(packet, 5)
    assert decode_all(encoded, 5) == packet


@FAST
@given(st.data(), st.sampled_from([3, 4]))
def test_round_trip_v3(data: st.DataObject, level: int) -> None:
    packet = data.draw(packets(level))
    encoded = encode(packet, level)
    decoded = decode_all(encoded, level)
    assert decoded == downgrade(packet, level)
    assert encode(decoded, level) == encoded


# ------------------------------------------------------------------ garbage


def _server_connack(level: int) -> ConnAck:
    if level == 5:
        return ConnAck(properties=Properties(topic_alias_maximum=4, receive_maximum=3,
                                             maximum_packet_size=400))
    return ConnAck()


def _new_connection(role: Role, level: int) -> Connection:
    if role is Role.SERVER:
        return Connection(Role.SERVER, max_packet_size=400, receive_maximum=3,
                          topic_alias_maximum=4)
    client = Connection(Role.CLIENT, protocol_level=level, max_packet_size=400,
                        receive_maximum=3, topic_alias_maximum=4)
    props = NO_PROPERTIES
    if level == 5:
        props = Properties(topic_alias_maximum=4, receive_maximum=3, maximum_packet_size=400,
                           authentication_method="X")
    client.send(Connect("c", level, properties=props))
    client.send(Subscribe(1, (Subscription("a"),)))
    client.send(Unsubscribe(2, ("a", "b")))
    return client


def _feed(conn: Connection, chunks: list[bytes]) -> tuple[list[Packet], int | None]:
    """Feed chunks, pulling events one by one; the server answers a CONNECT with a CONNACK."""
    received: list[Packet] = []
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while (packet := conn.next_event()) is not None:
                received.append(packet)
                if isinstance(packet, Connect) and conn.role is Role.SERVER:
                    try:
                        conn.send(_server_connack(packet.protocol_level))
                    except LocalProtocolError:
                        # The client's Maximum Packet Size leaves no room for a CONNACK.
                        return received, -1
    except RemoteProtocolError as exc:
        answer = conn.error_bytes(exc)  # never raises [MQTT-3.1.2-24] (5.0)
        assert isinstance(answer, bytes) and len(answer) <= conn.peer_maximum_packet_size
        return received, exc.reason_code
    return received, None


_SERVER_RECEIVES = (Publish, PubAck, PubRec, PubRel, PubComp, Subscribe, Unsubscribe, PingReq,
                    Disconnect, Auth)
_CLIENT_RECEIVES = (Publish, PubAck, PubRec, PubRel, PubComp, SubAck, UnsubAck, PingResp,
                    Disconnect, Auth)


@st.composite
def streams(draw: st.DrawFn, role: Role, level: int) -> bytes:
    """Mostly valid traffic for `role` to receive, with random bytes and mutations mixed in."""
    parts: list[bytes] = []
    if role is Role.SERVER:
        connect = Connect("c", level) if draw(st.booleans()) else draw(connects(level))
        parts.append(encode(connect, level))
    else:
        parts.append(encode(_server_connack(level), level))
    receivable = _SERVER_RECEIVES if role is Role.SERVER else _CLIENT_RECEIVES
    for _ in range(draw(st.integers(0, 5))):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            parts.append(draw(st.binary(max_size=12)))
        elif choice == 1:
            parts.append(encode(draw(packets(level)), level))
        else:
            parts.append(encode(draw(packets(level, receivable)), level))
    stream = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 2))):
        if stream:
            position = draw(st.integers(0, len(stream) - 1))
            stream[position] = draw(st.integers(0, 255))
    return bytes(stream)


def _check_same_either_way(role: Role, level: int, stream: bytes) -> None:
    whole = _feed(_new_connection(role, level), [stream])
    trickle = _feed(_new_connection(role, level),
                    [stream[i:i + 1] for i in range(len(stream))])
    assert whole == trickle


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([Role.SERVER, Role.CLIENT]), levels)
def test_random_bytes(data: bytes, role: Role, level: int) -> None:
    _check_same_either_way(role, level, data)


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from([Role.SERVER, Role.CLIENT]), levels)
def test_mutated_traffic(data: st.DataObject, role: Role, level: int) -> None:
    _check_same_either_way(role, level, data.draw(streams(role, level)))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.booleans(), st.binary(max_size=40))
def test_error_answer_fits_a_tiny_maximum_packet_size(maximum: int, connack: bool,
                                                       garbage: bytes) -> None:
    # A v5 CONNECT announcing a tiny Maximum Packet Size, then anything (issue 7, item 7).
    conn = Connection(Role.SERVER)
    conn.receive_data(encode(Connect("c", properties=Properties(maximum_packet_size=maximum)),
                             5))
    try:
        assert conn.next_event() is not None
        if connack:
            try:
                conn.send(ConnAck())
            except LocalProtocolError:
                assert maximum < 5  # no CONNACK fits: the connection is over
        conn.receive_packets(garbage)
    except RemoteProtocolError as exc:
        answer = conn.error_bytes(exc)
        assert len(answer) <= maximum
