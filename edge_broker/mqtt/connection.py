"""One MQTT connection as a state machine: bytes in -> packets out, packets in -> bytes out.

Theory of operation
-------------------
A `Connection` is one end of one network connection, in the SERVER role (the broker side of a
device connection) or the CLIENT role (the side the upstream bridge drives). It never touches
a socket or a clock: the caller feeds it the bytes it read (`receive_data`), pulls packets out
(`next_event`, or both at once with `receive_packets`), and asks it for the bytes of each packet
it wants to send (`send`). Keep-alive timing, authentication and sessions are the caller's.

Receiving. Bytes accumulate in a bytearray with a read offset (compacted when the offset passes
half the buffer, so a trickle of small reads never copies quadratically). `next_event` checks
the packet type against the state table as soon as the first byte is there, waits for the whole
packet with `codec.split_frame` (which refuses a packet larger than our Maximum Packet Size as
soon as its header shows the size), decodes it with `codec.decode`, applies the rules that need
connection state (below), advances the state and returns the packet. A broken rule raises
`RemoteProtocolError` carrying the reason code the spec asks for; the connection then stays
failed (every later `next_event` re-raises it) and `error_bytes(error)` gives what to write
before closing: a CONNACK if we are a server that has not answered the CONNECT yet, else a
DISCONNECT on MQTT 5, else nothing. The decision is the same whether bytes come all at once or
one at a time.

Sending. `send(packet)` checks the state table, applies the negotiated limits, encodes, updates
the state and returns the bytes; the empty result means "do not send" (a PUBLISH larger than the
peer's Maximum Packet Size is discarded, [MQTT-3.1.2-25] (5.0)). Sending what the state forbids
raises `LocalProtocolError`: it is a bug in the caller.

Negotiation. The limits each side declares in CONNECT / CONNACK are read from the packets as
they pass: the peer's from what we receive (`peer_receive_maximum`, `peer_maximum_packet_size`,
`peer_topic_alias_maximum`), ours from what we send (`receive_maximum`, `maximum_packet_size`,
`topic_alias_maximum`; the constructor values when the packet does not carry them, so construct
the connection with the values you advertise). A server decodes packets that a client pipelines
behind its CONNECT before the CONNACK is sent (3.1.4 (5.0) allows it) with the constructor
limits.

Rules applied here, because they need state: the first packet must be CONNECT and there is only
one; which packet types each role may receive in each state; topic aliases in both directions
(inbound aliases are resolved, so a returned PUBLISH always has its full topic and no
`topic_alias` property: the broker core never sees aliases); Receive Maximum in both directions
(5.0); Maximum QoS / Retain Available that our CONNACK declared; topic name and filter syntax;
the AUTH and session expiry rules of DISCONNECT; the type of each acknowledgement of a QoS 1/2
PUBLISH we sent (PUBACK for QoS 1, PUBREC then PUBCOMP for QoS 2, on every protocol level: a
wrong one is a protocol violation, [MQTT-4.8.0-1] (3.1.1), 4.13 (5.0); an acknowledgement for a
packet identifier this connection has not sent is passed on, the session may know it). An
ill-formed topic filter in SUBSCRIBE / UNSUBSCRIBE closes the connection on every level (0x81 on
5.0; a `$share/` filter that breaks 4.8.2 (5.0) is 0x82): 0x8F in a SUBACK is the broker's
answer for a well-formed filter it does not allow.

Errors never make a reply unsendable: `error_bytes` and sending a DISCONNECT drop the reason
string and properties that do not fit the peer's Maximum Packet Size and send nothing when even
the bare packet does not fit ([MQTT-3.1.2-24], 3.1.2.11.4 (5.0)).

The state table is `TRANSITIONS`, keyed by (role, state, direction, packet type); a missing key
is the error. `format_transitions()` prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import Enum
from typing import Any, Final, cast

from .codec import (
    CONNACK_V5_TO_V3,
    REASON_CODES,
    decode,
    decode_publish,
    encode,
    encode_plain_qos1_publish,
    encode_publish,
    peek_connect_protocol_level,
    split_frame,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
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
from .properties import NO_PROPERTIES, Properties
from .topics import (
    SHARE_PREFIX,
    is_valid_topic_filter,
    is_valid_topic_name,
    is_well_formed_filter,
)
from .types import MAX_REMAINING_LENGTH, PacketType, ProtocolLevel, ReasonCode, Role
from .wire import malformed, protocol_error

# The largest packet MQTT can frame: 1 type byte + 4 length bytes + the largest body.
NO_PACKET_SIZE_LIMIT: Final = MAX_REMAINING_LENGTH + 5
_V5: Final = ProtocolLevel.MQTT_5
_REASON_STRING_LIMIT: Final = 200

# What an outbound QoS 1/2 PUBLISH waits for, by packet identifier (4.3.2, 4.3.3 (5.0)).
_AWAIT_PUBACK: Final = 1  # QoS 1 sent
_AWAIT_PUBREC: Final = 2  # QoS 2 sent
_AWAIT_PUBREL_SENT: Final = 3  # QoS 2: PUBREC received, our PUBREL not sent yet
_AWAIT_PUBCOMP: Final = 4  # QoS 2: PUBREL sent


class ConnectionState(Enum):
    AWAIT_CONNECT = "AWAIT_CONNECT"  # server: nothing received yet; client: CONNECT not sent
    AWAIT_CONNACK = "AWAIT_CONNACK"  # server: CONNACK not sent yet; client: none received yet
    CONNECTED = "CONNECTED"
    CLOSED = "CLOSED"  # DISCONNECT sent or received, CONNACK refused, or protocol error


class Direction(Enum):
    RECEIVE = "receive"
    SEND = "send"


_S = ConnectionState
_T = PacketType
_ACKS: Final = (_T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP)
_FROM_CLIENT: Final = (_T.PUBLISH, *_ACKS, _T.SUBSCRIBE, _T.UNSUBSCRIBE, _T.PINGREQ, _T.AUTH)
_FROM_SERVER: Final = (_T.PUBLISH, *_ACKS, _T.SUBACK, _T.UNSUBACK, _T.PINGRESP, _T.AUTH)
# What a server may still send after the client's DISCONNECT: answers to earlier packets.
_ANSWERS_AFTER_DISCONNECT: Final = frozenset({_T.CONNACK, _T.PUBACK, _T.PUBREC, _T.PUBCOMP,
                                              _T.SUBACK, _T.UNSUBACK, _T.PINGRESP})

Transition = tuple[Role, ConnectionState, Direction, PacketType]


def _build_transitions() -> dict[Transition, ConnectionState]:
    table: dict[Transition, ConnectionState] = {}
    # Each role with the packets its peer sends: (role, receiving?, packets from the client).
    for role, client_side in ((Role.SERVER, Direction.RECEIVE), (Role.CLIENT, Direction.SEND)):
        server_side = Direction.SEND if client_side is Direction.RECEIVE else Direction.RECEIVE
        # The CONNECT / CONNACK handshake; AUTH may be exchanged in between (4.12 (5.0)).
        table[role, _S.AWAIT_CONNECT, client_side, _T.CONNECT] = _S.AWAIT_CONNACK
        table[role, _S.AWAIT_CONNACK, server_side, _T.CONNACK] = _S.CONNECTED
        table[role, _S.AWAIT_CONNACK, server_side, _T.AUTH] = _S.AWAIT_CONNACK
        # A client need not wait for the CONNACK before sending more (3.1.4 (5.0)).
        for state in (_S.AWAIT_CONNACK, _S.CONNECTED):
            for ptype in _FROM_CLIENT:
                table[role, state, client_side, ptype] = state
            table[role, state, client_side, _T.DISCONNECT] = _S.CLOSED
        for ptype in _FROM_SERVER:
            table[role, _S.CONNECTED, server_side, ptype] = _S.CONNECTED
        table[role, _S.CONNECTED, server_side, _T.DISCONNECT] = _S.CLOSED  # 5.0 only
    return table


TRANSITIONS: Final[dict[Transition, ConnectionState]] = _build_transitions()

_Rows = dict[Role, dict[ConnectionState, tuple[ConnectionState | None, ...]]]


def _rows(direction: Direction) -> _Rows:
    """TRANSITIONS for fast lookup: role -> state -> a tuple indexed by the packet type number,
    holding the new state or None (not allowed)."""
    return {
        role: {state: tuple(TRANSITIONS.get((role, state, direction, PacketType(value)))
                            if value else None for value in range(16))
               for state in ConnectionState}
        for role in Role
    }


_RECEIVE_ROWS: Final = _rows(Direction.RECEIVE)
_SEND_ROWS: Final = _rows(Direction.SEND)


def format_transitions() -> str:
    """The state table as text, one transition a line."""
    lines = [f"{'role':<7} {'state':<14} {'direction':<8} {'packet':<12} new state"]
    for (role, state, direction, ptype), new_state in TRANSITIONS.items():
        lines.append(f"{role.name:<7} {state.value:<14} {direction.value:<8} {ptype.name:<12} "
                     f"{new_state.value}")
    return "\n".join(lines)


class Connection:
    """The protocol state of one MQTT connection. See the module docstring."""

    # Slotted: a broker holds one per client (an instance dict of these attributes took
    # 1.6 KB per idle connection, measured with tracemalloc).
    __slots__ = ("_auth_method", "_buf", "_closed_by_us", "_connack_sent", "_error",
                 "_frame_start", "_inbound_aliases", "_inbound_unacked", "_last_publish",
                 "_our_maximum_qos",
                 "_our_retain_available", "_outbound_alias_topics", "_outbound_aliases",
                 "_outbound_unacked", "_pending_subscribes", "_pending_unsubscribes", "_pos",
                 "_problem_information", "_row", "_row_state", "_session_expiry_at_connect",
                 "_tentative_level", "maximum_packet_size", "peer_maximum_packet_size",
                 "peer_maximum_qos", "peer_receive_maximum", "peer_retain_available",
                 "peer_topic_alias_maximum", "protocol_level", "receive_maximum", "role", "state",
                 "topic_alias_maximum")

    def __init__(self, role: Role, *, protocol_level: int | None = None,
                 max_packet_size: int = NO_PACKET_SIZE_LIMIT, receive_maximum: int = 65535,
                 topic_alias_maximum: int = 0) -> None:
        if role is Role.CLIENT:
            if protocol_level not in (ProtocolLevel.MQTT_3_1, ProtocolLevel.MQTT_3_1_1, _V5):
                raise LocalProtocolError(f"client role needs a protocol level, got "
                                         f"{protocol_level!r}")
        elif protocol_level is not None:
            raise LocalProtocolError("the server role learns the protocol level from CONNECT")
        if not 1 <= receive_maximum <= 65535:
            raise LocalProtocolError(f"receive maximum {receive_maximum} not in 1..65535")
        if not 0 <= topic_alias_maximum <= 65535:
            raise LocalProtocolError(f"topic alias maximum {topic_alias_maximum} not in 0..65535")
        if max_packet_size < 2:
            raise LocalProtocolError(f"maximum packet size {max_packet_size} is too small")
        self.role = role
        self.state = ConnectionState.AWAIT_CONNECT
        self.protocol_level: int | None = protocol_level
        # Our inbound limits (updated from the CONNECT / CONNACK we send).
        self.maximum_packet_size = max_packet_size
        self.receive_maximum = receive_maximum
        self.topic_alias_maximum = topic_alias_maximum
        # The peer's limits (from the CONNECT / CONNACK we receive).
        self.peer_receive_maximum = 65535
        self.peer_maximum_packet_size = NO_PACKET_SIZE_LIMIT
        self.peer_topic_alias_maximum = 0
        self.peer_maximum_qos = 2  # client role: the server's Maximum QoS
        self.peer_retain_available = True  # client role: the server's Retain Available
        self._our_maximum_qos = 2  # server role: what our CONNACK declared
        self._our_retain_available = True

        self._buf = bytearray()
        self._pos = 0
        self._last_publish: Publish | None = None  # the PUBLISH next_event returned last,
        self._frame_start = 0  # and where its bytes start in _buf (received_publish_bytes)
        self._row_state: ConnectionState | None = None  # the state `_row` was taken for
        self._row: tuple[ConnectionState | None, ...] = ()
        self._error: RemoteProtocolError | None = None
        self._closed_by_us = False  # sent DISCONNECT, a refusing CONNACK, or error bytes
        self._connack_sent = False
        self._tentative_level: int | None = None  # server: level seen in a CONNECT that failed
        self._auth_method: str | None = None
        self._session_expiry_at_connect = 0
        self._problem_information = True  # server role: the client's Request Problem Info.

        self._inbound_unacked: set[int] = set()  # QoS 1/2 ids received, not finally acked
        # QoS 1/2 ids sent, not finally acked -> what they wait for (_AWAIT_*).
        self._outbound_unacked: dict[int, int] = {}
        self._inbound_aliases: dict[int, str] = {}
        self._outbound_aliases: dict[str, int] = {}
        self._outbound_alias_topics: dict[int, str] = {}
        self._pending_subscribes: dict[int, int] = {}  # client: packet id -> filter count
        self._pending_unsubscribes: dict[int, int] = {}

    def __repr__(self) -> str:
        return (f"<Connection {self.role.name} {self.state.value} "
                f"level={self.protocol_level}>")

    @property
    def send_quota(self) -> int:
        """How many more QoS 1/2 PUBLISH packets the peer's Receive Maximum lets us send now."""
        return self.peer_receive_maximum - len(self._outbound_unacked)

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet returned as packets (an incomplete packet, or more)."""
        return len(self._buf) - self._pos

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the network. Nothing happens until `next_event` is called."""
        if self._closed_by_us or self._error is not None or not data:
            return
        if self._pos and self._pos >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def receive_packets(self, data: bytes) -> list[Packet]:
        """`receive_data(data)`, then every complete packet. Raises RemoteProtocolError."""
        self.receive_data(data)
        packets = []
        while (packet := self.next_event()) is not None:
            packets.append(packet)
        return packets

    def next_event(self) -> Packet | None:
        """The next received packet, or None if more data is needed.

        Raises RemoteProtocolError when the peer broke the protocol, and again on every later
        call: pass it to `error_bytes` and close the connection.
        """
        if self._error is not None:
            raise self._error
        self._last_publish = None  # nothing held past its turn (received_publish_bytes)
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return None
        if self._closed_by_us:
            self._buf.clear()
            self._pos = 0
            return None
        if pos > len(buf) >> 1:
            del buf[:pos]
            self._pos = pos = 0
        try:
            return self._next_packet(buf, pos)
        except RemoteProtocolError as exc:
            if self.role is Role.SERVER and self.protocol_level is None:
                self._tentative_level = _peek_buffered_connect_level(buf, pos)
            self._error = exc
            raise

    def next_event_or_ack(self) -> Packet | int | None:
        """As `next_event`, except that a plain PUBACK (success, no properties: the four
        bytes 0x40 0x02 id id) acknowledging a QoS 1 PUBLISH sent on this connection, or one
        it does not know, is returned as its packet identifier (an int), without building a
        `PubAck`: the burst of acknowledgements a QoS 1 subscriber sends is the hot path.
        Anything else, including a PUBACK that breaks the protocol, goes by `next_event`.
        """
        buf = self._buf
        pos = self._pos
        if (pos + 4 <= len(buf) and buf[pos] == 0x40 and buf[pos + 1] == 2
                and self.state is ConnectionState.CONNECTED and self._error is None
                and not self._closed_by_us and self.maximum_packet_size >= 4):
            packet_id = (buf[pos + 2] << 8) | buf[pos + 3]
            unacked = self._outbound_unacked
            waiting = unacked.get(packet_id, _AWAIT_PUBACK)
            if packet_id and waiting == _AWAIT_PUBACK:  # else: the error, by next_event
                # What _received_ack does for a PUBACK: 4.3.2 (5.0), the QoS 1 exchange ends.
                unacked.pop(packet_id, None)
                self._last_publish = None
                pos += 4
                if pos > len(buf) >> 1:
                    del buf[:pos]
                    pos = 0
                self._pos = pos
                return packet_id
        return self.next_event()

    def _next_packet(self, buf: bytearray, start: int) -> Packet | None:
        state = self.state
        if state is not self._row_state:
            self._row = _RECEIVE_ROWS[self.role][state]
            self._row_state = state
        first_byte = buf[start]
        ptype_value = first_byte >> 4
        new_state = self._row[ptype_value]
        if new_state is None:
            raise self._unexpected(ptype_value)
        level = self.protocol_level
        if ptype_value >= 14:
            if ptype_value == 15 and level == _V5 and self._auth_method is None:
                # 4.12 (5.0): AUTH only when the CONNECT named an Authentication Method.
                raise protocol_error("AUTH without an authentication method in CONNECT")
            if ptype_value == 14 and self.role is Role.CLIENT and level != _V5:
                raise protocol_error("a 3.1.1 server does not send DISCONNECT")

        frame = split_frame(buf, start, self.maximum_packet_size)
        if frame is None:
            return None
        body_start = frame[1]
        body_end = frame[2]
        body = bytes(buf[body_start:body_end])
        self._pos = body_end
        if level is None:
            level = _V5  # server role before CONNECT: only a CONNECT gets here
        if ptype_value == 3:
            decoded = decode_publish(first_byte & 0x0F, body, level)
            publish = self._received_publish(decoded)
            self._last_publish = publish if publish is decoded else None  # no alias resolved
            self._frame_start = start
            packet: Packet = publish
        else:
            packet = decode(first_byte, body, level)
            hook = _RECEIVE_HOOKS[ptype_value]
            if hook is not None:
                new_state = hook(self, packet, new_state)
        self.state = new_state
        return packet

    def received_publish_bytes(self, packet: Publish) -> bytes | None:
        """The bytes `packet` arrived as, when they are exactly what `encode_publish(packet,
        protocol_level)` makes: a QoS 0 PUBLISH without properties, as received (no topic alias
        resolved), its lengths in the fewest bytes. Else None. `packet` must be the PUBLISH
        `next_event` returned last, asked before the next call.

        A server forwarding it at QoS 0 to subscribers of the same protocol level can send
        these bytes instead of encoding it again (the retain flag is in them as received).
        """
        if (packet is not self._last_publish or packet.qos
                or packet.properties is not NO_PROPERTIES):
            return None
        self._last_publish = None
        buf = self._buf
        start = self._frame_start
        end = self._pos
        body_start = start + 1
        while buf[body_start] & 0x80:
            body_start += 1
        body_start += 1
        length = end - body_start
        # 1.5.5 (5.0): the Remaining Length in the fewest bytes, as encode_publish writes it.
        if body_start - start - 1 != (1 if length < 0x80 else 2 if length < 0x4000
                                      else 3 if length < 0x200000 else 4):
            return None
        if self.protocol_level == _V5:
            # No properties: a Property Length of one byte 0 (decode_publish's fast path).
            at = body_start + 2 + ((buf[body_start] << 8) | buf[body_start + 1])
            if buf[at] != 0:
                return None
        return bytes(buf[start:end])

    def _unexpected(self, ptype_value: int) -> RemoteProtocolError:
        if ptype_value == 0:
            return malformed("packet type 0 is reserved")
        if self.state is ConnectionState.CLOSED:
            # After the peer's DISCONNECT (or its refusing CONNACK) nothing may follow:
            # [MQTT-3.14.4-1] (5.0) the sender closes the connection after DISCONNECT.
            return protocol_error("data after the connection was closed by the peer")
        ptype = PacketType(ptype_value)
        if self.role is Role.SERVER and self.state is ConnectionState.AWAIT_CONNECT:
            return protocol_error(f"first packet is {ptype.name}, not CONNECT")  # [MQTT-3.1.0-1]
        if ptype is _T.CONNECT:
            return protocol_error("second CONNECT")  # [MQTT-3.1.0-2] (5.0)
        return protocol_error(f"{ptype.name} received by the {self.role.name.lower()} in state "
                              f"{self.state.value}")

    def _received_publish(self, packet: Publish) -> Publish:
        topic = packet.topic
        properties = packet.properties
        if self.protocol_level == _V5:
            alias = properties.topic_alias
            if alias is not None:
                if alias == 0 or alias > self.topic_alias_maximum:
                    # [MQTT-3.3.2-8], [MQTT-3.3.2-9], [MQTT-3.3.2-11] (5.0)
                    raise RemoteProtocolError(ReasonCode.TOPIC_ALIAS_INVALID,
                                              f"topic alias {alias} not in 1.."
                                              f"{self.topic_alias_maximum}")
                if topic:
                    if not is_valid_topic_name(topic):
                        raise _topic_name_invalid(topic)
                    self._inbound_aliases[alias] = topic
                else:
                    known = self._inbound_aliases.get(alias)
                    if known is None:
                        # 3.3.2.3.4 (5.0): an unknown alias with an empty topic.
                        raise protocol_error(f"unknown topic alias {alias}")
                    topic = known
                properties = dataclasses.replace(properties, topic_alias=None)
                if properties == NO_PROPERTIES:
                    properties = NO_PROPERTIES
                packet = Publish(topic, packet.payload, packet.qos, packet.retain, packet.dup,
                                 packet.packet_id, properties)
            elif not topic:
                raise protocol_error("empty topic name without a topic alias")  # 3.3.2.1 (5.0)
            elif not is_valid_topic_name(topic):
                raise _topic_name_invalid(topic)
            if self.role is Role.SERVER and properties.subscription_identifiers:
                # [MQTT-3.3.4-6] (5.0)
                raise protocol_error("PUBLISH from a client with a subscription identifier")
            if properties.response_topic is not None:
                _check_response_topic(properties)  # [MQTT-3.3.2-14] (5.0)
        elif not topic:
            raise malformed("empty topic name")  # [MQTT-4.7.3-1] (3.1.1)
        elif not is_valid_topic_name(topic):
            raise _topic_name_invalid(topic)
        qos = packet.qos
        if self.role is Role.SERVER:
            if qos > self._our_maximum_qos:
                # 3.2.2.3.4 (5.0): a Protocol Error, answered with 0x9B.
                raise RemoteProtocolError(ReasonCode.QOS_NOT_SUPPORTED,
                                          f"PUBLISH QoS {qos} above the maximum QoS "
                                          f"{self._our_maximum_qos}")
            if packet.retain and not self._our_retain_available:
                # 3.2.2.3.5 (5.0): a Protocol Error, answered with 0x9A.
                raise RemoteProtocolError(ReasonCode.RETAIN_NOT_SUPPORTED,
                                          "retained PUBLISH while retain is not available")
        if qos and self.protocol_level == _V5:
            packet_id = packet.packet_id
            unacked = self._inbound_unacked
            if packet_id not in unacked:
                if len(unacked) >= self.receive_maximum:
                    # [MQTT-3.3.4-9] (5.0)
                    raise RemoteProtocolError(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                                              f"more than {self.receive_maximum} QoS 1/2 "
                                              "PUBLISH packets unacknowledged")
                unacked.add(packet_id)  # type: ignore[arg-type]
        return packet

    def _received_connect(self, packet: Connect, new_state: ConnectionState) -> ConnectionState:
        level = packet.protocol_level
        self.protocol_level = level
        self._tentative_level = level
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
            raise _topic_name_invalid(will.topic)
        if will is not None and level == _V5:
            # 3.1.3.2.5 (5.0): the will's Response Topic becomes a PUBLISH's [MQTT-3.3.2-14].
            _check_response_topic(will.properties)
        if level == _V5:
            props = packet.properties
            if props.authentication_data is not None and props.authentication_method is None:
                # 3.1.2.11.10 (5.0)
                raise protocol_error("authentication data without an authentication method")
            self._read_peer_limits(props)
            self._auth_method = props.authentication_method
            self._session_expiry_at_connect = props.session_expiry_interval or 0
            self._problem_information = props.request_problem_information != 0
        return new_state

    def _read_peer_limits(self, props: Properties) -> None:
        if props.receive_maximum is not None:
            self.peer_receive_maximum = props.receive_maximum
        if props.maximum_packet_size is not None:
            self.peer_maximum_packet_size = props.maximum_packet_size
        if props.topic_alias_maximum is not None:
            self.peer_topic_alias_maximum = props.topic_alias_maximum

    def _received_connack(self, packet: ConnAck, new_state: ConnectionState) -> ConnectionState:
        if packet.reason_code >= 0x80:
            if packet.session_present:
                # [MQTT-3.2.2-6] (5.0), [MQTT-3.2.2-4] (3.1.1)
                raise protocol_error("refusing CONNACK with session present set")
            return ConnectionState.CLOSED
        if self.protocol_level == _V5:
            props = packet.properties
            self._read_peer_limits(props)
            if props.maximum_qos is not None:
                self.peer_maximum_qos = props.maximum_qos
            if props.retain_available is not None:
                self.peer_retain_available = bool(props.retain_available)
            if props.authentication_method is not None and self._auth_method is None:
                raise protocol_error("CONNACK with an authentication method we did not ask for")
        return new_state

    def _received_ack(self, packet: PubAck | PubRec | PubRel | PubComp,
                      new_state: ConnectionState) -> ConnectionState:
        ptype = packet.packet_type
        if ptype is _T.PUBREL:
            # The peer's QoS 2 message still counts against our Receive Maximum until our
            # PUBCOMP, also one whose PUBLISH came on an earlier connection.
            if self.protocol_level == _V5:
                self._inbound_unacked.add(packet.packet_id)
            return new_state
        packet_id = packet.packet_id
        unacked = self._outbound_unacked
        waiting = unacked.get(packet_id)
        if waiting is None:
            # Not sent on this connection: the session may know it from an earlier one (a
            # PUBREC for an unknown id gets PUBREL 0x92, 4.3.3 (5.0)); nothing to check here.
            return new_state
        if ptype is _T.PUBACK:
            if waiting != _AWAIT_PUBACK:
                raise _wrong_ack(packet, "a QoS 2 PUBLISH")
            del unacked[packet_id]  # 4.3.2 (5.0): the QoS 1 exchange ends
        elif ptype is _T.PUBREC:
            if waiting == _AWAIT_PUBACK:
                raise _wrong_ack(packet, "a QoS 1 PUBLISH")
            if waiting == _AWAIT_PUBREC:
                if packet.reason_code >= 0x80:
                    del unacked[packet_id]  # 4.9 (5.0): a failing PUBREC ends the exchange
                else:
                    unacked[packet_id] = _AWAIT_PUBREL_SENT
            elif packet.reason_code >= 0x80:
                raise _wrong_ack(packet, "already received (a failing PUBREC after a PUBREC)")
            # A repeated PUBREC is answered with PUBREL again (4.3.3 (5.0)).
        elif waiting == _AWAIT_PUBCOMP:  # PUBCOMP
            del unacked[packet_id]  # 4.3.3 (5.0): the QoS 2 exchange ends
        else:
            raise _wrong_ack(packet, "a QoS 1 PUBLISH" if waiting == _AWAIT_PUBACK
                             else "a QoS 2 PUBLISH whose PUBREL was not sent")
        return new_state

    def _received_subscribe(self, packet: Subscribe,
                            new_state: ConnectionState) -> ConnectionState:
        v5 = self.protocol_level == _V5
        for sub in packet.subscriptions:
            _check_topic_filter(sub.topic_filter, v5)
            if v5 and sub.no_local and sub.topic_filter.startswith(SHARE_PREFIX):
                # [MQTT-3.8.3-4] (5.0)
                raise protocol_error("no local on a shared subscription")
        return new_state

    def _received_unsubscribe(self, packet: Unsubscribe,
                              new_state: ConnectionState) -> ConnectionState:
        v5 = self.protocol_level == _V5
        for topic_filter in packet.topic_filters:
            _check_topic_filter(topic_filter, v5)
        return new_state

    def _received_suback(self, packet: SubAck, new_state: ConnectionState) -> ConnectionState:
        expected = self._pending_subscribes.pop(packet.packet_id, None)
        if expected is None:
            raise protocol_error(f"SUBACK for unknown packet identifier {packet.packet_id}")
        if len(packet.reason_codes) != expected:
            # [MQTT-3.9.3-1] (5.0): one reason code per topic filter.
            raise protocol_error(f"SUBACK with {len(packet.reason_codes)} reason codes for "
                                 f"{expected} topic filters")
        return new_state

    def _received_unsuback(self, packet: UnsubAck,
                           new_state: ConnectionState) -> ConnectionState:
        expected = self._pending_unsubscribes.pop(packet.packet_id, None)
        if expected is None:
            raise protocol_error(f"UNSUBACK for unknown packet identifier {packet.packet_id}")
        if self.protocol_level == _V5 and len(packet.reason_codes) != expected:
            # [MQTT-3.11.3-1] (5.0): one reason code per topic filter.
            raise protocol_error(f"UNSUBACK with {len(packet.reason_codes)} reason codes for "
                                 f"{expected} topic filters")
        return new_state

    def _received_disconnect(self, packet: Disconnect,
                             new_state: ConnectionState) -> ConnectionState:
        expiry = packet.properties.session_expiry_interval
        if self.role is Role.SERVER:
            if expiry and not self._session_expiry_at_connect:
                # 3.14.2.2.2 (5.0): no session expiry in DISCONNECT if CONNECT had 0.
                raise protocol_error("DISCONNECT sets a session expiry after CONNECT had 0")
        elif expiry is not None:
            # [MQTT-3.14.2-2] (5.0): the server does not send a session expiry interval.
            raise protocol_error("DISCONNECT from the server with a session expiry interval")
        return new_state

    # ------------------------------------------------------------------ sending

    def send(self, packet: Packet) -> bytes:
        """Validate `packet`, update the state and return its bytes (b"": do not send).

        Raises LocalProtocolError for a packet the state or the negotiated limits forbid.
        """
        ptype = packet.packet_type
        state = self.state
        if ptype is _T.PUBACK and state is ConnectionState.CONNECTED:
            # The hot path of QoS 1: a PUBACK without properties, as `_sending_ack` then
            # `encode_ack` would send it, in one step.
            ack = cast(PubAck, packet)
            packet_id = ack.packet_id
            if (ack.properties is NO_PROPERTIES and 0 < packet_id <= 0xFFFF
                    and self.peer_maximum_packet_size >= 4
                    and (not ack.reason_code or self.protocol_level != _V5)):
                self._inbound_unacked.discard(packet_id)
                return bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF))
        elif (ptype is _T.PUBLISH and state is ConnectionState.CONNECTED
                and self.role is Role.SERVER):
            # The hot path of a QoS 1 subscriber: a PUBLISH without properties and without
            # outbound topic aliases, checked and encoded as `_send_publish` would, in fewer
            # steps (the peer's Receive Maximum: [MQTT-3.3.4-7] (5.0)).
            publish = cast(Publish, packet)
            publish_id = publish.packet_id
            unacked = self._outbound_unacked
            if (publish.qos == 1 and publish.properties is NO_PROPERTIES
                    and not self.peer_topic_alias_maximum and publish_id is not None
                    and 0 < publish_id <= 0xFFFF and is_valid_topic_name(publish.topic)
                    and (publish_id in unacked or len(unacked) < self.peer_receive_maximum
                         or self.protocol_level != _V5)):
                data = encode_plain_qos1_publish(publish.topic, publish.payload, publish.retain,
                                                 publish.dup, publish_id,
                                                 self.protocol_level or _V5)
                if len(data) > self.peer_maximum_packet_size:
                    return b""  # [MQTT-3.1.2-25] (5.0): discarded, as if sent
                unacked[publish_id] = _AWAIT_PUBACK
                return data
        if state is ConnectionState.CLOSED:
            if (self._closed_by_us or self.role is not Role.SERVER
                    or ptype not in _ANSWERS_AFTER_DISCONNECT):
                raise LocalProtocolError(f"cannot send {ptype.name}: the connection is closed")
            # The client's DISCONNECT came behind packets whose answers wait for a commit
            # (a device sending CONNECT, PUBLISH, DISCONNECT in one write): they are still
            # owed ([MQTT-3.2.0-1] (3.1.1), [MQTT-3.1.4-5] (5.0): the CONNACK), nothing else.
            if ptype is _T.CONNACK:
                self._connack_sent = True
            return self._encode_within_limit(packet)
        level = self.protocol_level
        if ptype is _T.AUTH and level is not None and level < _V5:
            raise LocalProtocolError("AUTH exists only in MQTT 5")
        if (ptype is _T.DISCONNECT and self.role is Role.SERVER and level != _V5
                and state is ConnectionState.CONNECTED):
            # 3.1.1 has no server DISCONNECT: closing the connection is the whole message.
            self._close_by_us()
            return b""
        new_state = _SEND_ROWS[self.role][state][ptype]
        if new_state is None:
            raise LocalProtocolError(f"the {self.role.name.lower()} cannot send {ptype.name} "
                                     f"in state {state.value}")
        if ptype is _T.PUBLISH:
            data = self._send_publish(packet)  # type: ignore[arg-type]
            self.state = new_state
            return data
        hook = _SEND_HOOKS.get(ptype)
        if hook is not None:
            packet, new_state = hook(self, packet, new_state)
        try:
            data = self._encode_within_limit(packet)
        except LocalProtocolError:
            if ptype is _T.CONNACK:
                # Nothing may go before the CONNACK ([MQTT-3.2.0-1] (5.0)): if it cannot be
                # sent (larger than the client's Maximum Packet Size), the connection is over.
                self._close_by_us()
            raise
        self.state = new_state
        if new_state is ConnectionState.CLOSED:
            self._close_by_us()
        return data

    def shares_publish_encoding(self) -> bool:
        """Whether a QoS 0 PUBLISH goes out on this connection exactly as `encode_publish`
        makes it for `protocol_level` (connected, and no outbound topic aliases in use).

        A broker fanning one message out to many such connections encodes it once and passes
        the bytes to `send_encoded_qos0_publish`.
        """
        return self.state is ConnectionState.CONNECTED and not (
            self.protocol_level == _V5 and self.peer_topic_alias_maximum)

    def send_encoded_qos0_publish(self, data: bytes) -> bytes:
        """Send a QoS 0 PUBLISH already encoded by `encode_publish` for this protocol level;
        only valid while `shares_publish_encoding()`. b"" means: too large for the peer,
        discarded as if sent [MQTT-3.1.2-25] (5.0)."""
        if self.state is not ConnectionState.CONNECTED:
            raise LocalProtocolError(f"cannot send PUBLISH in state {self.state.value}")
        return data if len(data) <= self.peer_maximum_packet_size else b""

    def _level(self) -> int:
        level = self.protocol_level
        if level is None:
            raise LocalProtocolError("protocol level not known yet")
        return level

    def _encode_within_limit(self, packet: Packet) -> bytes:
        level = self._level()
        if (level == _V5 and not self._problem_information
                and packet.packet_type not in (_T.CONNACK, _T.DISCONNECT)):
            packet = _strip_problem_information(packet)  # [MQTT-3.1.2-29] (5.0)
        data = encode(packet, level)
        limit = self.peer_maximum_packet_size
        if len(data) <= limit:
            return data
        # 3.1.2.11.4 (5.0): reason string, then user properties, may be left out to fit.
        properties: Properties | None = getattr(packet, "properties", None)
        if properties is not None and properties.reason_string is not None:
            properties = dataclasses.replace(properties, reason_string=None)
            packet = dataclasses.replace(packet, properties=properties)  # type: ignore[arg-type]
            data = encode(packet, level)
        if len(data) > limit and properties is not None and properties.user_properties:
            properties = dataclasses.replace(properties, user_properties=())
            packet = dataclasses.replace(packet, properties=properties)  # type: ignore[arg-type]
            data = encode(packet, level)
        if len(data) > limit and packet.packet_type is _T.DISCONNECT:
            # [MQTT-3.1.2-24] (5.0): the bare DISCONNECT if it fits, else nothing (the caller
            # closes the connection anyway); a DISCONNECT never fails to be "sent".
            data = encode(dataclasses.replace(packet, properties=NO_PROPERTIES),  # type: ignore[arg-type]
                          level)
            return data if len(data) <= limit else b""
        if len(data) > limit:
            raise LocalProtocolError(f"{packet.packet_type.name} of {len(data)} bytes exceeds "
                                     f"the peer's maximum packet size {limit}")
        return data

    def _send_publish(self, packet: Publish) -> bytes:
        level = self._level()
        topic = packet.topic
        qos = packet.qos
        properties = packet.properties
        caller_alias = properties.topic_alias
        if (topic or caller_alias is None) and not is_valid_topic_name(topic):
            raise LocalProtocolError(f"invalid topic name {topic!r}")
        if self.role is Role.CLIENT:
            if qos > self.peer_maximum_qos:
                # [MQTT-3.2.2-11] (5.0)
                raise LocalProtocolError(f"QoS {qos} above the server's maximum QoS "
                                         f"{self.peer_maximum_qos}")
            if packet.retain and not self.peer_retain_available:
                raise LocalProtocolError("the server does not support retain")  # [MQTT-3.2.2-14]
        packet_id = packet.packet_id
        if qos and level == _V5 and packet_id not in self._outbound_unacked and (
                len(self._outbound_unacked) >= self.peer_receive_maximum):
            # [MQTT-3.3.4-7] (5.0)
            raise LocalProtocolError(f"the peer's receive maximum {self.peer_receive_maximum} "
                                     "is reached")

        new_alias: int | None = None
        wire_topic: str | None = None
        alias: int | None = None
        if level == _V5 and self.peer_topic_alias_maximum:
            if caller_alias is not None:
                if not 1 <= caller_alias <= self.peer_topic_alias_maximum:
                    raise LocalProtocolError(f"topic alias {caller_alias} not in 1.."
                                             f"{self.peer_topic_alias_maximum}")
                if not topic and caller_alias not in self._outbound_alias_topics:
                    raise LocalProtocolError(f"topic alias {caller_alias} was never set")
            else:
                alias = self._outbound_aliases.get(topic)
                if alias is not None:
                    wire_topic = ""
                elif len(self._outbound_aliases) < self.peer_topic_alias_maximum:
                    alias = new_alias = len(self._outbound_aliases) + 1
        elif caller_alias is not None:
            # [MQTT-3.3.2-9], [MQTT-3.3.2-11] (5.0): the peer's maximum is 0.
            raise LocalProtocolError("the peer accepts no topic aliases")

        data = encode_publish(packet, level, topic=wire_topic, topic_alias=alias)
        if len(data) > self.peer_maximum_packet_size:
            return b""  # [MQTT-3.1.2-25] (5.0): discarded, as if sent

        if new_alias is not None:
            self._outbound_aliases[topic] = new_alias
            self._outbound_alias_topics[new_alias] = topic
        elif caller_alias is not None and topic:
            old = self._outbound_alias_topics.get(caller_alias)
            if old is not None:
                del self._outbound_aliases[old]
            self._outbound_aliases[topic] = caller_alias
            self._outbound_alias_topics[caller_alias] = topic
        if qos:
            self._outbound_unacked[packet_id] = (  # type: ignore[index]
                _AWAIT_PUBACK if qos == 1 else _AWAIT_PUBREC)
        return data

    def _sending_connect(self, packet: Connect,
                         new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        if packet.protocol_level != self.protocol_level:
            raise LocalProtocolError(f"CONNECT for protocol level {packet.protocol_level} on a "
                                     f"level {self.protocol_level} connection")
        if packet.protocol_level == _V5:
            props = packet.properties
            self._read_own_limits(props)
            self._auth_method = props.authentication_method
            self._session_expiry_at_connect = props.session_expiry_interval or 0
        return packet, new_state

    def _read_own_limits(self, props: Properties) -> None:
        if props.receive_maximum is not None:
            self.receive_maximum = props.receive_maximum
        if props.maximum_packet_size is not None:
            self.maximum_packet_size = props.maximum_packet_size
        if props.topic_alias_maximum is not None:
            self.topic_alias_maximum = props.topic_alias_maximum

    def _sending_connack(self, packet: ConnAck,
                         new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        self._connack_sent = True
        if packet.reason_code >= 0x80:
            # [MQTT-3.2.2-7] (5.0): close after a refusing CONNACK; [MQTT-3.1.4-5] (5.0) and
            # [MQTT-3.1.4-4] (3.1.1): do not process anything the client sent after CONNECT.
            return packet, ConnectionState.CLOSED
        if self.protocol_level == _V5:
            props = packet.properties
            self._read_own_limits(props)
            if props.maximum_qos is not None:
                self._our_maximum_qos = props.maximum_qos
            if props.retain_available is not None:
                self._our_retain_available = bool(props.retain_available)
        return packet, new_state

    def _sending_ack(self, packet: PubAck | PubRec | PubRel | PubComp,
                     new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        ptype = packet.packet_type
        if ptype is _T.PUBREL:
            self._outbound_unacked[packet.packet_id] = _AWAIT_PUBCOMP
        elif ptype is not _T.PUBREC or packet.reason_code >= 0x80:
            # We finally acknowledge: PUBACK, PUBCOMP, or a failing PUBREC (4.9 (5.0)).
            self._inbound_unacked.discard(packet.packet_id)
        return packet, new_state

    def _sending_subscribe(self, packet: Subscribe,
                           new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        self._pending_subscribes[packet.packet_id] = len(packet.subscriptions)
        return packet, new_state

    def _sending_unsubscribe(self, packet: Unsubscribe,
                             new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        self._pending_unsubscribes[packet.packet_id] = len(packet.topic_filters)
        return packet, new_state

    def _sending_disconnect(self, packet: Disconnect,
                            new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        expiry = packet.properties.session_expiry_interval
        if self.role is Role.SERVER:
            if expiry is not None:
                raise LocalProtocolError("a server DISCONNECT carries no session expiry "
                                         "interval")  # [MQTT-3.14.2-2] (5.0)
        elif expiry and not self._session_expiry_at_connect:
            raise LocalProtocolError("session expiry in DISCONNECT after CONNECT had 0")
        return packet, new_state

    def _sending_auth(self, packet: Auth,
                      new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
        if self._auth_method is None:
            raise LocalProtocolError("AUTH without an authentication method in CONNECT")
        return packet, new_state

    def _close_by_us(self) -> None:
        self.state = ConnectionState.CLOSED
        self._closed_by_us = True
        self._buf.clear()
        self._pos = 0

    # ------------------------------------------------------------------ errors

    def error_bytes(self, error: RemoteProtocolError) -> bytes:
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
        already_closed = self._closed_by_us
        sent_connect = self.role is Role.SERVER or self.state is not ConnectionState.AWAIT_CONNECT
        self._close_by_us()
        if already_closed or not sent_connect:
            return b""
        code = int(error.reason_code)
        reason = error.message[:_REASON_STRING_LIMIT]
        if self.role is Role.SERVER and not self._connack_sent:
            self._connack_sent = True
            level = self.protocol_level or self._tentative_level
            if level == _V5:
                if code not in REASON_CODES[_T.CONNACK]:
                    code = ReasonCode.PROTOCOL_ERROR
                return self._error_packet_bytes(ConnAck(False, code,
                                                        Properties(reason_string=reason)), level)
            if level is None and code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
                level = ProtocolLevel.MQTT_3_1_1
            return_code = CONNACK_V5_TO_V3.get(code)
            if level is None or return_code is None:
                return b""
            return self._error_packet_bytes(ConnAck(False, code), level)
        if self.protocol_level != _V5:
            return b""
        if code not in REASON_CODES[_T.DISCONNECT]:
            code = ReasonCode.PROTOCOL_ERROR
        return self._error_packet_bytes(Disconnect(code, Properties(reason_string=reason)),
                                        self.protocol_level)

    def _error_packet_bytes(self, packet: ConnAck | Disconnect, level: int) -> bytes:
        limit = self.peer_maximum_packet_size
        for candidate in (packet, dataclasses.replace(packet, properties=NO_PROPERTIES)):
            try:
                data = encode(candidate, level)
            except (LocalProtocolError, ValueError):
                continue
            if len(data) <= limit:
                return data
        return b""  # [MQTT-3.1.2-24] (5.0): not even the bare packet fits


def _topic_name_invalid(topic: str) -> RemoteProtocolError:
    # [MQTT-3.3.2-2] (5.0): no wildcards in a topic name.
    return RemoteProtocolError(ReasonCode.TOPIC_NAME_INVALID, f"invalid topic name {topic!r}")


def _check_topic_filter(topic_filter: str, v5: bool) -> None:
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


def _wrong_ack(packet: PubAck | PubRec | PubRel | PubComp, what: str) -> RemoteProtocolError:
    # [MQTT-4.8.0-1] (3.1.1): close on a protocol violation; 4.13.1 (5.0): a Protocol Error
    # (4.3.2 / 4.3.3 (5.0): PUBACK answers QoS 1, PUBREC then PUBCOMP answer QoS 2).
    return protocol_error(f"{packet.packet_type.name} for packet identifier "
                          f"{packet.packet_id}, which is {what}")


def _check_response_topic(properties: Properties) -> None:
    # [MQTT-3.3.2-14] (5.0): a Response Topic is a topic name (no wildcards, not empty).
    topic = properties.response_topic
    if topic is not None and not is_valid_topic_name(topic):
        raise protocol_error(f"invalid response topic {topic!r}")


def _strip_problem_information(packet: Packet) -> Packet:
    properties: Properties | None = getattr(packet, "properties", None)
    if properties is None or properties is NO_PROPERTIES or packet.packet_type is _T.PUBLISH:
        return packet
    if properties.reason_string is None and not properties.user_properties:
        return packet
    properties = dataclasses.replace(properties, reason_string=None, user_properties=())
    return dataclasses.replace(packet, properties=properties)  # type: ignore[arg-type]


def _peek_buffered_connect_level(buf: bytearray, start: int) -> int | None:
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


_ReceiveHook = Callable[[Connection, Any, ConnectionState], ConnectionState]
_RECEIVE_HOOK_BY_TYPE: Final[dict[PacketType, _ReceiveHook]] = {
    _T.CONNECT: Connection._received_connect,
    _T.CONNACK: Connection._received_connack,
    _T.PUBACK: Connection._received_ack,
    _T.PUBREC: Connection._received_ack,
    _T.PUBREL: Connection._received_ack,
    _T.PUBCOMP: Connection._received_ack,
    _T.SUBSCRIBE: Connection._received_subscribe,
    _T.SUBACK: Connection._received_suback,
    _T.UNSUBSCRIBE: Connection._received_unsubscribe,
    _T.UNSUBACK: Connection._received_unsuback,
    _T.DISCONNECT: Connection._received_disconnect,
}
# Indexed by packet type number (PUBLISH is handled inline).
_RECEIVE_HOOKS: Final[tuple[_ReceiveHook | None, ...]] = tuple(
    _RECEIVE_HOOK_BY_TYPE.get(PacketType(value)) if value else None for value in range(16))
_SEND_HOOKS: Final[dict[PacketType, Callable[[Connection, Any, ConnectionState],
                                              tuple[Packet, ConnectionState]]]] = {
    _T.CONNECT: Connection._sending_connect,
    _T.CONNACK: Connection._sending_connack,
    _T.PUBACK: Connection._sending_ack,
    _T.PUBREC: Connection._sending_ack,
    _T.PUBREL: Connection._sending_ack,
    _T.PUBCOMP: Connection._sending_ack,
    _T.SUBSCRIBE: Connection._sending_subscribe,
    _T.UNSUBSCRIBE: Connection._sending_unsubscribe,
    _T.DISCONNECT: Connection._sending_disconnect,
    _T.AUTH: Connection._sending_auth,
}
