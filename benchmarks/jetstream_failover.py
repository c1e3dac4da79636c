"""How long the JetStream uplink stops when the stream's leader node dies (issue 9, "Scale
out"): not a test (tests/bridge/test_gateway_cluster.py asserts nothing is lost), a timing.

Three local nats-server processes (tests/bridge/servers.py), an R3 stream, a `Forwarder`
over an in-memory log (tests/bridge/memlog.py) into a `JetStreamSink` connected first to the
leader (`--via leader`) or to a follower (`--via follower`). 2,000 messages are forwarded,
the leader is SIGKILLed, 2,000 more are appended; printed: the seconds from the kill until
they are all acknowledged, and the failures the forwarder went through.
`--election` instead times a plain nats-py client publishing until the new leader answers.

    python -m benchmarks.jetstream_failover --via leader
    python -m benchmarks.jetstream_failover --via follower
    python -m benchmarks.jetstream_failover --election
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js import api

import edge_broker.bridge.jetstream as jetstream
from edge_broker.bridge.base import Backoff
from edge_broker.bridge.config import BridgeConfig
from edge_broker.bridge.forward import Forwarder
from tests.bridge.memlog import MemoryLog
from tests.bridge.servers import NatsServer, nats_cluster, running
from tests.bridge.test_jetstream import bridge_config


async def _stream(nodes: list[NatsServer]) -> NatsServer:
    """Create the R3 stream (retrying while the cluster forms); its leader node."""
    nc = await nats.connect([n.url for n in nodes])
    try:
        js = nc.jetstream(timeout=1)
        deadline = time.monotonic() + 60
        while True:
            try:
                await js.add_stream(api.StreamConfig(name="EDGE", subjects=["site1.gw7.>"],
                                                     num_replicas=3))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)  # polling interval while the cluster forms
        info = await js.stream_info("EDGE")
    finally:
        await nc.close()
    assert info.cluster is not None
    return next(n for n in nodes if n.server_name == info.cluster.leader)


async def failover(root: Path, via: str) -> None:
    nodes = nats_cluster(root, 3)
    with running(*nodes):
        leader = await _stream(nodes)
        first = leader if via == "leader" else next(n for n in nodes if n is not leader)
        config = dataclasses.replace(
            bridge_config(first.url),
            servers=(first.url, *(n.url for n in nodes if n is not first)))
        plain = jetstream.connect_options

        def in_order(config: BridgeConfig) -> dict[str, Any]:
            # Connect to `first` (nats-py shuffles the servers otherwise).
            return {**plain(config), "dont_randomize": True}

        jetstream.connect_options = in_order
        log = MemoryLog()
        forwarder = Forwarder(
            lambda: jetstream.JetStreamSink(config, gateway_id="gw7", store_id="5eed"),
            log, cursor=0, window=256, backoff=Backoff(1.0, 60.0), name="central")
        task = asyncio.ensure_future(forwarder.run())
        try:
            for i in range(2000):
                log.append(f"sensors/t{i % 4}", b"%d" % i)
            while log.committed < 2000:
                await asyncio.sleep(0.01)
            leader.kill()
            killed = time.monotonic()
            for i in range(2000, 4000):
                log.append(f"sensors/t{i % 4}", b"%d" % i)
            while log.committed < 4000:
                await asyncio.sleep(0.01)
            print(f"via {via}: all acknowledged {time.monotonic() - killed:.1f} s after the "
                  f"kill; {forwarder.status.failures} failures, last: "
                  f"{forwarder.status.last_error}")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            jetstream.connect_options = plain


async def election(root: Path) -> None:
    nodes = nats_cluster(root, 3)
    with running(*nodes):
        leader = await _stream(nodes)
        nc = await nats.connect([n.url for n in nodes if n is not leader])
        try:
            js = nc.jetstream(timeout=0.5)
            leader.kill()
            killed = time.monotonic()
            while True:
                try:
                    await js.publish("site1.gw7.x", b"1")
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            print(f"a new leader answered {time.monotonic() - killed:.1f} s after the kill")
        finally:
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--via", choices=("leader", "follower"), default="leader")
    parser.add_argument("--election", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(election(Path(tmp)) if args.election else failover(Path(tmp), args.via))


if __name__ == "__main__":
    main()
