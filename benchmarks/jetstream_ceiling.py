"""The most one JetStream stream on this machine stores per second with the bridge's frames:
the ceiling S14's JetStream drain is measured against.

A nats-server is started as S14 starts it (`-js -sd DIR`), the real `JetStreamSink` creates
the stream with S14's bridge configuration (stream "S14", subjects `bench.gw.>`, file
storage, `allow_batched`), and then a raw socket sends MESSAGES messages shaped like S14's
backlog (LIVE_DEVICES topics `bench/s11/<n>` and client ids, 100-byte payloads) in exactly
the bytes the uplink sends (bridge/jetstream_frames.py, fast-ingest batches of WINDOW with
DEPTH in flight, bridge/jetstream_batch.py). The frames are built before the clock starts,
so the client does no work per message besides reading the replies: the rate, timed by the
store times nats-server recorded for the stream's first and last message (as S14's drain),
is what the server itself can store with the documented headers, `Nats-Msg-Id`
deduplication and batches on these cores - an upper bound for any uplink here, since the
server's stream takes one message at a time. `--bare` also sends the same subjects without
headers (no `Nats-Msg-Id`: no deduplication), to show what the headers cost the server;
`--parts` also sends them with the `Nats-Msg-Id` header alone, and with the documented
`mqtt-*` headers alone (no deduplication), to split that cost; `--client-us US` also has the
client burn US microseconds of CPU per message (after each window it writes), to show what
an uplink's own work on the same cores costs the server.

    python -m benchmarks.jetstream_ceiling [MESSAGES] [--rounds 3] [--bare] [--parts]
        [--client-us US] [--window 256] [--depth 8]

Printed per run: the store-time rate, the wall-clock rate, and nats-server's CPU time
(utime + stime) per message. S14 calls `ceiling` after its JetStream drain
(`S14.jetstream.ceiling_msgs_per_s`, `drain_vs_ceiling_pct`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import time
import tomllib
from typing import Any

from edge_broker.bridge.base import NATS_MSG_ID, BridgeMessage, message_id, new_store_id
from edge_broker.bridge.config import parse_bridges
from edge_broker.bridge.jetstream import JetStreamSink
from edge_broker.bridge.jetstream_batch import MAX_FLOW, BatchPublisher
from edge_broker.bridge.jetstream_frames import FrameBuilder

from . import brokers
from .bridge_count import stream_span
from .scenarios_bridge import LIVE_DEVICES, TOPIC, bridge_toml, remote

WINDOW = 256  # the forwarder's window (bridge/forward.py) ...
DEPTH = 8  # ... and windows in flight: S14's
PAYLOAD = b"x" * 100  # loadgen's default payload size
# The shape of the sink's own inbox (nats-py's new_inbox: "_INBOX." and a 22-character
# NUID), so that each reply subject has the uplink's length.
INBOX = b"_INBOX.ceiling0123456789abcde."
SEND_TIMEOUT_S = 300.0  # 200,000 messages take about 1 s
_MSG = re.compile(rb"MSG \S+ \d+ (?:\S+ )?(\d+)\r\n")


class CeilingError(RuntimeError):
    """The server refused a batch: the figure would not be a ceiling."""


def _messages(total: int) -> list[BridgeMessage]:
    start = time.time()
    return [BridgeMessage(offset=i, topic=f"{TOPIC}/{i % LIVE_DEVICES}", payload=PAYLOAD,
                          qos=1, publish_time=start + i * 5e-6,
                          client_id=f"bench-s11-{i % LIVE_DEVICES}")
            for i in range(1, total + 1)]


# What the messages carry: the bridge's own frames, or the same subjects and payloads with
# no headers, with `Nats-Msg-Id` alone, or with the documented mqtt-* headers alone.
SHAPES = {"bridge": "bridge frames", "none": "no headers", "id": "Nats-Msg-Id alone",
          "mqtt": "mqtt-* headers alone"}


def _header_block(message: BridgeMessage, mid: str, shape: str) -> bytes:
    """The NATS header block of `shape` ("id", "mqtt"): nats-py's encoding of the documented
    headers (bridge/base.py), all of them but the id, or the id alone."""
    headers = message.headers(mid, NATS_MSG_ID)
    kept = [(k, v) for k, v in headers.items() if (k == NATS_MSG_ID) == (shape == "id")]
    return b"NATS/1.0\r\n" + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                                       for k, v in kept) + b"\r\n"


def _plain(batch: list[BridgeMessage], sink: JetStreamSink, reply: bytes,
           shape: str) -> bytes:
    """`batch` as one fast-ingest batch with the headers of `shape` (same subjects, reply
    subjects, EOB as BatchPublisher.frames)."""
    out = []
    for seq, m in enumerate(batch, 1):
        subject = sink.subject(m).encode()
        op = 0 if seq == 1 else 1
        if shape == "none":
            out.append(b"PUB %s %s%d.%d.$FI %d\r\n%s\r\n" % (subject, reply, seq, op,
                                                             len(m.payload), m.payload))
            continue
        block = _header_block(m, message_id("bench", sink.store_id, m.offset), shape)
        out.append(b"HPUB %s %s%d.%d.$FI %d %d\r\n%s%s\r\n" % (
            subject, reply, seq, op, len(block), len(block) + len(m.payload), block,
            m.payload))
    out.append(b"PUB bench.gw.eob %s%d.3.$FI 0\r\n\r\n" % (reply, len(batch) + 1))
    return b"".join(out)


async def _frames(address: str, total: int, window: int, shape: str) -> list[bytes]:
    """Create stream S14 through the real sink and build the windows' bytes."""
    gateway_id = socket.gethostname()  # S14's: the broker's default
    (config,) = parse_bridges(tomllib.loads(bridge_toml("jetstream", address))["bridges"],
                              file="ceiling.toml", gateway_id=gateway_id)
    sink = JetStreamSink(config, gateway_id=gateway_id, store_id=new_store_id())
    await sink.start()
    try:
        if not sink.batched:
            raise CeilingError("the stream does not take fast-ingest batches")
        builder = FrameBuilder(gateway_id, sink.store_id, sink.subject)
        publisher = BatchPublisher(INBOX, CeilingError)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        messages = _messages(total)
        windows = []
        for n, start in enumerate(range(0, total, window)):
            batch = messages[start:start + window]
            if shape == "bridge":
                data, _ = publisher.frames(batch, builder, "bench.gw.eob", future)
            else:
                reply = b"%sbare%d.%d.fail." % (INBOX, n, min(len(batch), MAX_FLOW))
                data = _plain(batch, sink, reply, shape)
            windows.append(data)
        return windows
    finally:
        await sink.close()


async def _send(address: str, windows: list[bytes], depth: int, busy_s: float = 0.0) -> None:
    """Write the windows, at most `depth` without their batch's final PubAck; raise
    CeilingError on an error reply, a status or the connection closed. `busy_s`: CPU time
    spent after writing each window (a client's own work on the same cores)."""
    host, port = address.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                     b'"no_responders":true,"protocol":1}\r\nSUB ' + INBOX + b"> 1\r\nPING\r\n")
        await reader.readuntil(b"PONG\r\n")
        sent = done = 0
        buf = b""
        while done < len(windows):
            while sent < len(windows) and sent - done < depth:
                writer.write(windows[sent])
                sent += 1
                if busy_s:
                    until = time.perf_counter() + busy_s
                    while time.perf_counter() < until:
                        pass  # CPU, not a wait: it takes a core from the server
            data = await reader.read(1 << 16)
            if not data:
                raise CeilingError(f"the server closed the connection, {done} batches done")
            buf += data
            while (line_end := buf.find(b"\r\n")) >= 0:
                match = _MSG.match(buf)
                if match is None:  # a control line: INFO (sent again after CONNECT), PING
                    if buf.startswith((b"-ERR", b"HMSG")):  # HMSG: a status (503: no stream)
                        raise CeilingError(buf[:line_end].decode(errors="replace"))
                    if buf.startswith(b"PING"):
                        writer.write(b"PONG\r\n")
                    buf = buf[line_end + 2:]
                    continue
                end = match.end() + int(match.group(1))
                if len(buf) < end + 2:
                    break
                body = buf[match.end():end]
                buf = buf[end + 2:]
                if b'"error"' in body:
                    raise CeilingError(body.decode(errors="replace"))
                if b'"batch"' in body:
                    done += 1
    finally:
        writer.close()


def ceiling(total: int = 200_000, *, shape: str = "bridge", window: int = WINDOW,
            depth: int = DEPTH, client_us: float = 0.0) -> dict[str, Any]:
    """Start a nats-server, store `total` messages as described in the module docstring,
    stop it; the figures. `shape`: a key of SHAPES; `client_us`: CPU the client spends per
    message (0: none)."""
    with remote("jetstream") as server:
        windows = asyncio.run(_frames(server.address, total, window, shape))
        assert server.proc is not None
        pid = server.proc.pid
        c0, t0 = brokers.cpu_ticks(pid), time.monotonic()
        busy_s = client_us * 1e-6 * window
        asyncio.run(asyncio.wait_for(_send(server.address, windows, depth, busy_s),
                                     SEND_TIMEOUT_S))
        t1, c1 = time.monotonic(), brokers.cpu_ticks(pid)
        stored, first_ts, last_ts = stream_span(server.address)
    if stored != total:
        raise CeilingError(f"{stored} of {total} stored")
    return {"msgs_per_s": round((stored - 1) / (last_ts - first_ts)),
            "wall_msgs_per_s": round(total / (t1 - t0)),
            "server_us_per_msg": round((c1 - c0) / brokers.CLK_TCK / total * 1e6, 2),
            "shape": shape, "window": window, "depth": depth, "messages": total,
            "client_us": client_us}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jetstream_ceiling")
    parser.add_argument("messages", type=int, nargs="?", default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare", action="store_true",
                        help="also without headers, alternating")
    parser.add_argument("--parts", action="store_true",
                        help="also with Nats-Msg-Id alone and with the mqtt-* headers alone "
                        "(and without headers), alternating")
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--client-us", type=float, default=0.0,
                        help="also with the client spending this much CPU per message "
                        "(as the uplink process does), alternating")
    args = parser.parse_args(argv)
    modes = [("bridge", 0.0)]
    if args.bare or args.parts:
        modes.append(("none", 0.0))
    if args.parts:
        modes += [("id", 0.0), ("mqtt", 0.0)]
    if args.client_us:
        modes.append(("bridge", args.client_us))
    for _ in range(args.rounds):
        for shape, client_us in modes:
            r = ceiling(args.messages, shape=shape, window=args.window, depth=args.depth,
                        client_us=client_us)
            name = SHAPES[shape] + (
                f", client {client_us:g} us/msg" if client_us else "")
            print(f"{name:32s} {r['msgs_per_s']:9,d} msgs/s by store times, "
                  f"{r['wall_msgs_per_s']:9,d} wall; nats-server {r['server_us_per_msg']:5.2f}"
                  f" us/msg (window {r['window']}, depth {r['depth']}, {r['messages']:,d} "
                  "messages)", flush=True)

if __name__ == "__main__":
    main()
