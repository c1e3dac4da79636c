"""Pieces of the MQTT upstream bridge (bridge/mqtt_upstream.py) that hold no connection
state: where a server URL points, the bridge's CONNECT and its handshake (with mosquitto's
bridge marker), and the properties a log message is published with.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final
from urllib.parse import urlsplit

from edge_broker.errors import BridgeError
from edge_broker.mqtt.connection import Connection
from edge_broker.mqtt.packets import ConnAck, Connect, Packet, Will
from edge_broker.mqtt.properties import Properties, expiry_left
from edge_broker.mqtt.types import ProtocolLevel, Role

from .base import BridgeMessage
from .config import BridgeConfig

BRIDGE_LEVEL_BIT: Final = 0x80  # mosquitto's try_private marker on the protocol level byte


def properties(message: BridgeMessage, now: float) -> Properties:
    """A log message's MQTT 5 properties as published upstream, unaltered but for the
    expiry interval left [MQTT-3.3.2-4] [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-20]
    (5.0)."""
    expires_at = message.expires_at
    return Properties(
        payload_format_indicator=1 if message.payload_utf8 else None,
        message_expiry_interval=None if expires_at is None else expiry_left(expires_at, now),
        content_type=message.content_type, response_topic=message.response_topic,
        correlation_data=message.correlation_data, user_properties=message.user_properties)


def address(server: str, tls_forced: bool) -> tuple[str, int, bool]:
    """(host, port, TLS) of `mqtt://host:port` or `mqtts://host:port`."""
    parts = urlsplit(server)
    secure = parts.scheme == "mqtts" or tls_forced
    host = parts.hostname or "127.0.0.1"
    return host, parts.port or (8883 if secure else 1883), secure


def mark_bridge(data: bytearray) -> None:
    """Set mosquitto's bridge bit on the protocol level byte of an encoded CONNECT."""
    index = 1
    while data[index] & 0x80:  # the remaining length varint
        index += 1
    index += 1 + 2 + 4  # after the varint: protocol name length (2) and "MQTT" (4)
    data[index] |= BRIDGE_LEVEL_BIT


def connect_packet(config: BridgeConfig, level: ProtocolLevel) -> Connect:
    """Clean start false (with the session expiry on 5.0), the remote state topic's "0" as
    the will, retained."""
    opts = config.mqtt
    assert opts is not None
    will = None
    if opts.notification_topic:
        will = Will(opts.notification_topic, b"0", qos=1, retain=True)
    props = Properties(session_expiry_interval=opts.session_expiry_s,
                       receive_maximum=65535) if level == ProtocolLevel.MQTT_5 else Properties()
    return Connect(client_id=opts.client_id, protocol_level=level, clean_start=False,
                   keep_alive=opts.keepalive_s, username=config.username,
                   password=None if config.password is None else config.password.encode(),
                   will=will, properties=props)


async def handshake(server: str, host: str, port: int, context: ssl.SSLContext | None,
                    server_hostname: str | None, connect: Connect, private: bool
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Connection,
                               ConnAck, list[Packet]]:
    """Connect, send CONNECT (with the bridge marker when `private`) and read up to its
    CONNACK: the connection, and the packets that came right behind the CONNACK. A refusal
    raises BridgeError, and the connection is closed."""
    reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                   server_hostname=server_hostname)
    conn = Connection(Role.CLIENT, protocol_level=connect.protocol_level)
    try:
        data = bytearray(conn.send(connect))
        if private:
            mark_bridge(data)
        writer.write(data)
        await writer.drain()
        connack: ConnAck | None = None
        early: list[Packet] = []  # e.g. downlink messages queued in the session
        while connack is None:
            chunk = await reader.read(65536)
            if not chunk:
                raise BridgeError(f"{server} closed the connection after CONNECT")
            for packet in conn.receive_packets(chunk):
                if isinstance(packet, ConnAck):
                    connack = packet
                elif connack is not None:
                    early.append(packet)
        if connack.reason_code >= 0x80:
            raise BridgeError(f"{server} refused the connection: reason code "
                              f"0x{connack.reason_code:02X}")
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer, conn, connack, early
