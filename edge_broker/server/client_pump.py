"""Encoding what a connection pulled from the core (`ClientHandler.pump`, server/client.py):
a function on a `ClientHandler`, as server/client_close.py and client_guard.py.

Each pulled item becomes its bytes through the connection, which checks it against the
negotiated limits: a plain QoS 1 PUBLISH (`PlainQos1`, the QoS 1 hot path) without building a
`Publish`; a QoS 0 PUBLISH the core shares between subscribers from the shared encodings of
its protocol level (encoded once for all of them); the rest with `Connection.send`. With an
ACL, a delivery this client may not read is not sent, and a QoS 1/2 one counts as done in the
core (as mosquitto drops it). A PUBLISH too large for the peer is discarded as if sent
[MQTT-3.1.2-25] (5.0). A packet that cannot be encoded closes this connection only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from ..core.outbound import PlainQos1
from ..core.replay import EncodedPublish
from ..mqtt.codec import encode_publish
from ..mqtt.errors import LocalProtocolError
from ..mqtt.packets import Publish, PubRel
from ..mqtt.publishing import send_plain_qos1
from ..mqtt.types import ProtocolLevel
from . import client_guard as guard
from .gate import READ

if TYPE_CHECKING:
    from .client import ClientHandler

log = logging.getLogger("edge_broker.client")

ENCODING_CACHE_SIZE: Final = 1024  # shared QoS 0 encodings kept per protocol level


def encode_pulled(handler: ClientHandler,
                  packets: list[Publish | PubRel | EncodedPublish | PlainQos1]) -> bytes | None:
    """The bytes to write for `packets`, or None when the connection was closed (a packet
    that cannot be sent)."""
    app = handler.app
    core = app.core
    client_id = handler.client_id
    assert client_id is not None
    conn = handler._conn
    level = conn.protocol_level or ProtocolLevel.MQTT_5
    # QoS 0 packets the core shares between subscribers are encoded once per level.
    shared = app.qos0_encodings[level] if conn.shares_publish_encoding() else None
    # What Connection.send_encoded_qos0_publish checks, once per pump: the connection
    # stays CONNECTED while the shared encodings are used (shares_publish_encoding).
    max_size = conn.peer_maximum_packet_size
    checked = app.gate.acl is not None
    chunks = []
    for packet in packets:
        try:
            if isinstance(packet, tuple):  # a plain QoS 1 PUBLISH (core/outbound.py)
                topic, payload, retain, dup, packet_id = packet
                if checked and not guard.allowed(handler, topic, READ):
                    app.metrics.acl_denied["delivery"] += 1
                    core.discard(client_id, packet_id)  # as below
                    continue
                data = send_plain_qos1(conn, topic, payload, retain, dup, packet_id)
                if data is None:  # not the hot path: a Publish, checked in full
                    data = conn.send(Publish(topic, payload, 1, retain, dup, packet_id))
                if not data:
                    core.discard(client_id, packet_id)
                chunks.append(data)
                continue
            if isinstance(packet, EncodedPublish):  # stream history (core/replay.py)
                if shared is not None and not checked:
                    chunks.append(conn.send_encoded_qos0_publish(packet.data))
                    continue
                packet = packet.as_publish()
            if checked and isinstance(packet, Publish) and not guard.allowed(
                    handler, packet.topic, READ):
                # The ACL does not let this client read it: not sent; a QoS 1/2
                # delivery counts as done (as mosquitto drops it).
                app.metrics.acl_denied["delivery"] += 1
                if packet.packet_id is not None:
                    core.discard(client_id, packet.packet_id)
                continue
            if shared is not None and isinstance(packet, Publish) and not packet.qos:
                cached = shared.get(id(packet))
                if cached is None or cached[0] is not packet:
                    if len(shared) >= ENCODING_CACHE_SIZE:
                        shared.clear()
                    cached = shared[id(packet)] = (packet, encode_publish(packet, level))
                data = cached[1]
                if len(data) > max_size:
                    data = b""  # too large for the peer: as if sent [MQTT-3.1.2-25] (5.0)
            else:
                data = conn.send(packet)
        except LocalProtocolError as error:
            handler._cannot_send(error)
            return None
        except Exception:
            log.exception("internal error encoding a message for %s (%s); closing it",
                          client_id, handler.peer)
            handler._shut()
            return None
        if not data and isinstance(packet, Publish) and packet.packet_id is not None:
            core.discard(client_id, packet.packet_id)
        chunks.append(data)
    return b"".join(chunks)
