"""The broker stores a separate uplink process's acknowledged cursor at most once per
`COMMIT_INTERVAL_S` (server/bridge_proc.py): the acknowledgements meanwhile go in one commit,
the stored cursor catches up within the interval, and `flush` does not wait for it."""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_broker.bridge.config import parse_bridges
from edge_broker.server import bridge_proc
from edge_broker.server.bridge_proc import ProcessForwarder
from edge_broker.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "edge.db", durability="fsync", ballast_bytes=0)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def forwarder(store: SqliteStore, commits: list[int]) -> ProcessForwarder:
    (config,) = parse_bridges([{"name": "central", "kind": "jetstream",
                                "servers": ["nats://127.0.0.1:9"], "uplink": ["s/#"],
                                "subject_prefix": "gw", "jetstream_stream": "EDGE",
                                "separate_process": True}],
                              file=None, gateway_id="gw")
    await store.bridges.setup([("central", ("s/#",))])
    side: Any = store.bridges
    real = side.commit_now

    def counted(bridge: str, offset: int, consumed: Any) -> Any:
        commits.append(offset)
        return real(bridge, offset, consumed)

    side.commit_now = counted  # our own store, counted (the commits themselves are real)
    return ProcessForwarder(config, side, path="", gateway_id="gw", store_id="x", cursor=0)


def ack(process: ProcessForwarder, cursor: int) -> None:
    process._handle(("ack", cursor, 0, 0, array("q")))


async def stored(store: SqliteStore) -> int:
    return (await store.bridges.setup([("central", ("s/#",))]))["central"]


async def test_acks_within_the_interval_are_one_commit(store: SqliteStore,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge_proc, "COMMIT_INTERVAL_S", 0.2, raising=False)
    commits: list[int] = []
    process = await forwarder(store, commits)
    try:
        started = time.monotonic()
        for cursor in range(10, 110, 10):  # ten acks, each a window, quicker than 0.2 s
            ack(process, cursor)
            await asyncio.sleep(0.001)
        sending = time.monotonic() - started
        deadline = time.monotonic() + 10
        while await stored(store) < 100:
            assert time.monotonic() < deadline, commits
            await asyncio.sleep(0.01)
        # The first at once, the rest together once the interval passed (before: one
        # commit per ack that arrived while none was under way, here most of the ten).
        if sending >= 0.2:
            pytest.skip("the loop was too slow to send ten acks within the interval")
        assert commits[-1] == 100
        assert len(commits) <= 3, commits
    finally:
        await process.flush()
        process.close()


async def test_flush_stores_the_last_cursor_without_waiting(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge_proc, "COMMIT_INTERVAL_S", 3600.0, raising=False)
    commits: list[int] = []
    process = await forwarder(store, commits)
    try:
        ack(process, 10)
        ack(process, 20)  # waits for the interval: an hour
        await asyncio.wait_for(process.flush(), 10)
        assert await stored(store) == 20
        assert commits[-1] == 20
    finally:
        process.close()
