"""Framing, decoding and encoding of MQTT control packets, 3.1 / 3.1.1 / 5.0.

`split_frame` finds the next complete packet in a buffer, `decode` turns one packet's body
into a packet object and `encode` does the reverse. The packet objects are version-neutral
(MQTT 5 reason codes and properties); for 3.1/3.1.1 this module translates:

* properties are not on the wire: dropped when encoding, `NO_PROPERTIES` when decoding;
* CONNACK return codes 1..5 <-> reason codes 0x84, 0x85, 0x88, 0x86, 0x87 (`CONNACK_V3_TO_V5`);
  when encoding, the other failure codes go to the nearest return code (`connack_return_code`);
* SUBACK failure codes (>= 0x80) are all 0x80, the only failure return code of 3.1.1;
* PUBACK/PUBREC/PUBREL/PUBCOMP/DISCONNECT reason codes, subscription options other than QoS
  and UNSUBACK reason codes are dropped when encoding and 0 / defaults when decoding.

Errors: a packet that cannot be parsed is `RemoteProtocolError(MALFORMED_PACKET)`; one that
parses but breaks a rule is `PROTOCOL_ERROR` (the two terms of 1.2 (5.0)), unless the spec names
another code. Encoding a packet that cannot be put on the wire raises `LocalProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from .errors import LocalProtocolError, RemoteProtocolError
from .packets import (
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
from .properties import (
    NO_PROPERTIES,
    WILL,
    decode_properties,
    encode_properties,
    encode_properties_body,
)
from .types import PacketType, ProtocolLevel, ReasonCode
from .wire import (
    Buffer,
    Reader,
    decode_utf8,
    encode_binary,
    encode_u16,
    encode_utf8,
    encode_varint,
    malformed,
    pack_u16,
    protocol_error,
)

_P = PacketType
_V5: Final = ProtocolLevel.MQTT_5

# --------------------------------------------------------------------------- reason codes

# The reason codes each packet may carry, from the packet sections of the 5.0 spec (3.2.2.2,
# 3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1). Receiving another one
# is a Protocol Error; sending one is a LocalProtocolError.
REASON_CODES: Final[dict[PacketType, frozenset[int]]] = {
    _P.CONNACK: frozenset({
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
        0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}),
    _P.PUBACK: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    _P.PUBREC: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    _P.PUBREL: frozenset({0x00, 0x92}),
    _P.PUBCOMP: frozenset({0x00, 0x92}),
    _P.SUBACK: frozenset({
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    _P.UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    _P.DISCONNECT: frozenset({
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
        0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
        0xA2}),
    _P.AUTH: frozenset({0x00, 0x18, 0x19}),
}

# [MQTT-3.9.3-2] (3.1.1): the SUBACK return codes of 3.1.1.
_SUBACK_V3_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})

# CONNACK return code of 3.1/3.1.1 (3.2.2.3 (3.1.1)) -> MQTT 5 reason code.
CONNACK_V3_TO_V5: Final[dict[int, int]] = {
    0: ReasonCode.SUCCESS,
    1: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    2: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    3: ReasonCode.SERVER_UNAVAILABLE,
    4: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    5: ReasonCode.NOT_AUTHORIZED,
}
# The reverse, plus the 5.0 failure codes that have an obvious 3.1.1 meaning.
CONNACK_V5_TO_V3: Final[dict[int, int]] = {
    **{v5: v3 for v3, v5 in CONNACK_V3_TO_V5.items()},
    ReasonCode.SERVER_BUSY: 3,
    ReasonCode.BAD_AUTHENTICATION_METHOD: 4,
    ReasonCode.BANNED: 5,
}


def connack_return_code(reason_code: int) -> int:
    """The 3.1/3.1.1 CONNACK return code for an MQTT 5 reason code.

    Failure codes without a 3.1.1 equivalent become 3 "Server unavailable": it tells the client
    the refusal is not about its credentials or identifier.
    """
    code = CONNACK_V5_TO_V3.get(reason_code)
    if code is not None:
        return code
    if 0x80 <= reason_code <= 0xFF:
        return 3
    raise LocalProtocolError(f"0x{reason_code:02X} is not a CONNACK reason code")


# --------------------------------------------------------------------------- framing


def split_frame(buf: Buffer, start: int, max_packet_size: int) -> tuple[int, int, int] | None:
    """Locate the packet that starts at `buf[start]`.

    Returns (first_byte, body_start, body_end) once the whole packet is in `buf`, None while
    more bytes are needed. Raises RemoteProtocolError: MALFORMED_PACKET for a Remaining Length
    longer than four bytes (1.5.5 (5.0)), PACKET_TOO_LARGE as soon as the header shows that
    the packet (fixed header included, 3.1.2.11.4 (5.0)) exceeds `max_packet_size`.
    """
    n = len(buf)
    pos = start + 1
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= n:
            return None
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    else:
        raise malformed("remaining length is longer than four bytes")
    if pos - start + value > max_packet_size:
        raise RemoteProtocolError(
            ReasonCode.PACKET_TOO_LARGE,
            f"packet of {pos - start + value} bytes exceeds the maximum packet size "
            f"{max_packet_size}")
    end = pos + value
    if end > n:
        return None
    return buf[start], pos, end


def peek_connect_protocol_level(body: Buffer) -> int | None:
    """The protocol level of a (possibly partial) CONNECT body, if name and level are known.

    Used to choose the CONNACK format for an error found before the CONNECT is decoded.
    """
    try:
        reader = Reader(body)
        name = reader.utf8()
        level = reader.u8()
    except RemoteProtocolError:
        return None
    return level if _supported(name, level) else None


def _supported(name: str, level: int) -> bool:
    if name == "MQTT":
        return level in (ProtocolLevel.MQTT_3_1_1, ProtocolLevel.MQTT_5)
    return name == "MQIsdp" and level == ProtocolLevel.MQTT_3_1


# --------------------------------------------------------------------------- decoding


def decode(first_byte: int, body: Buffer, protocol_level: int) -> Packet:
    """Decode one packet. `protocol_level` is ignored for CONNECT, which carries its own."""
    ptype = first_byte >> 4
    flags = first_byte & 0x0F
    if ptype == 3:
        return decode_publish(flags, body, protocol_level)
    if ptype == 0:
        raise malformed("packet type 0 is reserved")
    if ptype == 15 and protocol_level < _V5:
        raise malformed("packet type 15 is reserved before MQTT 5")
    # [MQTT-2.1.3-1] (5.0), [MQTT-2.2.2-1] (3.1.1): reserved flags have fixed values.
    expected = 2 if ptype in (6, 8, 10) else 0
    if flags != expected and not (flags == 0x0A and expected == 2
                                  and protocol_level == ProtocolLevel.MQTT_3_1):
        # MQTT 3.1 (2.1 Fixed header, DUP): PUBREL, SUBSCRIBE and UNSUBSCRIBE use QoS 1 and
        # carry DUP when they are sent again; the fixed flags are a 3.1.1 rule.
        raise malformed(
            f"{PacketType(ptype).name} fixed header flags are 0x{flags:X}, not 0x{expected:X}")
    return _DECODERS[ptype](body, protocol_level)


def _packet_id(reader: Reader) -> int:
    packet_id = reader.u16("the packet identifier")
    if packet_id == 0:
        # [MQTT-2.2.1-3] (5.0), [MQTT-2.3.1-1] (3.1.1)
        raise protocol_error("packet identifier 0")
    return packet_id


def _check_reason(ptype: PacketType, code: int) -> int:
    if code not in REASON_CODES[ptype]:
        raise protocol_error(f"reason code 0x{code:02X} is not allowed in {ptype.name}")
    return code


def decode_publish(flags: int, body: Buffer, level: int) -> Publish:
    """Decode a PUBLISH from the low four bits of its first byte and its body (the hot path)."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4] (5.0)
    dup = bool(flags & 8)
    if dup and not qos:
        raise malformed("PUBLISH with QoS 0 and DUP set")  # [MQTT-3.3.1-2] (5.0)
    n = len(body)
    if n < 2:
        raise malformed("PUBLISH ends inside the topic name")
    pos = 2 + ((body[0] << 8) | body[1])
    if pos > n:
        raise malformed("PUBLISH ends inside the topic name")
    try:
        topic = str(body[2:pos], "utf-8")
    except UnicodeDecodeError:
        topic = decode_utf8(body[2:pos])  # raises the MALFORMED_PACKET error
    if "\x00" in topic:
        raise malformed("U+0000 in the topic name")  # [MQTT-1.5.4-2] (5.0)
    packet_id = None
    if qos:
        if pos + 2 > n:
            raise malformed("PUBLISH ends inside the packet identifier")
        packet_id = (body[pos] << 8) | body[pos + 1]
        if not packet_id:
            raise protocol_error("PUBLISH with packet identifier 0")  # [MQTT-2.2.1-3] (5.0)
        pos += 2
    properties = NO_PROPERTIES
    if level >= _V5:
        if pos < n and body[pos] == 0:  # the common case: no properties
            pos += 1
        else:
            reader = Reader(body, pos)
            properties = decode_properties(reader, _P.PUBLISH)
            pos = reader.pos
    return Publish(topic, bytes(body[pos:]), qos, bool(flags & 1), dup, packet_id, properties)


def _decode_connect(body: Buffer, _level: int) -> Connect:
    r = Reader(body)
    name = r.utf8("the protocol name")
    level = r.u8("the protocol level")
    if not _supported(name, level):
        # [MQTT-3.1.2-1], [MQTT-3.1.2-2] (5.0): answer CONNACK 0x84 (3.1.1: return code 1).
        raise RemoteProtocolError(
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            f"unsupported protocol {name!r} level {level}")
    flags = r.u8("the connect flags")
    if flags & 0x01:
        raise malformed("CONNECT reserved flag is set")  # [MQTT-3.1.2-3] (5.0 and 3.1.1)
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    if will_flag:
        if will_qos == 3:
            raise malformed("CONNECT will QoS 3")  # 3.1.2.6 (5.0), [MQTT-3.1.2-14] (3.1.1)
    elif will_qos or will_retain:
        # 3.1.2.6 / 3.1.2.7 (5.0), [MQTT-3.1.2-13] / [MQTT-3.1.2-15] (3.1.1)
        raise malformed("CONNECT will QoS or will retain set without the will flag")
    has_password = flags & 0x40
    has_username = flags & 0x80
    if has_password and not has_username and level < _V5:
        raise malformed("CONNECT password without user name")  # [MQTT-3.1.2-22] (3.1.1)
    keep_alive = r.u16("keep alive")
    properties = decode_properties(r, _P.CONNECT) if level >= _V5 else NO_PROPERTIES
    client_id = r.utf8("the client identifier")
    will = None
    if will_flag:
        will_properties = decode_properties(r, WILL) if level >= _V5 else NO_PROPERTIES
        will_topic = r.utf8("the will topic")
        will_payload = r.binary("the will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = r.utf8("the user name") if has_username else None
    password = r.binary("the password") if has_password else None
    r.expect_end("CONNECT")
    return Connect(client_id, level, bool(flags & 0x02), keep_alive, username, password, will,
                   properties)


def _decode_connack(body: Buffer, level: int) -> ConnAck:
    r = Reader(body)
    flags = r.u8("the connect acknowledge flags")
    code = r.u8("the connect reason code")
    if level >= _V5:
        if flags & 0xFE:
            raise malformed("CONNACK reserved flags are set")  # [MQTT-3.2.2-1] (5.0)
        _check_reason(_P.CONNACK, code)
        # Lenient: a 5.0 CONNACK without the property length (remaining length 2) is read as
        # having no properties, as mosquitto does.
        properties = decode_properties(r, _P.CONNACK) if not r.at_end() else NO_PROPERTIES
        r.expect_end("CONNACK")
        return ConnAck(bool(flags & 1), code, properties)
    r.expect_end("CONNACK")
    if level == ProtocolLevel.MQTT_3_1:
        session_present = False  # 3.1 has a reserved byte here
    else:
        if flags & 0xFE:
            raise malformed("CONNACK reserved flags are set")  # [MQTT-3.2.2-1] (3.1.1)
        session_present = bool(flags & 1)
    reason = CONNACK_V3_TO_V5.get(code)
    if reason is None:
        raise protocol_error(f"reserved CONNACK return code {code}")  # 3.2.2.3 (3.1.1)
    return ConnAck(session_present, reason)


_AckClass = type[PubAck] | type[PubRec] | type[PubRel] | type[PubComp]


def _ack_decoder(cls: _AckClass, ptype: PacketType) -> Callable[[Buffer, int], Packet]:
    def decode_ack(body: Buffer, level: int) -> Packet:
        n = len(body)
        if n < 2:
            raise malformed(f"{ptype.name} ends inside the packet identifier")
        packet_id = (body[0] << 8) | body[1]
        if not packet_id:
            raise protocol_error(f"{ptype.name} with packet identifier 0")
        if n == 2:
            return cls(packet_id)
        if level < _V5:
            raise malformed(f"{n - 2} unexpected trailing bytes in {ptype.name}")
        code = _check_reason(ptype, body[2])
        if n == 3:  # 3.4.2.1 (5.0): no Property Length when the Remaining Length is < 4
            return cls(packet_id, code)
        r = Reader(body, 3)
        properties = decode_properties(r, ptype)
        r.expect_end(ptype.name)
        return cls(packet_id, code, properties)

    return decode_ack


def _decode_subscribe(body: Buffer, level: int) -> Subscribe:
    r = Reader(body)
    packet_id = _packet_id(r)
    properties = decode_properties(r, _P.SUBSCRIBE) if level >= _V5 else NO_PROPERTIES
    subscriptions: list[Subscription] = []
    while not r.at_end():
        topic_filter = r.utf8("a topic filter")
        if not topic_filter:
            raise malformed("empty topic filter")  # [MQTT-4.7.3-1] (5.0 and 3.1.1)
        options = r.u8("subscription options")
        qos = options & 3
        if level >= _V5:
            if options & 0xC0:
                raise malformed("subscription options reserved bits set")  # [MQTT-3.8.3-5]
            if qos == 3:
                raise protocol_error("subscription with maximum QoS 3")  # 3.8.3.1 (5.0)
            retain_handling = (options >> 4) & 3
            if retain_handling == 3:
                raise protocol_error("subscription with retain handling 3")  # 3.8.3.1 (5.0)
            subscriptions.append(Subscription(topic_filter, qos, bool(options & 4),
                                              bool(options & 8), retain_handling))
        else:
            if options & 0xFC or qos == 3:
                # [MQTT-3-8.3-4] (3.1.1)
                raise malformed(f"subscription requested QoS byte 0x{options:02X}")
            subscriptions.append(Subscription(topic_filter, qos))
    if not subscriptions:
        # [MQTT-3.8.3-3] (5.0 and 3.1.1)
        raise protocol_error("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _decode_suback(body: Buffer, level: int) -> SubAck:
    r = Reader(body)
    packet_id = _packet_id(r)
    properties = decode_properties(r, _P.SUBACK) if level >= _V5 else NO_PROPERTIES
    codes = bytes(r.take(r.remaining(), "SUBACK"))
    if not codes:
        raise protocol_error("SUBACK without reason codes")  # one per topic filter, 3.9.3
    allowed = REASON_CODES[_P.SUBACK] if level >= _V5 else _SUBACK_V3_CODES
    for code in codes:
        if code not in allowed:
            raise protocol_error(f"reason code 0x{code:02X} is not allowed in SUBACK")
    return SubAck(packet_id, tuple(codes), properties)


def _decode_unsubscribe(body: Buffer, level: int) -> Unsubscribe:
    r = Reader(body)
    packet_id = _packet_id(r)
    properties = decode_properties(r, _P.UNSUBSCRIBE) if level >= _V5 else NO_PROPERTIES
    topic_filters: list[str] = []
    while not r.at_end():
        topic_filter = r.utf8("a topic filter")
        if not topic_filter:
            raise malformed("empty topic filter")  # [MQTT-4.7.3-1]
        topic_filters.append(topic_filter)
    if not topic_filters:
        # [MQTT-3.10.3-2] (5.0 and 3.1.1)
        raise protocol_error("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(topic_filters), properties)


def _decode_unsuback(body: Buffer, level: int) -> UnsubAck:
    r = Reader(body)
    packet_id = _packet_id(r)
    if level < _V5:
        r.expect_end("UNSUBACK")  # 3.11.3 (3.1.1): no payload
        return UnsubAck(packet_id)
    properties = decode_properties(r, _P.UNSUBACK)
    codes = bytes(r.take(r.remaining(), "UNSUBACK"))
    if not codes:
        raise protocol_error("UNSUBACK without reason codes")  # one per topic filter, 3.11.3
    for code in codes:
        _check_reason(_P.UNSUBACK, code)
    return UnsubAck(packet_id, tuple(codes), properties)


def _decode_empty(cls: type[PingReq] | type[PingResp]) -> Callable[[Buffer, int], Packet]:
    # From an instance: compiled by mypyc, packet_type is an instance attribute (see
    # docs/compiled.md), and ClassVar in a dataclass is not supported there (mypyc/mypyc#1122).
    name = cls().packet_type.name

    def decode_empty(body: Buffer, _level: int) -> Packet:
        if len(body):
            raise malformed(f"{name} with a remaining length of {len(body)}")
        return cls()

    return decode_empty


def _decode_disconnect(body: Buffer, level: int) -> Disconnect:
    n = len(body)
    if n == 0:
        return Disconnect()  # 3.14.2.1 (5.0): reason 0 when the Remaining Length is 0
    if level < _V5:
        raise malformed(f"DISCONNECT with a remaining length of {n}")
    code = _check_reason(_P.DISCONNECT, body[0])
    if n == 1:  # 3.14.2.2.1 (5.0): no Property Length when the Remaining Length is < 2
        return Disconnect(code)
    r = Reader(body, 1)
    properties = decode_properties(r, _P.DISCONNECT)
    r.expect_end("DISCONNECT")
    return Disconnect(code, properties)


def _decode_auth(body: Buffer, _level: int) -> Auth:
    n = len(body)
    if n == 0:
        return Auth()  # 3.15.2.1 (5.0)
    code = _check_reason(_P.AUTH, body[0])
    if n == 1:  # lenient: not defined for AUTH, read like DISCONNECT
        return Auth(code)
    r = Reader(body, 1)
    properties = decode_properties(r, _P.AUTH)
    r.expect_end("AUTH")
    return Auth(code, properties)


def _not_here(_body: Buffer, _level: int) -> Packet:
    raise AssertionError("decode() handles packet types 0 and 3 itself")


_DECODERS: Final[tuple[Callable[[Buffer, int], Packet], ...]] = (
    _not_here,  # 0: reserved
    _decode_connect,
    _decode_connack,
    _not_here,  # 3: PUBLISH needs the flags
    _ack_decoder(PubAck, _P.PUBACK),
    _ack_decoder(PubRec, _P.PUBREC),
    _ack_decoder(PubRel, _P.PUBREL),
    _ack_decoder(PubComp, _P.PUBCOMP),
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _decode_empty(PingReq),
    _decode_empty(PingResp),
    _decode_disconnect,
    _decode_auth,
)


# --------------------------------------------------------------------------- encoding


def encode(packet: Packet, protocol_level: int) -> bytes:
    """The bytes of `packet` for `protocol_level` (CONNECT uses its own `protocol_level`).

    Raises LocalProtocolError if the packet cannot be encoded (values out of range, a packet or
    value that the version does not have, such as AUTH before 5.0).
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise LocalProtocolError(f"not a packet: {packet!r}")
    try:
        return encoder(packet, protocol_level)
    except (struct.error, OverflowError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(packet).__name__}: {exc}") from exc


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def _check_packet_id(packet_id: int | None, name: str) -> int:
    if packet_id is None or not 1 <= packet_id <= 0xFFFF:
        raise LocalProtocolError(f"{name} packet identifier {packet_id!r} not in 1..65535")
    return packet_id


def _check_reason_out(ptype: PacketType, code: int) -> None:
    if code not in REASON_CODES[ptype]:
        raise LocalProtocolError(f"reason code 0x{code:02X} is not allowed in {ptype.name}")


def encode_publish(packet: Publish, protocol_level: int, *, topic: str | None = None,
                   topic_alias: int | None = None) -> bytes:
    """Encode a PUBLISH, optionally with another topic and/or Topic Alias (5.0) than the packet.

    The connection uses the overrides to apply outbound topic aliases without building a new
    packet. `topic_alias` replaces any topic alias in the packet's properties.
    """
    if topic is None:
        topic = packet.topic
    qos = packet.qos
    try:
        topic_raw = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"topic {topic!r} contains a UTF-16 surrogate") from None
    if "\x00" in topic or len(topic_raw) > 0xFFFF:
        raise LocalProtocolError(f"invalid topic name {topic!r}")
    first = 0x30 | (qos << 1) | (1 if packet.retain else 0)
    if packet.dup:
        first |= 0x08
    parts: list[bytes] = [b"", b"", pack_u16(len(topic_raw)), topic_raw]
    if qos:
        if qos > 2:
            raise LocalProtocolError(f"PUBLISH QoS {qos}")
        parts.append(pack_u16(_check_packet_id(packet.packet_id, "PUBLISH")))
    else:
        if qos < 0:
            raise LocalProtocolError(f"PUBLISH QoS {qos}")
        if packet.packet_id is not None:
            raise LocalProtocolError("QoS 0 PUBLISH with a packet identifier")
        if packet.dup:
            raise LocalProtocolError("QoS 0 PUBLISH with DUP set")  # [MQTT-3.3.1-2] (5.0)
    properties = packet.properties
    if protocol_level >= _V5:
        if topic_alias is not None:
            if not 1 <= topic_alias <= 0xFFFF:
                raise LocalProtocolError(f"topic alias {topic_alias} not in 1..65535")
            body = b"\x23" + pack_u16(topic_alias)
            if properties is not NO_PROPERTIES:
                body += encode_properties_body(properties, _P.PUBLISH, skip_topic_alias=True)
            parts.append(encode_varint(len(body)) + body)
        elif properties is NO_PROPERTIES:
            parts.append(b"\x00")
        else:
            parts.append(encode_properties(properties, _P.PUBLISH))
        if not topic_raw and topic_alias is None and properties.topic_alias is None:
            raise LocalProtocolError("empty topic name without a topic alias")
    elif not topic_raw:
        raise LocalProtocolError("empty topic name")  # [MQTT-4.7.3-1] (3.1.1)
    payload = packet.payload
    parts.append(payload)
    remaining = sum(map(len, parts))
    parts[0] = bytes((first,))
    parts[1] = encode_varint(remaining)
    return b"".join(parts)


def encode_plain_qos1_publish(topic: str, payload: bytes, retain: bool, dup: bool,
                              packet_id: int, protocol_level: int) -> bytes:
    """What `encode_publish` makes of a QoS 1 PUBLISH without properties (no topic alias),
    in fewer steps: a QoS 1 subscriber's hot path. `topic` must be a valid topic name and
    `packet_id` in 1..65535 (the connection checked both). Raises LocalProtocolError for a
    topic that cannot be encoded."""
    try:
        topic_raw = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"topic {topic!r} contains a UTF-16 surrogate") from None
    size = len(topic_raw)
    if size > 0xFFFF:
        raise LocalProtocolError(f"invalid topic name {topic!r}")
    first = 0x32 | (0x08 if dup else 0) | (1 if retain else 0)
    if protocol_level >= _V5:
        tail = bytes((packet_id >> 8, packet_id & 0xFF, 0))  # Property Length 0
    else:
        tail = bytes((packet_id >> 8, packet_id & 0xFF))
    remaining = 2 + size + len(tail) + len(payload)
    if remaining < 0x80:
        head = bytes((first, remaining, size >> 8, size & 0xFF))
    else:
        head = bytes((first,)) + encode_varint(remaining) + bytes((size >> 8, size & 0xFF))
    return b"".join((head, topic_raw, tail, payload))


def _encode_publish(packet: Publish, level: int) -> bytes:
    return encode_publish(packet, level)


def _encode_connect(p: Connect, _level: int) -> bytes:
    level = p.protocol_level
    if level == ProtocolLevel.MQTT_3_1:
        header = b"\x00\x06MQIsdp\x03"
    elif level in (ProtocolLevel.MQTT_3_1_1, ProtocolLevel.MQTT_5):
        header = b"\x00\x04MQTT" + bytes((level,))
    else:
        raise LocalProtocolError(f"unsupported protocol level {level}")
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        if not 0 <= will.qos <= 2:
            raise LocalProtocolError(f"will QoS {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.password is not None:
        if p.username is None and level < _V5:
            raise LocalProtocolError("password without user name")  # [MQTT-3.1.2-22] (3.1.1)
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    parts = [header, bytes((flags,)), encode_u16(p.keep_alive)]
    if level >= _V5:
        parts.append(encode_properties(p.properties, _P.CONNECT))
    parts.append(encode_utf8(p.client_id))
    if will is not None:
        if level >= _V5:
            parts.append(encode_properties(will.properties, WILL))
        parts.append(encode_utf8(will.topic))
        parts.append(encode_binary(will.payload))
    if p.username is not None:
        parts.append(encode_utf8(p.username))
    if p.password is not None:
        parts.append(encode_binary(p.password))
    return _frame(0x10, b"".join(parts))


def _encode_connack(p: ConnAck, level: int) -> bytes:
    code = p.reason_code
    if code >= 0x80 and p.session_present:
        raise LocalProtocolError("CONNACK refusal with session present")  # [MQTT-3.2.2-6]
    if level >= _V5:
        _check_reason_out(_P.CONNACK, code)
        flags = b"\x01" if p.session_present else b"\x00"
        return _frame(0x20, flags + bytes((code,)) + encode_properties(p.properties, _P.CONNACK))
    return_code = connack_return_code(code) if code else 0
    if level == ProtocolLevel.MQTT_3_1:
        return bytes((0x20, 2, 0, return_code))
    return bytes((0x20, 2, 1 if p.session_present else 0, return_code))


def _ack_encoder(ptype: PacketType) -> Callable[[Any, int], bytes]:
    first = (ptype << 4) | (2 if ptype == _P.PUBREL else 0)
    short_header = bytes((first, 2))

    def encode_ack(p: PubAck | PubRec | PubRel | PubComp, level: int) -> bytes:
        packet_id = pack_u16(_check_packet_id(p.packet_id, ptype.name))
        if level < _V5:
            return short_header + packet_id
        code = p.reason_code
        properties = p.properties
        props = b"" if properties is NO_PROPERTIES else encode_properties_body(properties, ptype)
        if not props:
            if not code:
                return short_header + packet_id
            _check_reason_out(ptype, code)
            return bytes((first, 3)) + packet_id + bytes((code,))
        _check_reason_out(ptype, code)
        return _frame(first, packet_id + bytes((code,)) + encode_varint(len(props)) + props)

    return encode_ack


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    if not p.subscriptions:
        raise LocalProtocolError("SUBSCRIBE without topic filters")
    parts = [pack_u16(_check_packet_id(p.packet_id, "SUBSCRIBE"))]
    if level >= _V5:
        parts.append(encode_properties(p.properties, _P.SUBSCRIBE))
    for sub in p.subscriptions:
        if not sub.topic_filter:
            raise LocalProtocolError("empty topic filter")
        if not 0 <= sub.qos <= 2:
            raise LocalProtocolError(f"subscription QoS {sub.qos}")
        options = sub.qos
        if level >= _V5:
            if not 0 <= sub.retain_handling <= 2:
                raise LocalProtocolError(f"retain handling {sub.retain_handling}")
            options |= ((4 if sub.no_local else 0) | (8 if sub.retain_as_published else 0)
                        | (sub.retain_handling << 4))
        parts.append(encode_utf8(sub.topic_filter))
        parts.append(bytes((options,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(p: SubAck, level: int) -> bytes:
    if not p.reason_codes:
        raise LocalProtocolError("SUBACK without reason codes")
    parts = [pack_u16(_check_packet_id(p.packet_id, "SUBACK"))]
    if level >= _V5:
        for code in p.reason_codes:
            _check_reason_out(_P.SUBACK, code)
        parts.append(encode_properties(p.properties, _P.SUBACK))
        parts.append(bytes(p.reason_codes))
    else:
        codes = []
        for code in p.reason_codes:
            if code >= 0x80:
                code = 0x80  # the only failure return code of 3.1.1
            elif code > 2:
                raise LocalProtocolError(f"SUBACK reason code 0x{code:02X}")
            codes.append(code)
        parts.append(bytes(codes))
    return _frame(0x90, b"".join(parts))


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    if not p.topic_filters:
        raise LocalProtocolError("UNSUBSCRIBE without topic filters")
    parts = [pack_u16(_check_packet_id(p.packet_id, "UNSUBSCRIBE"))]
    if level >= _V5:
        parts.append(encode_properties(p.properties, _P.UNSUBSCRIBE))
    for topic_filter in p.topic_filters:
        if not topic_filter:
            raise LocalProtocolError("empty topic filter")
        parts.append(encode_utf8(topic_filter))
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(p: UnsubAck, level: int) -> bytes:
    packet_id = pack_u16(_check_packet_id(p.packet_id, "UNSUBACK"))
    if level < _V5:
        return b"\xb0\x02" + packet_id
    if not p.reason_codes:
        raise LocalProtocolError("UNSUBACK without reason codes (required on MQTT 5)")
    for code in p.reason_codes:
        _check_reason_out(_P.UNSUBACK, code)
    return _frame(0xB0, packet_id + encode_properties(p.properties, _P.UNSUBACK)
                  + bytes(p.reason_codes))


def _encode_pingreq(_p: PingReq, _level: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(_p: PingResp, _level: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, level: int) -> bytes:
    if level < _V5:
        return b"\xe0\x00"
    code = p.reason_code
    _check_reason_out(_P.DISCONNECT, code)
    properties = p.properties
    props = b"" if properties is NO_PROPERTIES else encode_properties_body(properties,
                                                                          _P.DISCONNECT)
    if not props:
        return b"\xe0\x01" + bytes((code,)) if code else b"\xe0\x00"
    return _frame(0xE0, bytes((code,)) + encode_varint(len(props)) + props)


def _encode_auth(p: Auth, level: int) -> bytes:
    if level < _V5:
        raise LocalProtocolError("AUTH exists only in MQTT 5")
    code = p.reason_code
    _check_reason_out(_P.AUTH, code)
    properties = p.properties
    props = b"" if properties is NO_PROPERTIES else encode_properties_body(properties, _P.AUTH)
    if not props and not code:
        return b"\xf0\x00"
    return _frame(0xF0, bytes((code,)) + encode_varint(len(props)) + props)


_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _encode_connect,
    ConnAck: _encode_connack,
    Publish: _encode_publish,
    PubAck: _ack_encoder(_P.PUBACK),
    PubRec: _ack_encoder(_P.PUBREC),
    PubRel: _ack_encoder(_P.PUBREL),
    PubComp: _ack_encoder(_P.PUBCOMP),
    Subscribe: _encode_subscribe,
    SubAck: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    UnsubAck: _encode_unsuback,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}
