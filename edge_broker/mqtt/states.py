"""The state table of an MQTT connection (`Connection`, mqtt/connection.py): which packet each
role may send and receive in each state, and the state it leads to. `TRANSITIONS` is keyed by
(role, state, direction, packet type); a missing key is the error. `format_transitions()`
prints it.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from .types import MAX_REMAINING_LENGTH, PacketType, ProtocolLevel, Role

# The largest packet MQTT can frame: 1 type byte + 4 length bytes + the largest body.
NO_PACKET_SIZE_LIMIT: Final = MAX_REMAINING_LENGTH + 5
_V5: Final = ProtocolLevel.MQTT_5
REASON_STRING_LIMIT: Final = 200

# What an outbound QoS 1/2 PUBLISH waits for, by packet identifier (4.3.2, 4.3.3 (5.0)).
AWAIT_PUBACK: Final = 1  # QoS 1 sent
AWAIT_PUBREC: Final = 2  # QoS 2 sent
AWAIT_PUBREL_SENT: Final = 3  # QoS 2: PUBREC received, our PUBREL not sent yet
AWAIT_PUBCOMP: Final = 4  # QoS 2: PUBREL sent


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
ANSWERS_AFTER_DISCONNECT: Final = frozenset({_T.CONNACK, _T.PUBACK, _T.PUBREC, _T.PUBCOMP,
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


RECEIVE_ROWS: Final = _rows(Direction.RECEIVE)
SEND_ROWS: Final = _rows(Direction.SEND)


def format_transitions() -> str:
    """The state table as text, one transition a line."""
    lines = [f"{'role':<7} {'state':<14} {'direction':<8} {'packet':<12} new state"]
    for (role, state, direction, ptype), new_state in TRANSITIONS.items():
        lines.append(f"{role.name:<7} {state.value:<14} {direction.value:<8} {ptype.name:<12} "
                     f"{new_state.value}")
    return "\n".join(lines)
