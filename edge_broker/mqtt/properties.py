"""MQTT 5 properties: the table of 2.2.2.2 (5.0) and the `Properties` value.

`Properties` has one attribute per property, named as in the spec. Absent properties are
`None`; the two that may repeat are tuples (`user_properties` keeps order and duplicates,
[MQTT-3.3.2-17] (5.0); `subscription_identifiers` may appear several times only in a
PUBLISH sent by the server).

The table says, for each property, its wire type and the packets it may appear in. The key
`WILL` stands for the will properties inside CONNECT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Final

from .errors import LocalProtocolError
from .types import PacketType, PropertyId
from .wire import (
    Reader,
    encode_binary,
    encode_string_pair,
    encode_u8,
    encode_u16,
    encode_u32,
    encode_utf8,
    encode_varint,
    malformed,
    protocol_error,
)


class PropertyType(Enum):
    BYTE = "byte"
    TWO_BYTE_INTEGER = "u16"
    FOUR_BYTE_INTEGER = "u32"
    VARIABLE_BYTE_INTEGER = "varint"
    UTF8_STRING = "utf8"
    UTF8_STRING_PAIR = "utf8-pair"
    BINARY_DATA = "binary"


# Marker for the will properties of CONNECT in the "allowed in" sets.
WILL: Final = "WILL"

_P = PacketType
_ALL_WITH_PROPERTIES: frozenset[PacketType | str] = frozenset(
    {_P.CONNECT, _P.CONNACK, _P.PUBLISH, WILL, _P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP,
     _P.SUBSCRIBE, _P.SUBACK, _P.UNSUBSCRIBE, _P.UNSUBACK, _P.DISCONNECT, _P.AUTH}
)


@dataclass(frozen=True, slots=True)
class PropertySpec:
    id: PropertyId
    attribute: str
    type: PropertyType
    allowed_in: frozenset[PacketType | str]


def _spec(pid: PropertyId, attribute: str, ptype: PropertyType,
          *allowed: PacketType | str) -> PropertySpec:
    return PropertySpec(pid, attribute, ptype, frozenset(allowed))


_T = PropertyType
PROPERTY_TABLE: Final[dict[int, PropertySpec]] = {
    s.id: s
    for s in (
        _spec(PropertyId.PAYLOAD_FORMAT_INDICATOR, "payload_format_indicator", _T.BYTE,
              _P.PUBLISH, WILL),
        _spec(PropertyId.MESSAGE_EXPIRY_INTERVAL, "message_expiry_interval",
              _T.FOUR_BYTE_INTEGER, _P.PUBLISH, WILL),
        _spec(PropertyId.CONTENT_TYPE, "content_type", _T.UTF8_STRING, _P.PUBLISH, WILL),
        _spec(PropertyId.RESPONSE_TOPIC, "response_topic", _T.UTF8_STRING, _P.PUBLISH, WILL),
        _spec(PropertyId.CORRELATION_DATA, "correlation_data", _T.BINARY_DATA, _P.PUBLISH, WILL),
        _spec(PropertyId.SUBSCRIPTION_IDENTIFIER, "subscription_identifiers",
              _T.VARIABLE_BYTE_INTEGER, _P.PUBLISH, _P.SUBSCRIBE),
        _spec(PropertyId.SESSION_EXPIRY_INTERVAL, "session_expiry_interval",
              _T.FOUR_BYTE_INTEGER, _P.CONNECT, _P.CONNACK, _P.DISCONNECT),
        _spec(PropertyId.ASSIGNED_CLIENT_IDENTIFIER, "assigned_client_identifier",
              _T.UTF8_STRING, _P.CONNACK),
        _spec(PropertyId.SERVER_KEEP_ALIVE, "server_keep_alive", _T.TWO_BYTE_INTEGER, _P.CONNACK),
        _spec(PropertyId.AUTHENTICATION_METHOD, "authentication_method", _T.UTF8_STRING,
              _P.CONNECT, _P.CONNACK, _P.AUTH),
        _spec(PropertyId.AUTHENTICATION_DATA, "authentication_data", _T.BINARY_DATA,
              _P.CONNECT, _P.CONNACK, _P.AUTH),
        _spec(PropertyId.REQUEST_PROBLEM_INFORMATION, "request_problem_information", _T.BYTE,
              _P.CONNECT),
        _spec(PropertyId.WILL_DELAY_INTERVAL, "will_delay_interval", _T.FOUR_BYTE_INTEGER, WILL),
        _spec(PropertyId.REQUEST_RESPONSE_INFORMATION, "request_response_information", _T.BYTE,
              _P.CONNECT),
        _spec(PropertyId.RESPONSE_INFORMATION, "response_information", _T.UTF8_STRING,
              _P.CONNACK),
        _spec(PropertyId.SERVER_REFERENCE, "server_reference", _T.UTF8_STRING,
              _P.CONNACK, _P.DISCONNECT),
        _spec(PropertyId.REASON_STRING, "reason_string", _T.UTF8_STRING,
              _P.CONNACK, _P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP, _P.SUBACK, _P.UNSUBACK,
              _P.DISCONNECT, _P.AUTH),
        _spec(PropertyId.RECEIVE_MAXIMUM, "receive_maximum", _T.TWO_BYTE_INTEGER,
              _P.CONNECT, _P.CONNACK),
        _spec(PropertyId.TOPIC_ALIAS_MAXIMUM, "topic_alias_maximum", _T.TWO_BYTE_INTEGER,
              _P.CONNECT, _P.CONNACK),
        _spec(PropertyId.TOPIC_ALIAS, "topic_alias", _T.TWO_BYTE_INTEGER, _P.PUBLISH),
        _spec(PropertyId.MAXIMUM_QOS, "maximum_qos", _T.BYTE, _P.CONNACK),
        _spec(PropertyId.RETAIN_AVAILABLE, "retain_available", _T.BYTE, _P.CONNACK),
        PropertySpec(PropertyId.USER_PROPERTY, "user_properties", _T.UTF8_STRING_PAIR,
                     _ALL_WITH_PROPERTIES),
        _spec(PropertyId.MAXIMUM_PACKET_SIZE, "maximum_packet_size", _T.FOUR_BYTE_INTEGER,
              _P.CONNECT, _P.CONNACK),
        _spec(PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE, "wildcard_subscription_available",
              _T.BYTE, _P.CONNACK),
        _spec(PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE, "subscription_identifier_available",
              _T.BYTE, _P.CONNACK),
        _spec(PropertyId.SHARED_SUBSCRIPTION_AVAILABLE, "shared_subscription_available",
              _T.BYTE, _P.CONNACK),
    )
}


@dataclass(frozen=True, slots=True, repr=False)
class Properties:
    """The properties of one packet (or of a will). `None` means absent."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def is_empty(self) -> bool:
        return self == NO_PROPERTIES

    def __repr__(self) -> str:  # only the properties that are present
        present = ", ".join(
            f"{name}={value!r}" for name in PROPERTY_ATTRIBUTES
            if (value := getattr(self, name)) is not None and value != ()
        )
        return f"Properties({present})"


NO_PROPERTIES: Final = Properties()

# Attribute names in declaration order, for codecs that walk every property.
PROPERTY_ATTRIBUTES: Final = tuple(f.name for f in fields(Properties))


# --------------------------------------------------------------------------- codec
#
# Rules (2.2.2 (5.0)):
# * an unknown identifier, or one not allowed in the packet at hand, makes a Malformed Packet:
#   "A Control Packet which contains an Identifier which is not valid for its packet type, or
#   contains a value not of the specified data type, is a Malformed Packet" (2.2.2.2 (5.0));
# * a property other than User Property (and Subscription Identifier in PUBLISH) included twice
#   is a Protocol Error (each property's section: "It is a Protocol Error to include ... more
#   than once");
# * values out of their range are Protocol Errors (the same sections).
# The identifier is a Variable Byte Integer (2.2.2.2 (5.0)), though every defined one is < 128.

_REPEATABLE: Final = frozenset({PropertyId.USER_PROPERTY, PropertyId.SUBSCRIPTION_IDENTIFIER})
_ZERO_OR_ONE: Final = frozenset({
    PropertyId.PAYLOAD_FORMAT_INDICATOR,  # 3.3.2.3.2 (5.0)
    PropertyId.REQUEST_PROBLEM_INFORMATION,  # 3.1.2.11.7 (5.0)
    PropertyId.REQUEST_RESPONSE_INFORMATION,  # 3.1.2.11.6 (5.0)
    PropertyId.MAXIMUM_QOS,  # 3.2.2.3.4 (5.0)
    PropertyId.RETAIN_AVAILABLE,  # 3.2.2.3.5 (5.0)
    PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,  # 3.2.2.3.11 (5.0)
    PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,  # 3.2.2.3.12 (5.0)
    PropertyId.SHARED_SUBSCRIPTION_AVAILABLE,  # 3.2.2.3.13 (5.0)
})
_NON_ZERO: Final = frozenset({
    PropertyId.SUBSCRIPTION_IDENTIFIER,  # 3.8.2.1.2 (5.0)
    PropertyId.RECEIVE_MAXIMUM,  # 3.1.2.11.3 / 3.2.2.3.3 (5.0)
    PropertyId.MAXIMUM_PACKET_SIZE,  # 3.1.2.11.4 / 3.2.2.3.6 (5.0)
    # Topic Alias 0 is also invalid, but its reason code (0x94) is the connection's to give.
})


def expiry_left(expires_at: float, now: float) -> int:
    """The Message Expiry Interval to send a message on with: the received one less the
    time it waited, at least 1 (0 is not sent: the message expired) [MQTT-3.3.2-6] (5.0)."""
    return max(1, math.ceil(expires_at - now))


def _value_problem(pid: PropertyId, value: int) -> str | None:
    if pid in _ZERO_OR_ONE and value not in (0, 1):
        return f"{pid.name} must be 0 or 1, not {value}"
    if pid in _NON_ZERO and value == 0:
        return f"{pid.name} must not be 0"
    return None


def _read_value(reader: Reader, ptype: PropertyType, what: str) -> object:
    if ptype is PropertyType.BYTE:
        return reader.u8(what)
    if ptype is PropertyType.TWO_BYTE_INTEGER:
        return reader.u16(what)
    if ptype is PropertyType.FOUR_BYTE_INTEGER:
        return reader.u32(what)
    if ptype is PropertyType.VARIABLE_BYTE_INTEGER:
        return reader.varint(what)
    if ptype is PropertyType.UTF8_STRING:
        return reader.utf8(what)
    if ptype is PropertyType.BINARY_DATA:
        return reader.binary(what)
    return reader.string_pair(what)


def decode_properties(reader: Reader, packet_kind: PacketType | str) -> Properties:
    """Read a Property Length and the properties after it; `packet_kind` is a PacketType or WILL.

    Raises RemoteProtocolError: MALFORMED_PACKET for framing problems, unknown identifiers and
    identifiers not allowed in `packet_kind`; PROTOCOL_ERROR for repeats and bad values.
    """
    length = reader.varint("the property length")
    if length == 0:
        return NO_PROPERTIES
    if length > reader.remaining():
        raise malformed(f"property length {length} runs past the end of the packet")
    end = reader.pos + length
    sub = Reader(reader.data, reader.pos, end)
    values: dict[str, Any] = {}
    user_properties: list[tuple[str, str]] = []
    subscription_identifiers: list[int] = []
    while not sub.at_end():
        ident = sub.varint("a property identifier")
        spec = PROPERTY_TABLE.get(ident)
        if spec is None:
            raise malformed(f"unknown property identifier 0x{ident:02X}")
        pid = spec.id
        if packet_kind not in spec.allowed_in:
            raise malformed(f"property {pid.name} is not allowed in {_kind_name(packet_kind)}")
        value = _read_value(sub, spec.type, pid.name)
        if pid is PropertyId.USER_PROPERTY:
            user_properties.append(value)  # type: ignore[arg-type]
            continue
        if isinstance(value, int):
            problem = _value_problem(pid, value)
            if problem is not None:
                raise protocol_error(problem)
        if pid is PropertyId.SUBSCRIPTION_IDENTIFIER:
            # Repeatable only in a PUBLISH (3.3.2.3.8 (5.0)); once in SUBSCRIBE (3.8.2.1.2).
            if subscription_identifiers and packet_kind is not PacketType.PUBLISH:
                raise protocol_error("SUBSCRIPTION_IDENTIFIER included more than once")
            subscription_identifiers.append(value)  # type: ignore[arg-type]
            continue
        if spec.attribute in values:
            raise protocol_error(f"{pid.name} included more than once")
        values[spec.attribute] = value
    reader.pos = end
    if user_properties:
        values["user_properties"] = tuple(user_properties)
    if subscription_identifiers:
        values["subscription_identifiers"] = tuple(subscription_identifiers)
    return Properties(**values)


def _kind_name(packet_kind: PacketType | str) -> str:
    return packet_kind.name if isinstance(packet_kind, PacketType) else "the will properties"


def _encode_byte(value: int) -> bytes:
    return encode_u8(value)


_ENCODERS: Final[dict[PropertyType, Callable[[Any], bytes]]] = {
    PropertyType.BYTE: _encode_byte,
    PropertyType.TWO_BYTE_INTEGER: encode_u16,
    PropertyType.FOUR_BYTE_INTEGER: encode_u32,
    PropertyType.VARIABLE_BYTE_INTEGER: encode_varint,
    PropertyType.UTF8_STRING: encode_utf8,
    PropertyType.UTF8_STRING_PAIR: encode_string_pair,
    PropertyType.BINARY_DATA: encode_binary,
}

# (spec, identifier bytes, value encoder) in identifier order: the order properties go on the
# wire (any order is allowed; a fixed one makes the bytes predictable).
_ENCODE_PLAN: Final = tuple(
    (spec, encode_varint(spec.id), _ENCODERS[spec.type])
    for spec in sorted(PROPERTY_TABLE.values(), key=lambda s: s.id)
)


def encode_properties_body(props: Properties, packet_kind: PacketType | str,
                           *, skip_topic_alias: bool = False) -> bytes:
    """The properties without the Property Length in front. Raises LocalProtocolError."""
    parts: list[bytes] = []
    for spec, prefix, encoder in _ENCODE_PLAN:
        value = getattr(props, spec.attribute)
        if value is None or value == ():
            continue
        pid = spec.id
        if packet_kind not in spec.allowed_in:
            raise LocalProtocolError(
                f"property {pid.name} is not allowed in {_kind_name(packet_kind)}")
        if pid in _REPEATABLE:
            if (pid is PropertyId.SUBSCRIPTION_IDENTIFIER and len(value) > 1
                    and packet_kind is not PacketType.PUBLISH):
                raise LocalProtocolError("only one SUBSCRIPTION_IDENTIFIER is allowed here")
            for item in value:
                if pid is PropertyId.SUBSCRIPTION_IDENTIFIER and item == 0:
                    raise LocalProtocolError("SUBSCRIPTION_IDENTIFIER must not be 0")
                parts.append(prefix + encoder(item))
            continue
        if pid is PropertyId.TOPIC_ALIAS and skip_topic_alias:
            continue
        if isinstance(value, int):
            problem = _value_problem(pid, value)
            if problem is not None:
                raise LocalProtocolError(problem)
        parts.append(prefix + encoder(value))
    return b"".join(parts)


def encode_properties(props: Properties, packet_kind: PacketType | str) -> bytes:
    """Property Length followed by the properties; `b"\\x00"` for no properties."""
    if props is NO_PROPERTIES:
        return b"\x00"
    body = encode_properties_body(props, packet_kind)
    return encode_varint(len(body)) + body
