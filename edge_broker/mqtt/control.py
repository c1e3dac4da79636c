"""The rules of a `Connection` (mqtt/connection.py) for the packets that are not on the
per-message path: CONNECT and CONNACK (the limits each side declares, 3.1.1 client identifier
rules, authentication method), SUBSCRIBE / UNSUBSCRIBE topic filters and their acknowledgements,
DISCONNECT and AUTH; and the bytes written before closing on a protocol error (`error_bytes`).

Each `received_*` function checks a packet the peer sent and returns the connection's new
state; each `sending_*` one checks a packet we send and returns it with the new state. The
connection calls them through its hook tables. Theory of operation: mqtt/connection.py.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .codec import CONNACK_V5_TO_V3, REASON_CODES, encode, peek_connect_protocol_level
from .errors import LocalProtocolError, RemoteProtocolError
from .packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from .properties import NO_PROPERTIES, Properties
from .states import _T, _V5, REASON_STRING_LIMIT, ConnectionState
from .topics import SHARE_PREFIX, is_valid_topic_filter, is_valid_topic_name, is_well_formed_filter
from .types import ProtocolLevel, ReasonCode, Role
from .wire import malformed, protocol_error

if TYPE_CHECKING:
    from .connection import Connection


def topic_name_invalid(topic: str) -> RemoteProtocolError:
    # [MQTT-3.3.2-2] (5.0): no wildcards in a topic name.
    return RemoteProtocolError(ReasonCode.TOPIC_NAME_INVALID, f"invalid topic name {topic!r}")


def check_topic_filter(topic_filter: str, v5: bool) -> None:
    if is_valid_topic_filter(topic_filter):
        return
    if v5 and is_well_formed_filter(topic_filter):
        # [MQTT-4.8.2-1], [MQTT-4.8.2-2] (5.0): a `$share/` filter needs a non-empty ShareName
        # without '+', '#', followed by '/' and a filter. The packet parses, a rule is broken:
        # a Protocol Error (1.2 (5.0)).
        raise protocol_error(f"invalid shared subscription filter {topic_filter!r}")
    # [MQTT-4.7.1-1], [MQTT-4.7.1-2], [MQTT-4.7.3-1] (5.0): an ill-formed filter makes the
    # packet malformed (0x81); 4.8 (3.1.1): a protocol violation closes the connection.
    raise malformed(f"invalid topic filter {topic_filter!r}")


def check_response_topic(properties: Properties) -> None:
    # [MQTT-3.3.2-14] (5.0): a Response Topic is a topic name (no wildcards, not empty).
    topic = properties.response_topic
    if topic is not None and not is_valid_topic_name(topic):
        raise protocol_error(f"invalid response topic {topic!r}")


def strip_problem_information(packet: Packet) -> Packet:
    properties: Properties | None = getattr(packet, "properties", None)
    if properties is None or properties is NO_PROPERTIES or packet.packet_type is _T.PUBLISH:
        return packet
    if properties.reason_string is None and not properties.user_properties:
        return packet
    properties = dataclasses.replace(properties, reason_string=None, user_properties=())
    return dataclasses.replace(packet, properties=properties)  # type: ignore[arg-type]


def peek_buffered_connect_level(buf: bytearray, start: int) -> int | None:
    """The protocol level of a CONNECT at `buf[start]`, even an incomplete or too large one."""
    if start >= len(buf) or buf[start] >> 4 != _T.CONNECT:
        return None
    pos = start + 1
    for _ in range(4):
        if pos >= len(buf):
            return None
        more = buf[pos] & 0x80
        pos += 1
        if not more:
            break
    else:
        return None
    return peek_connect_protocol_level(bytes(buf[pos:pos + 16]))


def received_connect(conn: Connection, packet: Connect,
                     new_state: ConnectionState) -> ConnectionState:
    level = packet.protocol_level
    conn.protocol_level = level
    conn._tentative_level = level
    if level == ProtocolLevel.MQTT_3_1 and not packet.client_id:
        # MQTT 3.1 (3.1 CONNECT, Payload): the Client Identifier is 1 to 23 characters;
        # an empty one gets CONNACK return code 2, as from mosquitto. Longer ones are
        # accepted, as by mosquitto and as 3.1.1 allows.
        raise RemoteProtocolError(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                  "empty client identifier on MQTT 3.1")
    if level < _V5 and not packet.clean_start and not packet.client_id:
        # [MQTT-3.1.3-8] (3.1.1): CONNACK return code 2.
        raise RemoteProtocolError(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                  "empty client identifier with clean session 0")
    will = packet.will
    if will is not None and not is_valid_topic_name(will.topic):
        # [MQTT-3.1.3-11] (5.0): the Will Topic is a topic name.
        raise topic_name_invalid(will.topic)
    if will is not None and level == _V5:
        # 3.1.3.2.5 (5.0): the will's Response Topic becomes a PUBLISH's [MQTT-3.3.2-14].
        check_response_topic(will.properties)
    if level == _V5:
        props = packet.properties
        if props.authentication_data is not None and props.authentication_method is None:
            # 3.1.2.11.10 (5.0)
            raise protocol_error("authentication data without an authentication method")
        read_peer_limits(conn, props)
        conn._auth_method = props.authentication_method
        conn._session_expiry_at_connect = props.session_expiry_interval or 0
        conn._problem_information = props.request_problem_information != 0
    return new_state


def read_peer_limits(conn: Connection, props: Properties) -> None:
    if props.receive_maximum is not None:
        conn.peer_receive_maximum = props.receive_maximum
    if props.maximum_packet_size is not None:
        conn.peer_maximum_packet_size = props.maximum_packet_size
    if props.topic_alias_maximum is not None:
        conn.peer_topic_alias_maximum = props.topic_alias_maximum


def received_connack(conn: Connection, packet: ConnAck,
                     new_state: ConnectionState) -> ConnectionState:
    if packet.reason_code >= 0x80:
        if packet.session_present:
            # [MQTT-3.2.2-6] (5.0), [MQTT-3.2.2-4] (3.1.1)
            raise protocol_error("refusing CONNACK with session present set")
        return ConnectionState.CLOSED
    if conn.protocol_level == _V5:
        props = packet.properties
        read_peer_limits(conn, props)
        if props.maximum_qos is not None:
            conn.peer_maximum_qos = props.maximum_qos
        if props.retain_available is not None:
            conn.peer_retain_available = bool(props.retain_available)
        if props.authentication_method is not None and conn._auth_method is None:
            raise protocol_error("CONNACK with an authentication method we did not ask for")
    return new_state


def received_subscribe(conn: Connection, packet: Subscribe,
                        new_state: ConnectionState) -> ConnectionState:
    v5 = conn.protocol_level == _V5
    for sub in packet.subscriptions:
        check_topic_filter(sub.topic_filter, v5)
        if v5 and sub.no_local and sub.topic_filter.startswith(SHARE_PREFIX):
            # [MQTT-3.8.3-4] (5.0)
            raise protocol_error("no local on a shared subscription")
    return new_state


def received_unsubscribe(conn: Connection, packet: Unsubscribe,
                          new_state: ConnectionState) -> ConnectionState:
    v5 = conn.protocol_level == _V5
    for topic_filter in packet.topic_filters:
        check_topic_filter(topic_filter, v5)
    return new_state


def received_suback(conn: Connection, packet: SubAck,
                    new_state: ConnectionState) -> ConnectionState:
    pending = conn._pending_subscribes
    expected = pending.pop(packet.packet_id, None) if pending is not None else None
    if expected is None:
        raise protocol_error(f"SUBACK for unknown packet identifier {packet.packet_id}")
    if len(packet.reason_codes) != expected:
        # [MQTT-3.9.3-1] (5.0): one reason code per topic filter.
        raise protocol_error(f"SUBACK with {len(packet.reason_codes)} reason codes for "
                             f"{expected} topic filters")
    return new_state


def received_unsuback(conn: Connection, packet: UnsubAck,
                       new_state: ConnectionState) -> ConnectionState:
    pending = conn._pending_unsubscribes
    expected = pending.pop(packet.packet_id, None) if pending is not None else None
    if expected is None:
        raise protocol_error(f"UNSUBACK for unknown packet identifier {packet.packet_id}")
    if conn.protocol_level == _V5 and len(packet.reason_codes) != expected:
        # [MQTT-3.11.3-1] (5.0): one reason code per topic filter.
        raise protocol_error(f"UNSUBACK with {len(packet.reason_codes)} reason codes for "
                             f"{expected} topic filters")
    return new_state


def received_disconnect(conn: Connection, packet: Disconnect,
                         new_state: ConnectionState) -> ConnectionState:
    expiry = packet.properties.session_expiry_interval
    if conn.role is Role.SERVER:
        if expiry and not conn._session_expiry_at_connect:
            # 3.14.2.2.2 (5.0): no session expiry in DISCONNECT if CONNECT had 0.
            raise protocol_error("DISCONNECT sets a session expiry after CONNECT had 0")
    elif expiry is not None:
        # [MQTT-3.14.2-2] (5.0): the server does not send a session expiry interval.
        raise protocol_error("DISCONNECT from the server with a session expiry interval")
    return new_state


def sending_connect(conn: Connection, packet: Connect,
                     new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    if packet.protocol_level != conn.protocol_level:
        raise LocalProtocolError(f"CONNECT for protocol level {packet.protocol_level} on a "
                                 f"level {conn.protocol_level} connection")
    if packet.protocol_level == _V5:
        props = packet.properties
        read_own_limits(conn, props)
        conn._auth_method = props.authentication_method
        conn._session_expiry_at_connect = props.session_expiry_interval or 0
    return packet, new_state


def read_own_limits(conn: Connection, props: Properties) -> None:
    if props.receive_maximum is not None:
        conn.receive_maximum = props.receive_maximum
    if props.maximum_packet_size is not None:
        conn.maximum_packet_size = props.maximum_packet_size
    if props.topic_alias_maximum is not None:
        conn.topic_alias_maximum = props.topic_alias_maximum


def sending_connack(conn: Connection, packet: ConnAck,
                     new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    conn._connack_sent = True
    if packet.reason_code >= 0x80:
        # [MQTT-3.2.2-7] (5.0): close after a refusing CONNACK; [MQTT-3.1.4-5] (5.0) and
        # [MQTT-3.1.4-4] (3.1.1): do not process anything the client sent after CONNECT.
        return packet, ConnectionState.CLOSED
    if conn.protocol_level == _V5:
        props = packet.properties
        read_own_limits(conn, props)
        if props.maximum_qos is not None:
            conn._our_maximum_qos = props.maximum_qos
        if props.retain_available is not None:
            conn._our_retain_available = bool(props.retain_available)
    return packet, new_state


def sending_subscribe(conn: Connection, packet: Subscribe,
                       new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    pending = conn._pending_subscribes
    if pending is None:
        pending = conn._pending_subscribes = {}
    pending[packet.packet_id] = len(packet.subscriptions)
    return packet, new_state


def sending_unsubscribe(conn: Connection, packet: Unsubscribe,
                         new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    pending = conn._pending_unsubscribes
    if pending is None:
        pending = conn._pending_unsubscribes = {}
    pending[packet.packet_id] = len(packet.topic_filters)
    return packet, new_state


def sending_disconnect(conn: Connection, packet: Disconnect,
                        new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    expiry = packet.properties.session_expiry_interval
    if conn.role is Role.SERVER:
        if expiry is not None:
            raise LocalProtocolError("a server DISCONNECT carries no session expiry "
                                     "interval")  # [MQTT-3.14.2-2] (5.0)
    elif expiry and not conn._session_expiry_at_connect:
        raise LocalProtocolError("session expiry in DISCONNECT after CONNECT had 0")
    return packet, new_state


def sending_auth(conn: Connection, packet: Auth,
                  new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    if conn._auth_method is None:
        raise LocalProtocolError("AUTH without an authentication method in CONNECT")
    return packet, new_state


def error_packet_bytes(conn: Connection, packet: ConnAck | Disconnect, level: int) -> bytes:
    limit = conn.peer_maximum_packet_size
    for candidate in (packet, dataclasses.replace(packet, properties=NO_PROPERTIES)):
        try:
            data = encode(candidate, level)
        except (LocalProtocolError, ValueError):
            continue
        if len(data) <= limit:
            return data
    return b""  # [MQTT-3.1.2-24] (5.0): not even the bare packet fits


def error_bytes(conn: Connection, error: RemoteProtocolError) -> bytes:
    """What to write before closing the connection because of `error`. Sets CLOSED.

    Server role, CONNACK not sent yet: a CONNACK with the reason code (5.0); on 3.1/3.1.1 a
    CONNACK with the matching return code when there is one (1 for an unsupported protocol,
    also when the level is unknown, 2 for a rejected client identifier), else nothing:
    [MQTT-3.1.4-1] (3.1.1) closes without CONNACK for a CONNECT that does not conform.
    Later, or in the client role: a DISCONNECT with the reason code on 5.0, nothing on
    3.1/3.1.1. Never raises: what does not fit the peer's Maximum Packet Size loses its
    properties, and if even the bare packet does not fit, nothing is sent
    ([MQTT-3.1.2-24], 3.1.2.11.4 (5.0)); nothing either once a CONNACK could not be sent.
    """
    already_closed = conn._closed_by_us
    sent_connect = conn.role is Role.SERVER or conn.state is not ConnectionState.AWAIT_CONNECT
    conn._close_by_us()
    if already_closed or not sent_connect:
        return b""
    code = int(error.reason_code)
    reason = error.message[:REASON_STRING_LIMIT]
    if conn.role is Role.SERVER and not conn._connack_sent:
        conn._connack_sent = True
        level = conn.protocol_level or conn._tentative_level
        if level == _V5:
            if code not in REASON_CODES[_T.CONNACK]:
                code = ReasonCode.PROTOCOL_ERROR
            return error_packet_bytes(conn, ConnAck(False, code,
                                                    Properties(reason_string=reason)), level)
        if level is None and code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            level = ProtocolLevel.MQTT_3_1_1
        return_code = CONNACK_V5_TO_V3.get(code)
        if level is None or return_code is None:
            return b""
        return error_packet_bytes(conn, ConnAck(False, code), level)
    if conn.protocol_level != _V5:
        return b""
    if code not in REASON_CODES[_T.DISCONNECT]:
        code = ReasonCode.PROTOCOL_ERROR
    return error_packet_bytes(conn, Disconnect(code, Properties(reason_string=reason)),
                                    conn.protocol_level)
