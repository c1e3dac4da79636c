"""CPU per message of a JetStream uplink, one PubAck per message against fast-ingest batches
(bridge/jetstream_batch.py): nats-server's and the publishing process's.

One nats-server with JetStream on a file store (`-js -sd DIR`, as the benchmarks use), a
stream created by this script with or without `allow_batched`, and the real `JetStreamSink`
in this process forwarding MESSAGES pre-built messages (the bridge's header set: topic,
QoS, client id, publish time, message id) in windows of WINDOW with DEPTH windows in flight
(as the forwarder's pipeline). Printed per mode: msgs/s, nats-server CPU (utime + stime from
/proc) and this process's CPU per message, and what the stream holds. Modes alternate
(`--rounds`), each on a fresh server.

    python -m benchmarks.jetstream_batch_cpu [MESSAGES] [--window 256] [--depth 8]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats
from nats.js import api

from edge_broker.bridge.base import BridgeMessage
from edge_broker.bridge.config import parse_bridges
from edge_broker.bridge.jetstream import JetStreamSink
from tests.bridge.servers import NatsServer

from .brokers import CLK_TCK


def _cpu(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def _one(batched: bool, total: int, window: int, depth: int) -> str:
    with tempfile.TemporaryDirectory(prefix="js-batch-cpu-") as tmp:
        server = NatsServer(Path(tmp))
        server.start()
        try:
            nc = await nats.connect(server.url)
            await nc.jetstream().add_stream(api.StreamConfig(
                name="EDGE", subjects=["site1.gw7.>"], storage=api.StorageType.FILE,
                duplicate_window=120.0, allow_batched=batched or None))
            (config,) = parse_bridges([{
                "name": "central", "kind": "jetstream", "servers": [server.url],
                "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE"}],
                file="bench.toml", gateway_id="gw7")
            sink = JetStreamSink(config, gateway_id="gw7", store_id="5eed0000000000a1",
                                 ack_timeout=60.0)
            await sink.start()
            assert sink.batched == batched
            now = time.time()
            msgs = [BridgeMessage(offset=i, topic=f"bench/s11/{i % 4}", payload=b"x" * 64,
                                  qos=1, publish_time=now + i // 1000, client_id=f"dev{i % 4}")
                    for i in range(1, total + 1)]
            assert server.proc is not None
            s0, c0, t0 = _cpu(server.proc.pid), time.process_time(), time.monotonic()
            inflight: list[asyncio.Future[int]] = []
            done = 0
            for start in range(0, total, window):
                if len(inflight) >= depth:
                    done += await inflight.pop(0)
                inflight.append(await sink.submit(msgs[start:start + window]))
            for future in inflight:
                done += await future
            t1, c1, s1 = time.monotonic(), time.process_time(), _cpu(server.proc.pid)
            await sink.close()
            stored = (await nc.jetstream().stream_info("EDGE")).state.messages
            await nc.close()
        finally:
            server.stop()
    name = "batches" if batched else "per-message"
    return (f"{name:11s} {total / (t1 - t0):9,.0f} msgs/s  nats-server "
            f"{(s1 - s0) / total * 1e6:5.2f} us/msg  publisher {(c1 - c0) / total * 1e6:5.2f}"
            f" us/msg  confirmed {done} stored {stored}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jetstream_batch_cpu")
    parser.add_argument("messages", type=int, nargs="?", default=200_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for _ in range(args.rounds):
        for batched in (False, True):
            print(asyncio.run(_one(batched, args.messages, args.window, args.depth)),
                  flush=True)


if __name__ == "__main__":
    main()
