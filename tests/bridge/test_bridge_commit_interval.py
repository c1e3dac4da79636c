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
from edge_broker.errors import StoreError
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


async def test_store_acked_queues_the_write_ahead_of_the_next(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`store_acked` (before a drop or a store budget step, server/bridges.py) queues the
    write of the acknowledged cursor at once: a write queued after it finds it stored."""
    monkeypatch.setattr(bridge_proc, "COMMIT_INTERVAL_S", 3600.0, raising=False)
    commits: list[int] = []
    process = await forwarder(store, commits)
    try:
        ack(process, 10)  # the first at once
        await asyncio.wait_for(process.flush(), 10)
        process._hurry = False  # (flush set it: back to the interval)
        ack(process, 20)
        ack(process, 30)  # an hour away
        process.store_acked()
        await store.bridges.drop("central", 1 << 30)  # queued after it: it ran first
        reader = store.bridges.reader("central")
        assert reader is not None and reader.offset == 30
        assert commits == [10, 30]
    finally:
        await process.flush()
        process.close()


async def test_a_failed_write_keeps_its_rows_for_the_next(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cursor write that fails leaves its rows counted as acknowledged and not stored
    (`unstored`), and the next write stores them."""
    monkeypatch.setattr(bridge_proc, "COMMIT_INTERVAL_S", 3600.0, raising=False)
    process = await forwarder(store, [])
    side: Any = store.bridges
    real = side.commit_now
    failures = [StoreError("disk I/O error")]

    def failing_once(bridge: str, offset: int, consumed: Any) -> Any:
        if failures:
            error = failures.pop()

            async def fail() -> None:
                raise error

            return fail()
        return real(bridge, offset, consumed)

    side.commit_now = failing_once
    try:
        process._handle(("ack", 10, 2, 100, array("q", [9, 60, 10, 40])))
        await asyncio.wait_for(process.flush(), 10)
        assert process.unstored == (2, 100)
        assert await stored(store) == 0
        process._handle(("ack", 11, 1, 50, array("q", [11, 50])))
        await asyncio.wait_for(process.flush(), 10)
        assert process.unstored == (0, 0)
        assert await stored(store) == 11
    finally:
        process.close()
