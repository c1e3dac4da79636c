"""Which upstream address an MQTT bridge connects to, and its way back to the first one
(mosquitto's `round_robin`).

`round_robin = false` (the default, as mosquitto's): the first address of `servers` is the
main one. Every connection attempt starts there and tries the others in turn. While
connected to another one, the bridge checks every `primary_retry` seconds whether the first
accepts a TCP connection (as mosquitto does: a TCP connect, closed at once). Once it does,
the bridge moves back: between two windows, never in the middle of one, the connection is
closed normally (the remote state topic set to "0" there) and the next attempt starts at the
first address. A move that does not end there (the address takes TCP connections but
refuses the bridge) doubles the check's interval, up to 64 times `primary_retry`, so a
misconfigured main address does not make the bridge hop every few seconds; connecting to the
first address sets it back.

`round_robin = true`: the addresses are equals. After a connection ends, the next attempt
starts at the address after it, and the bridge stays where it got in until that fails.

One `ServerChoice` lives as long as the bridge: each connection object (bridge/
mqtt_upstream.py) hands it to the next (`resume_from`).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["ServerChoice", "answers"]

_MAX_FACTOR = 64


class ServerChoice:
    def __init__(self, servers: tuple[str, ...], *, round_robin: bool,
                 primary_retry_s: float) -> None:
        self.servers = servers
        self.round_robin = round_robin
        self.primary_retry_s = primary_retry_s
        self.interval = primary_retry_s
        """Seconds between two checks of the first address now."""
        self.current: int | None = None
        """The index of the address of the last connection made."""
        self.moving_back = False
        """The last connection was closed to move back to the first address."""

    def order(self) -> list[int]:
        """The indexes of `servers` in the order the next connection tries them."""
        count = len(self.servers)
        start = 0
        if self.round_robin and self.current is not None:
            start = (self.current + 1) % count
        return [(start + step) % count for step in range(count)]

    def connected(self, index: int) -> None:
        if index == 0:
            self.interval = self.primary_retry_s
        elif self.moving_back:  # the first address took TCP but not the bridge
            self.interval = min(self.interval * 2, self.primary_retry_s * _MAX_FACTOR)
        self.moving_back = False
        self.current = index

    @property
    def checks_first(self) -> bool:
        """Whether the connection just made watches for the first address to come back."""
        return not self.round_robin and self.current not in (None, 0)


async def answers(host: str, port: int, timeout: float) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout` (closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.transport.abort()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
