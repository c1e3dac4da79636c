"""The outage proxy itself: forwards, blackholes silently, cuts."""

from __future__ import annotations

import asyncio

from tests.bridge.proxy import TcpProxy


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_forward_blackhole_cut() -> None:
    server = await echo_server()
    proxy = await TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1]).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"

        proxy.blackhole()
        writer.write(b"lost")
        await writer.drain()
        # Silence: no data and no close within a short wait (the peer cannot tell).
        read = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({read}, timeout=0.3)
        assert not done
        read.cancel()
        # New connections are accepted and blackholed too.
        _r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        w2.write(b"x")
        proxy.cut()
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # cut: the peer sees EOF
        w2.close()

        proxy.forward()
        r3, w3 = await asyncio.open_connection("127.0.0.1", proxy.port)
        w3.write(b"back")
        assert await asyncio.wait_for(r3.readexactly(4), 5) == b"back"
        w3.close()
    finally:
        await proxy.close()
        server.close()
