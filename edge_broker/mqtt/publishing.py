"""The PUBLISH rules of a `Connection` (mqtt/connection.py) that need its state, in both
directions: topic aliases (inbound ones resolved, so the broker core never sees an alias;
outbound ones assigned while the peer's Topic Alias Maximum allows), Receive Maximum (5.0),
the Maximum QoS and Retain Available each side declared, topic name and Response Topic syntax,
and the Maximum Packet Size of the peer (a PUBLISH that does not fit is discarded as if sent,
[MQTT-3.1.2-25] (5.0)). The QoS 1 fast paths are in `Connection.send` and
`Connection.next_event_or_ack`; they give the same results as these.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING, Final

from .codec import encode_publish
from .control import check_response_topic, topic_name_invalid
from .encoding import encode_plain_qos1_publish
from .errors import LocalProtocolError, RemoteProtocolError
from .packets import PubAck, Publish
from .properties import NO_PROPERTIES
from .states import _V5, AWAIT_PUBACK, AWAIT_PUBREC, ConnectionState
from .topics import is_valid_topic_name
from .types import ReasonCode, Role
from .wire import malformed, protocol_error

if TYPE_CHECKING:
    from .connection import Connection


def send_plain_qos1(conn: Connection, topic: str, payload: bytes, retain: bool, dup: bool,
                    packet_id: int) -> bytes | None:
    """What `conn.send` returns for a server's QoS 1 PUBLISH without properties (b"": do not
    send, it is too large for the peer), checked and encoded in fewer steps and without a
    `Publish`: the hot path of a QoS 1 subscriber. None when these steps do not apply (not
    connected, outbound topic aliases, the peer's Receive Maximum reached, an invalid topic or
    packet id): then `conn.send` a `Publish`, which checks it all.
    """
    unacked = conn._outbound_unacked
    if (conn.state is ConnectionState.CONNECTED and conn.role is Role.SERVER
            and not conn.peer_topic_alias_maximum and 0 < packet_id <= 0xFFFF
            and is_valid_topic_name(topic)
            # the peer's Receive Maximum: [MQTT-3.3.4-7] (5.0)
            and (packet_id in unacked or len(unacked) < conn.peer_receive_maximum
                 or conn.protocol_level != _V5)):
        data = encode_plain_qos1_publish(topic, payload, retain, dup, packet_id,
                                         conn.protocol_level or _V5)
        if len(data) > conn.peer_maximum_packet_size:
            return b""  # [MQTT-3.1.2-25] (5.0): discarded, as if sent
        unacked[packet_id] = AWAIT_PUBACK
        return data
    return None


_PUBACK_HEAD: Final = b"\x40\x02"  # PUBACK, Remaining Length 2: success, no properties
_U16: Final = struct.Struct(">H").pack


def send_plain_puback(conn: Connection, packet_id: int) -> bytes:
    """What `conn.send(PubAck(packet_id))` returns (a success without properties), without
    building the `PubAck` in the usual case: the QoS 1 publisher's hot path."""
    if (conn.state is ConnectionState.CONNECTED and 0 < packet_id <= 0xFFFF
            and conn.peer_maximum_packet_size >= 4):
        unacked = conn._inbound_unacked  # (3.1.1: empty)
        if unacked and packet_id in unacked:
            del unacked[packet_id]  # its Receive Maximum slot is free (3.3.4 (5.0))
        # (a Struct's pack costs half as much as bytes() of a tuple, compiled)
        return _PUBACK_HEAD + _U16(packet_id)
    return conn.send(PubAck(packet_id))


def received_publish(conn: Connection, packet: Publish) -> Publish:
    topic = packet.topic
    properties = packet.properties
    if conn.protocol_level == _V5:
        alias = properties.topic_alias
        if alias is not None:
            if alias == 0 or alias > conn.topic_alias_maximum:
                # [MQTT-3.3.2-8], [MQTT-3.3.2-9], [MQTT-3.3.2-11] (5.0)
                raise RemoteProtocolError(ReasonCode.TOPIC_ALIAS_INVALID,
                                          f"topic alias {alias} not in 1.."
                                          f"{conn.topic_alias_maximum}")
            aliases = conn._inbound_aliases
            if aliases is None:
                aliases = conn._inbound_aliases = {}
            if topic:
                if not is_valid_topic_name(topic):
                    raise topic_name_invalid(topic)
                aliases[alias] = topic
            else:
                known = aliases.get(alias)
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
            raise topic_name_invalid(topic)
        if conn.role is Role.SERVER and properties.subscription_identifiers:
            # [MQTT-3.3.4-6] (5.0)
            raise protocol_error("PUBLISH from a client with a subscription identifier")
        if properties.response_topic is not None:
            check_response_topic(properties)  # [MQTT-3.3.2-14] (5.0)
    elif not topic:
        raise malformed("empty topic name")  # [MQTT-4.7.3-1] (3.1.1)
    elif not is_valid_topic_name(topic):
        raise topic_name_invalid(topic)
    qos = packet.qos
    if conn.role is Role.SERVER:
        if qos > conn._our_maximum_qos:
            # 3.2.2.3.4 (5.0): a Protocol Error, answered with 0x9B.
            raise RemoteProtocolError(ReasonCode.QOS_NOT_SUPPORTED,
                                      f"PUBLISH QoS {qos} above the maximum QoS "
                                      f"{conn._our_maximum_qos}")
        if packet.retain and not conn._our_retain_available:
            # 3.2.2.3.5 (5.0): a Protocol Error, answered with 0x9A.
            raise RemoteProtocolError(ReasonCode.RETAIN_NOT_SUPPORTED,
                                      "retained PUBLISH while retain is not available")
    if qos and conn.protocol_level == _V5:
        packet_id = packet.packet_id
        unacked = conn._inbound_unacked
        if packet_id not in unacked:
            if len(unacked) >= conn.receive_maximum:
                # [MQTT-3.3.4-9] (5.0)
                raise RemoteProtocolError(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                                          f"more than {conn.receive_maximum} QoS 1/2 "
                                          "PUBLISH packets unacknowledged")
            unacked[packet_id] = None  # type: ignore[index]
    return packet


def send_publish(conn: Connection, packet: Publish) -> bytes:
    level = conn._level()
    topic = packet.topic
    qos = packet.qos
    properties = packet.properties
    caller_alias = properties.topic_alias
    if (topic or caller_alias is None) and not is_valid_topic_name(topic):
        raise LocalProtocolError(f"invalid topic name {topic!r}")
    if conn.role is Role.CLIENT:
        if qos > conn.peer_maximum_qos:
            # [MQTT-3.2.2-11] (5.0)
            raise LocalProtocolError(f"QoS {qos} above the server's maximum QoS "
                                     f"{conn.peer_maximum_qos}")
        if packet.retain and not conn.peer_retain_available:
            raise LocalProtocolError("the server does not support retain")  # [MQTT-3.2.2-14]
    packet_id = packet.packet_id
    if qos and level == _V5 and packet_id not in conn._outbound_unacked and (
            len(conn._outbound_unacked) >= conn.peer_receive_maximum):
        # [MQTT-3.3.4-7] (5.0)
        raise LocalProtocolError(f"the peer's receive maximum {conn.peer_receive_maximum} "
                                 "is reached")

    new_alias: int | None = None
    wire_topic: str | None = None
    alias: int | None = None
    if level == _V5 and conn.peer_topic_alias_maximum:
        out_aliases = conn._outbound_aliases
        alias_topics = conn._outbound_alias_topics
        if out_aliases is None or alias_topics is None:
            out_aliases = conn._outbound_aliases = {}
            alias_topics = conn._outbound_alias_topics = {}
        if caller_alias is not None:
            if not 1 <= caller_alias <= conn.peer_topic_alias_maximum:
                raise LocalProtocolError(f"topic alias {caller_alias} not in 1.."
                                         f"{conn.peer_topic_alias_maximum}")
            if not topic and caller_alias not in alias_topics:
                raise LocalProtocolError(f"topic alias {caller_alias} was never set")
        else:
            alias = out_aliases.get(topic)
            if alias is not None:
                wire_topic = ""
            elif len(out_aliases) < conn.peer_topic_alias_maximum:
                alias = new_alias = len(out_aliases) + 1
    elif caller_alias is not None:
        # [MQTT-3.3.2-9], [MQTT-3.3.2-11] (5.0): the peer's maximum is 0.
        raise LocalProtocolError("the peer accepts no topic aliases")

    data = encode_publish(packet, level, topic=wire_topic, topic_alias=alias)
    if len(data) > conn.peer_maximum_packet_size:
        return b""  # [MQTT-3.1.2-25] (5.0): discarded, as if sent

    if new_alias is not None:
        out_aliases = conn._outbound_aliases
        alias_topics = conn._outbound_alias_topics
        assert out_aliases is not None and alias_topics is not None  # made above
        out_aliases[topic] = new_alias
        alias_topics[new_alias] = topic
    elif caller_alias is not None and topic:
        out_aliases = conn._outbound_aliases
        alias_topics = conn._outbound_alias_topics
        assert out_aliases is not None and alias_topics is not None  # made above
        old = alias_topics.get(caller_alias)
        if old is not None:
            del out_aliases[old]
        out_aliases[topic] = caller_alias
        alias_topics[caller_alias] = topic
    if qos:
        conn._outbound_unacked[packet_id] = (  # type: ignore[index]
            AWAIT_PUBACK if qos == 1 else AWAIT_PUBREC)
    return data
