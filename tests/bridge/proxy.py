"""A TCP proxy for outage tests, running in the test's event loop on a free loopback port.

Modes, switched at any time:

- `forward()`: new connections are relayed to the target both ways (the default).
- `blackhole()`: every connection, open or new, is accepted and everything it sends is read
  and dropped silently, both ways: no FIN, no RST, no reply, as when a link dies mid-route.
  The peers only notice through their own timeouts. A connection stays blackholed until a
  peer closes it, so after `forward()` the client must reconnect (as it would in reality
  once its keep-alive or ack timeout fired).
- `cut()`: close every open connection now (the peers see the close); the mode is kept.
- `refuse()`: new connections are closed at once, as by a port nothing listens on (the open
  ones are kept: `cut()` them too for a remote that is down).
- `drop_to_target()`: on the open connections, what the client sends is dropped silently
  while what the target sends still reaches the client (a client's acknowledgements lost on
  the way). A close by either side still closes both.
- `hold_replies()`: on the open connections, what the target sends is kept in the proxy
  (the client's sends still reach the target: a remote side that stored them, its
  acknowledgements late); `release()` delivers it and forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib

HOST = "127.0.0.1"


class _Pair:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter | None):
        self.client = client
        self.upstream = upstream
        self.blackholed = upstream is None
        self.drop_to_target = False
        self.held: list[bytes] | None = None  # what the target sent, while held
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self.port = 0
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def forward(self) -> None:
        self.mode = "forward"

    def refuse(self) -> None:
        self.mode = "refuse"

    def blackhole(self) -> None:
        self.mode = "blackhole"
        for pair in self._pairs:
            pair.blackholed = True

    def drop_to_target(self) -> None:
        for pair in self._pairs:
            pair.drop_to_target = True

    def hold_replies(self) -> None:
        for pair in self._pairs:
            pair.held = []

    def release(self) -> None:
        for pair in self._pairs:
            held, pair.held = pair.held, None
            if held:
                pair.client.write(b"".join(held))

    def cut(self) -> None:
        for pair in list(self._pairs):
            pair.close()
        self._pairs.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self.mode == "refuse":
            writer.transport.abort()
            return
        upstream_reader: asyncio.StreamReader | None = None
        upstream_writer: asyncio.StreamWriter | None = None
        if self.mode == "forward":
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()  # target down: refuse like a closed port would
                return
        pair = _Pair(writer, upstream_writer)
        self._pairs.add(pair)
        pair.tasks.append(asyncio.ensure_future(self._pump(reader, upstream_writer, pair)))
        if upstream_reader is not None:
            pair.tasks.append(asyncio.ensure_future(self._pump(upstream_reader, writer, pair)))

    async def _pump(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter | None, pair: _Pair) -> None:
        try:
            while data := await reader.read(65536):
                if pair.blackholed or writer is None or (pair.drop_to_target
                                                         and writer is pair.upstream):
                    continue  # dropped silently
                if pair.held is not None and writer is pair.client:
                    pair.held.append(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if not pair.blackholed:
                pair.close()
                self._pairs.discard(pair)
