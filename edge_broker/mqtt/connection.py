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
packet with `codec.frame_bounds` (which refuses a packet larger than our Maximum Packet Size as
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

The state table is `TRANSITIONS` (mqtt/states.py), keyed by (role, state, direction, packet
type); a missing key is the error. `format_transitions()` prints it. The PUBLISH rules are in
mqtt/publishing.py, the acknowledgements of QoS 1/2 PUBLISH packets in mqtt/acks.py, those of
the other packets and `error_bytes` in mqtt/control.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final, cast

from . import acks, control
from .codec import (
    decode,
    decode_publish,
    encode,
    frame_bounds,
)
from .control import (
    error_bytes,
    peek_buffered_connect_level,
    strip_problem_information,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .packets import (
    Packet,
    PubAck,
    Publish,
)
from .properties import NO_PROPERTIES, Properties
from .publishing import received_publish, send_plain_qos1, send_publish
from .states import (
    _V5,
    ANSWERS_AFTER_DISCONNECT,
    AWAIT_PUBACK,
    NO_PACKET_SIZE_LIMIT,
    RECEIVE_ROWS,
    SEND_ROWS,
    ConnectionState,
)
from .states import (  # the state table, importable from here as before the split
    TRANSITIONS as TRANSITIONS,
)
from .states import Direction as Direction
from .states import Transition as Transition
from .states import format_transitions as format_transitions
from .types import PacketType, ProtocolLevel, Role
from .wire import malformed, protocol_error


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

        # QoS 1/2 ids received, not finally acked (keys; a dict: an empty set is 216 bytes,
        # an empty dict 64, per idle connection: issue 12, S5).
        self._inbound_unacked: dict[int, None] = {}
        # QoS 1/2 ids sent, not finally acked -> what they wait for (_AWAIT_*).
        self._outbound_unacked: dict[int, int] = {}
        # Made on first use (mqtt/publishing.py, mqtt/control.py): topic aliases are rare and
        # only a client sends SUBSCRIBE; five empty dicts are 320 bytes per idle connection.
        self._inbound_aliases: dict[int, str] | None = None
        self._outbound_aliases: dict[str, int] | None = None
        self._outbound_alias_topics: dict[int, str] | None = None
        self._pending_subscribes: dict[int, int] | None = None  # packet id -> filter count
        self._pending_unsubscribes: dict[int, int] | None = None

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

    def packet_buffered(self) -> bool:
        """Whether a whole packet waits in the buffer, not taken by `next_event` yet: the
        keep alive counts packets received, not bytes [MQTT-3.1.2-24] (3.1.1),
        [MQTT-3.1.2-22] (5.0). A length that breaks the protocol counts too (the next
        `next_event` raises)."""
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return False
        try:
            return frame_bounds(buf, pos, self.maximum_packet_size)[1] != 0
        except RemoteProtocolError:
            return True

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
            return self._next_packet(buf, pos, buf[pos])
        except RemoteProtocolError as exc:
            if self.role is Role.SERVER and self.protocol_level is None:
                self._tentative_level = peek_buffered_connect_level(buf, pos)
            self._error = exc
            raise

    def next_event_or_ack(self) -> Packet | int | None:
        """As `next_event`, except that a plain PUBACK (success, no properties: the four
        bytes 0x40 0x02 id id) acknowledging a QoS 1 PUBLISH sent on this connection, or one
        it does not know, is returned as its packet identifier (an int), without building a
        `PubAck`: the burst of acknowledgements a QoS 1 subscriber sends is the hot path.
        Anything else, including a PUBACK that breaks the protocol, as `next_event` (whose
        steps this repeats rather than calls: it is every packet's path in a broker).
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
        first_byte = buf[pos]  # read once: a bytearray read is costly in the compiled build
        if (first_byte == 0x40 and pos + 4 <= len(buf) and buf[pos + 1] == 2
                and self.state is ConnectionState.CONNECTED and self.maximum_packet_size >= 4):
            packet_id = (buf[pos + 2] << 8) | buf[pos + 3]
            unacked = self._outbound_unacked
            if packet_id and unacked.get(packet_id, AWAIT_PUBACK) == AWAIT_PUBACK:
                # What received_ack does for a PUBACK: 4.3.2 (5.0), the QoS 1 exchange ends.
                # (Packet id 0 or a QoS 2 id: the protocol error, by _next_packet.)
                unacked.pop(packet_id, None)
                self._pos = pos + 4
                return packet_id
        try:
            return self._next_packet(buf, pos, first_byte)
        except RemoteProtocolError as exc:
            if self.role is Role.SERVER and self.protocol_level is None:
                self._tentative_level = peek_buffered_connect_level(buf, pos)
            self._error = exc
            raise

    def _next_packet(self, buf: bytearray, start: int, first_byte: int) -> Packet | None:
        state = self.state
        if state is not self._row_state:
            self._row = RECEIVE_ROWS[self.role][state]
            self._row_state = state
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

        body_start, body_end = frame_bounds(buf, start, self.maximum_packet_size)
        if not body_end:
            return None
        body = bytes(buf[body_start:body_end])
        self._pos = body_end
        if level is None:
            level = _V5  # server role before CONNECT: only a CONNECT gets here
        if ptype_value == 3:
            decoded = decode_publish(first_byte & 0x0F, body, level)
            publish = received_publish(self, decoded)
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
        if ptype is PacketType.CONNECT:
            return protocol_error("second CONNECT")  # [MQTT-3.1.0-2] (5.0)
        return protocol_error(f"{ptype.name} received by the {self.role.name.lower()} in state "
                              f"{self.state.value}")

    # ------------------------------------------------------------------ sending

    def send(self, packet: Packet) -> bytes:
        """Validate `packet`, update the state and return its bytes (b"": do not send).

        Raises LocalProtocolError for a packet the state or the negotiated limits forbid.
        """
        ptype = packet.packet_type
        state = self.state
        if ptype is PacketType.PUBACK and state is ConnectionState.CONNECTED:
            # The hot path of QoS 1: a PUBACK without properties, as `acks.sending_ack` then
            # `encode_ack` would send it, in one step.
            ack = cast(PubAck, packet)
            packet_id = ack.packet_id
            if (ack.properties is NO_PROPERTIES and 0 < packet_id <= 0xFFFF
                    and self.peer_maximum_packet_size >= 4
                    and (not ack.reason_code or self.protocol_level != _V5)):
                self._inbound_unacked.pop(packet_id, None)
                return bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF))
        elif (ptype is PacketType.PUBLISH and state is ConnectionState.CONNECTED
                and self.role is Role.SERVER):
            # The hot path of a QoS 1 subscriber (send_plain_qos1): a PUBLISH without
            # properties and without outbound topic aliases, checked and encoded as
            # `_send_publish` would, in fewer steps.
            publish = cast(Publish, packet)
            publish_id = publish.packet_id
            if (publish.qos == 1 and publish.properties is NO_PROPERTIES
                    and publish_id is not None):
                sent = send_plain_qos1(self, publish.topic, publish.payload, publish.retain,
                                       publish.dup, publish_id)
                if sent is not None:
                    return sent
        if state is ConnectionState.CLOSED:
            if (self._closed_by_us or self.role is not Role.SERVER
                    or ptype not in ANSWERS_AFTER_DISCONNECT):
                raise LocalProtocolError(f"cannot send {ptype.name}: the connection is closed")
            # The client's DISCONNECT came behind packets whose answers wait for a commit
            # (a device sending CONNECT, PUBLISH, DISCONNECT in one write): they are still
            # owed ([MQTT-3.2.0-1] (3.1.1), [MQTT-3.1.4-5] (5.0): the CONNACK), nothing else.
            if ptype is PacketType.CONNACK:
                self._connack_sent = True
            return self._encode_within_limit(packet)
        level = self.protocol_level
        if ptype is PacketType.AUTH and level is not None and level < _V5:
            raise LocalProtocolError("AUTH exists only in MQTT 5")
        if (ptype is PacketType.DISCONNECT and self.role is Role.SERVER and level != _V5
                and state is ConnectionState.CONNECTED):
            # 3.1.1 has no server DISCONNECT: closing the connection is the whole message.
            self._close_by_us()
            return b""
        new_state = SEND_ROWS[self.role][state][ptype]
        if new_state is None:
            raise LocalProtocolError(f"the {self.role.name.lower()} cannot send {ptype.name} "
                                     f"in state {state.value}")
        if ptype is PacketType.PUBLISH:
            data = send_publish(self, packet)  # type: ignore[arg-type]
            self.state = new_state
            return data
        hook = _SEND_HOOKS.get(ptype)
        if hook is not None:
            packet, new_state = hook(self, packet, new_state)
        try:
            data = self._encode_within_limit(packet)
        except LocalProtocolError:
            if ptype is PacketType.CONNACK:
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
                and packet.packet_type not in (PacketType.CONNACK, PacketType.DISCONNECT)):
            packet = strip_problem_information(packet)  # [MQTT-3.1.2-29] (5.0)
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
        if len(data) > limit and packet.packet_type is PacketType.DISCONNECT:
            # [MQTT-3.1.2-24] (5.0): the bare DISCONNECT if it fits, else nothing (the caller
            # closes the connection anyway); a DISCONNECT never fails to be "sent".
            data = encode(dataclasses.replace(packet, properties=NO_PROPERTIES),  # type: ignore[arg-type]
                          level)
            return data if len(data) <= limit else b""
        if len(data) > limit:
            raise LocalProtocolError(f"{packet.packet_type.name} of {len(data)} bytes exceeds "
                                     f"the peer's maximum packet size {limit}")
        return data

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
        return error_bytes(self, error)

_ReceiveHook = Callable[[Connection, Any, ConnectionState], ConnectionState]
_RECEIVE_HOOK_BY_TYPE: Final[dict[PacketType, _ReceiveHook]] = {
    PacketType.CONNECT: control.received_connect,
    PacketType.CONNACK: control.received_connack,
    PacketType.PUBACK: acks.received_ack,
    PacketType.PUBREC: acks.received_ack,
    PacketType.PUBREL: acks.received_ack,
    PacketType.PUBCOMP: acks.received_ack,
    PacketType.SUBSCRIBE: control.received_subscribe,
    PacketType.SUBACK: control.received_suback,
    PacketType.UNSUBSCRIBE: control.received_unsubscribe,
    PacketType.UNSUBACK: control.received_unsuback,
    PacketType.DISCONNECT: control.received_disconnect,
}
# Indexed by packet type number (PUBLISH is handled inline).
_RECEIVE_HOOKS: Final[tuple[_ReceiveHook | None, ...]] = tuple(
    _RECEIVE_HOOK_BY_TYPE.get(PacketType(value)) if value else None for value in range(16))
_SEND_HOOKS: Final[dict[PacketType, Callable[[Connection, Any, ConnectionState],
                                              tuple[Packet, ConnectionState]]]] = {
    PacketType.CONNECT: control.sending_connect,
    PacketType.CONNACK: control.sending_connack,
    PacketType.PUBACK: acks.sending_ack,
    PacketType.PUBREC: acks.sending_ack,
    PacketType.PUBREL: acks.sending_ack,
    PacketType.PUBCOMP: acks.sending_ack,
    PacketType.SUBSCRIBE: control.sending_subscribe,
    PacketType.UNSUBSCRIBE: control.sending_unsubscribe,
    PacketType.DISCONNECT: control.sending_disconnect,
    PacketType.AUTH: control.sending_auth,
}
