"""A step of the store budget (store/log/budget.py, tier 2) skipping rows the bridge's uplink
has in flight, in the broker (server/bridge_log.py `StoreLogReader`): the rows acknowledged
while the step ran count as forwarded, not also as dropped; a window failing after the step
gives its skipped rows up, counted as dropped then. Both found by the review of round 11.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from edge_broker.bridge.base import BridgeMessage
from edge_broker.bridge.config import BridgeConfig, parse_bridges
from edge_broker.bridge.forward import Forwarder
from edge_broker.server.bridge_log import StoreLogReader
from edge_broker.server.bridges import Bridge
from edge_broker.store.sqlite import SqliteStore
from tests.bridge.test_bridge_commit_interval import _logged, store

__all__ = ["store"]  # the fixture


def config() -> BridgeConfig:
    (bridge,) = parse_bridges([{"name": "central", "kind": "jetstream",
                                "servers": ["nats://127.0.0.1:9"], "uplink": ["s/#"],
                                "subject_prefix": "gw", "jetstream_stream": "EDGE"}],
                              file=None, gateway_id="gw")
    return bridge


async def _step(store: SqliteStore, sizes: dict[int, int], rows: int,
                settle: Any = None) -> tuple[int, int, int]:
    """The budget's step, sized to skip the `rows` oldest: (after, through, count); settled
    by `settle(after, through, count)` as soon as it returns, as server/streams.py
    `_give_way` does (no loop turn in between)."""
    excess = sum(sizes[o] for o in range(1, rows + 1))
    ((_, through, count, _, after),) = await store.give_way_backlogs(["bridge:central"], excess)
    if settle is not None:
        settle(after, through, count)
    return after, through, count


async def test_rows_acknowledged_during_the_step_count_as_forwarded_only(
        store: SqliteStore) -> None:
    """Before: the step's result came back one job of the store's thread late, after the
    write of the acknowledged rows 1-4, so the broker counted them dropped (4) while the
    store took them out of its count."""
    sizes = await _logged(store, 10)
    counted: list[int] = []
    reader = StoreLogReader(store.bridges, "central", "own", dropped=counted.append)
    try:
        assert len(await reader.read_after(0, 10)) == 10  # all sent, none acknowledged
        step = asyncio.ensure_future(_step(store, sizes, 6, reader.skipped))
        await asyncio.sleep(0)  # the step is queued on the store's thread ...
        await reader.commit_cursor(4)  # ... and then the write of the acknowledged 1-4
        assert await step == (0, 6, 6)
        await reader.flush()
        stored = store.bridges.reader("central")
        assert stored is not None
        # 1-4 forwarded; 5-6 still in flight: dropped neither here nor in the store's count
        # but for those two (the store counts them until they are acknowledged).
        assert (sum(counted), stored.dropped) == (0, 2)
    finally:
        reader.close()


class _Sink:
    """A pipelined sink whose windows the test answers."""

    def __init__(self, windows: asyncio.Queue[tuple[list[int], asyncio.Future[int]]]) -> None:
        self.windows = windows

    async def start(self) -> None:
        pass

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        acks: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.windows.put_nowait(([m.offset for m in batch], acks))
        return acks

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        raise AssertionError("pipelined: submit only")

    async def close(self) -> None:
        pass


async def test_a_window_failing_after_the_step_gives_its_skipped_rows_up(
        store: SqliteStore) -> None:
    """Before: the step moved the forwarder's cursor past the skipped rows (Bridge.gave_way),
    so the failed window was read again from there: its skipped rows 1-6 were neither given
    up (dropped 0) nor sent, and the next acknowledgement's write passed them as forwarded."""
    sizes = await _logged(store, 10)
    counted: list[int] = []
    reader = StoreLogReader(store.bridges, "central", "own",
                            dropped=lambda n: (counted.append(n), bridge._count_dropped(n)))
    windows: asyncio.Queue[tuple[list[int], asyncio.Future[int]]] = asyncio.Queue()

    async def no_wait(_delay: float) -> None:
        await asyncio.sleep(0)

    forwarder = Forwarder(lambda: _Sink(windows), reader, cursor=0, window=10, depth=1,
                          sleep=no_wait)
    task = asyncio.ensure_future(forwarder.run())
    try:
        offsets, acks = await asyncio.wait_for(windows.get(), 10)
        assert offsets == list(range(1, 11))  # in flight
        bridge = Bridge(SimpleNamespace(side=store.bridges), config())
        bridge.reader, bridge.forwarder = reader, forwarder  # (what Bridge.start makes)
        bridge.dropped = 0
        after, through, count = await _step(store, sizes, 6)
        bridge.gave_way(through, count, after)
        acks.set_exception(ConnectionError("connection lost"))  # the window fails
        offsets, acks = await asyncio.wait_for(windows.get(), 10)
        assert offsets == [7, 8, 9, 10]  # sent again: the skipped ones are not
        assert sum(counted) == 6  # given up: dropped
        assert bridge.refresh().dropped == 6
        acks.set_result(4)
        await _until(lambda: forwarder.status.forwarded == 4)
        await reader.flush()
        stored: Any = store.bridges.reader("central")
        assert (stored.dropped, stored.offset, stored.backlog_count) == (6, 10, 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        reader.close()


async def _until(predicate: Any) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)  # one loop turn (not a wait for time)
    raise AssertionError("not reached")


async def test_a_failing_size_check_does_not_lose_the_committed_step(
        store: SqliteStore, monkeypatch: Any) -> None:
    """The step is committed before the size check runs: the check failing (a disk error)
    is logged and the step's result still goes back, so the bridge settles what it skipped.
    Before (review of round 11): give_way_backlogs raised, and the skipped rows were never
    shown dropped nor asked about."""
    sizes = await _logged(store, 10)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_check_size_sync", broken)
    assert await _step(store, sizes, 6) == (0, 6, 6)
    stored: Any = store.bridges.reader("central")
    assert (stored.offset, stored.dropped) == (6, 6)
