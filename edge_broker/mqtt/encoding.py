"""Encoding of MQTT control packets, 3.1 / 3.1.1 / 5.0: `encode(packet, level)`, and
`encode_publish` for the PUBLISH overrides a connection uses (topic aliases). The translation
rules for 3.1/3.1.1 and the errors are those of mqtt/codec.py's docstring; a packet that cannot
be put on the wire raises `LocalProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from .errors import LocalProtocolError
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
    UnsubAck,
    Unsubscribe,
)
from .properties import (
    NO_PROPERTIES,
    WILL,
    encode_properties,
    encode_properties_body,
)
from .reason_codes import REASON_CODES, connack_return_code
from .types import PacketType, ProtocolLevel
from .wire import (
    encode_binary,
    encode_u16,
    encode_utf8,
    encode_varint,
    pack_u16,
)

_P = PacketType
_V5: Final = ProtocolLevel.MQTT_5


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
