"""The acknowledgements of QoS 1 and 2 PUBLISH packets on a `Connection` (mqtt/connection.py),
in both directions: which acknowledgement each packet identifier we sent waits for (PUBACK for
QoS 1, PUBREC then PUBCOMP for QoS 2), and which identifiers we received still count against
our Receive Maximum until we finally acknowledge them (5.0).

A wrong acknowledgement type for an identifier we sent is a protocol violation on every
protocol level ([MQTT-4.8.0-1] (3.1.1), 4.13 (5.0)); one for an identifier this connection has
not sent is passed on (the session may know it from an earlier connection). The connection
calls these through its hook tables, as those of mqtt/control.py. The plain-PUBACK fast paths
(`Connection.send`, `Connection.next_event_or_ack`) give the same results as these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .packets import Packet, PubAck, PubComp, PubRec, PubRel
from .states import (
    _V5,
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    AWAIT_PUBREL_SENT,
    ConnectionState,
)
from .types import PacketType
from .wire import protocol_error

if TYPE_CHECKING:
    from .connection import Connection
    from .errors import RemoteProtocolError


def received_ack(conn: Connection, packet: PubAck | PubRec | PubRel | PubComp,
                 new_state: ConnectionState) -> ConnectionState:
    """Check a PUBACK, PUBREC, PUBREL or PUBCOMP the peer sent; the connection's new state."""
    ptype = packet.packet_type
    if ptype is PacketType.PUBREL:
        # The peer's QoS 2 message still counts against our Receive Maximum until our
        # PUBCOMP, also one whose PUBLISH came on an earlier connection.
        if conn.protocol_level == _V5:
            conn._inbound_unacked[packet.packet_id] = None
        return new_state
    packet_id = packet.packet_id
    unacked = conn._outbound_unacked
    waiting = unacked.get(packet_id)
    if waiting is None:
        # Not sent on this connection: the session may know it from an earlier one (a
        # PUBREC for an unknown id gets PUBREL 0x92, 4.3.3 (5.0)); nothing to check here.
        return new_state
    if ptype is PacketType.PUBACK:
        if waiting != AWAIT_PUBACK:
            raise wrong_ack(packet, "a QoS 2 PUBLISH")
        del unacked[packet_id]  # 4.3.2 (5.0): the QoS 1 exchange ends
    elif ptype is PacketType.PUBREC:
        if waiting == AWAIT_PUBACK:
            raise wrong_ack(packet, "a QoS 1 PUBLISH")
        if waiting == AWAIT_PUBREC:
            if packet.reason_code >= 0x80:
                del unacked[packet_id]  # 4.9 (5.0): a failing PUBREC ends the exchange
            else:
                unacked[packet_id] = AWAIT_PUBREL_SENT
        elif packet.reason_code >= 0x80:
            raise wrong_ack(packet, "already received (a failing PUBREC after a PUBREC)")
        # A repeated PUBREC is answered with PUBREL again (4.3.3 (5.0)).
    elif waiting == AWAIT_PUBCOMP:  # PUBCOMP
        del unacked[packet_id]  # 4.3.3 (5.0): the QoS 2 exchange ends
    else:
        raise wrong_ack(packet, "a QoS 1 PUBLISH" if waiting == AWAIT_PUBACK
                        else "a QoS 2 PUBLISH whose PUBREL was not sent")
    return new_state


def sending_ack(conn: Connection, packet: PubAck | PubRec | PubRel | PubComp,
                new_state: ConnectionState) -> tuple[Packet, ConnectionState]:
    """Record a PUBACK, PUBREC, PUBREL or PUBCOMP we send; it and the new state."""
    ptype = packet.packet_type
    if ptype is PacketType.PUBREL:
        conn._outbound_unacked[packet.packet_id] = AWAIT_PUBCOMP
    elif ptype is not PacketType.PUBREC or packet.reason_code >= 0x80:
        # We finally acknowledge: PUBACK, PUBCOMP, or a failing PUBREC (4.9 (5.0)).
        conn._inbound_unacked.pop(packet.packet_id, None)
    return packet, new_state


def wrong_ack(packet: PubAck | PubRec | PubRel | PubComp, what: str) -> RemoteProtocolError:
    # [MQTT-4.8.0-1] (3.1.1): close on a protocol violation; 4.13.1 (5.0): a Protocol Error
    # (4.3.2 / 4.3.3 (5.0): PUBACK answers QoS 1, PUBREC then PUBCOMP answer QoS 2).
    return protocol_error(f"{packet.packet_type.name} for packet identifier "
                          f"{packet.packet_id}, which is {what}")
