"""Small pieces of the MQTT upstream bridge (bridge/mqtt_upstream.py): where a server URL
points, the interval left of a message's expiry, and mosquitto's bridge marker on a CONNECT.
"""

from __future__ import annotations

import math
from typing import Final
from urllib.parse import urlsplit

BRIDGE_LEVEL_BIT: Final = 0x80  # mosquitto's try_private marker on the protocol level byte


def remaining(expires_at: float, now: float) -> int:
    """The Message Expiry Interval to send on: the received one less the time waited here,
    at least 1 (an interval of 0 is not sent: expired) [MQTT-3.3.2-6] (5.0)."""
    return max(1, math.ceil(expires_at - now))


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
