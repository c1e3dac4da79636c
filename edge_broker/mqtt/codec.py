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

This module frames and decodes; encoding is in mqtt/encoding.py and the reason code tables in
mqtt/reason_codes.py, their public names importable from here as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .encoding import encode as encode  # encoding (mqtt/encoding.py), importable from here
from .encoding import encode_plain_qos1_publish as encode_plain_qos1_publish
from .encoding import encode_publish as encode_publish
from .errors import RemoteProtocolError
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
)
from .reason_codes import _SUBACK_V3_CODES
from .reason_codes import CONNACK_V3_TO_V5 as CONNACK_V3_TO_V5
from .reason_codes import CONNACK_V5_TO_V3 as CONNACK_V5_TO_V3
from .reason_codes import REASON_CODES as REASON_CODES
from .reason_codes import connack_return_code as connack_return_code
from .types import PacketType, ProtocolLevel, ReasonCode
from .wire import (
    Buffer,
    Reader,
    decode_utf8,
    malformed,
    protocol_error,
)

_P = PacketType
_V5: Final = ProtocolLevel.MQTT_5

# --------------------------------------------------------------------------- framing


def split_frame(buf: Buffer, start: int, max_packet_size: int) -> tuple[int, int, int] | None:
    """Locate the packet that starts at `buf[start]`.

    Returns (first_byte, body_start, body_end) once the whole packet is in `buf`, None while
    more bytes are needed. Raises RemoteProtocolError: MALFORMED_PACKET for a Remaining Length
    longer than four bytes (1.5.5 (5.0)), PACKET_TOO_LARGE as soon as the header shows that
    the packet (fixed header included, 3.1.2.11.4 (5.0)) exceeds `max_packet_size`.
    """
    body_start, body_end = frame_bounds(buf, start, max_packet_size)
    if not body_end:
        return None
    return buf[start], body_start, body_end


def frame_bounds(buf: Buffer, start: int, max_packet_size: int) -> tuple[int, int]:
    """As `split_frame`, for a caller that has the first byte already: (body_start,
    body_end) of the packet that starts at `buf[start]`, (0, 0) while more bytes are needed
    (a complete packet's body_end is never 0). The compiled build returns the pair unboxed
    (no tuple object, no int objects): it is every received packet's path."""
    n = len(buf)
    pos = start + 1
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= n:
            return 0, 0
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
        return 0, 0
    return pos, end


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
        return decode_publish(flags, body if isinstance(body, bytes) else bytes(body),
                              protocol_level)
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


def decode_publish(flags: int, body: bytes, level: int) -> Publish:
    """Decode a PUBLISH from the low four bits of its first byte and its body (the hot path).

    `body` is `bytes` (not any buffer): mypyc then reads its bytes, slices and decodes it with
    its own primitives instead of Python's generic item and slice protocol."""
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
        topic = body[2:pos].decode("utf-8")
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
    return Publish(topic, body[pos:], qos, bool(flags & 1), dup, packet_id, properties)


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

