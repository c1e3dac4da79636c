"""Scale out: a 3-node JetStream cluster with an R3 stream; the stream leader is killed while
the bridge forwards. Nothing is lost, nothing stored twice, forwarding goes on to the new
leader."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

import nats

from edge_broker.bridge.base import Backoff
from edge_broker.bridge.forward import Forwarder
from edge_broker.bridge.jetstream import JetStreamSink
from tests.bridge.memlog import MemoryLog
from tests.bridge.servers import nats_cluster, running
from tests.bridge.test_jetstream import bridge_config, offsets, stored


async def until(predicate: Callable[[], bool], what: object, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.02)


async def test_leader_killed_during_forwarding_loses_nothing(tmp_path: Path) -> None:
    nodes = nats_cluster(tmp_path, 3)
    with running(*nodes):
        urls = [node.url for node in nodes]
        table = bridge_config(urls[0], stream_replicas=3)
        config = type(table)(**{**{f: getattr(table, f) for f in table.__slots__},
                                "servers": tuple(urls)})
        log = MemoryLog()
        forwarder = Forwarder(
            lambda: JetStreamSink(config, gateway_id="gw7", store_id="5eed", ack_timeout=2.0),
            log, cursor=0, window=256, backoff=Backoff(0.1, 1.0), name="central")
        task = asyncio.ensure_future(forwarder.run())
        try:
            for i in range(200):
                log.append(f"sensors/t{i % 4}", b"%d" % i)
            await until(lambda: log.committed == 200, forwarder.status)  # cluster formed

            nc = await nats.connect(urls)
            try:
                info = await nc.jetstream().stream_info("EDGE")
            finally:
                await nc.close()
            assert info.config.num_replicas == 3
            assert info.config.allow_batched  # the windows go as batches to an R3 stream
            leader = next(n for n in nodes if n.server_name == info.cluster.leader)
            for i in range(200, 8200):
                log.append(f"sensors/t{i % 4}", b"%d" % i)
            await until(lambda: log.committed >= 700, forwarder.status)
            leader.kill()  # SIGKILL the stream leader in the middle of the backlog
            assert log.committed < 8200, "forwarding finished before the kill"
            for i in range(8200, 9000):
                log.append(f"sensors/t{i % 4}", b"%d" % i)
            await until(lambda: log.committed == 9000, forwarder.status)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        survivor = next(n for n in nodes if n.running)
        msgs = await stored(survivor.url)
    assert offsets(msgs) == list(range(1, 9001))
