"""StoreLogReader (server/bridge_log.py): cursor writes in the background, coalesced, never
ahead of the acknowledgements; a failed write is reported, not lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from edge_broker.mqtt.properties import NO_PROPERTIES
from edge_broker.server.bridge_log import StoreLogReader
from edge_broker.store.log.log import LogRow, Page


def row(offset: int, origin: str = "dev1") -> LogRow:
    return LogRow(offset, 1_765_000_000.0 + offset, "s/t", 1, False, b"x", NO_PROPERTIES,
                  origin, None, 4)


class FakeSide:
    """The store side of one bridge: pages from `rows`; cursor writes wait for `gate`."""

    def __init__(self, rows: list[LogRow]) -> None:
        self.rows = rows
        self.last_committed = rows[-1].offset if rows else 0
        self.writes: list[tuple[int, list[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    def listen(self, callback: Callable[[int], None]) -> None:
        pass

    def unlisten(self, callback: Callable[[int], None]) -> None:
        pass

    async def page(self, bridge: str, after: int, limit: int) -> Page:
        rows = [r for r in self.rows if r.offset > after][:limit]
        return Page(rows, rows[-1].offset if rows else self.last_committed)

    async def commit(self, bridge: str, offset: int, consumed: Sequence[LogRow]) -> None:
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk I/O error")
        self.writes.append((offset, [r.offset for r in consumed]))


def reader_over(side: FakeSide) -> StoreLogReader:
    return StoreLogReader(side, "central", "bridge-central")  # type: ignore[arg-type]


async def test_cursor_writes_do_not_hold_up_the_forwarder_and_coalesce() -> None:
    side = FakeSide([row(o) for o in range(1, 13)])
    reader = reader_over(side)
    side.gate.clear()  # the store's thread is busy (a group commit's fsync)
    assert [m.offset for m in await reader.read_after(0, 4)] == [1, 2, 3, 4]
    await asyncio.wait_for(reader.commit_cursor(4), 1)  # returns before the write is done
    assert [m.offset for m in await reader.read_after(4, 4)] == [5, 6, 7, 8]
    await asyncio.wait_for(reader.commit_cursor(8), 1)
    assert [m.offset for m in await reader.read_after(8, 4)] == [9, 10, 11, 12]
    await asyncio.wait_for(reader.commit_cursor(10), 1)  # acked only up to 10
    assert side.writes == []
    side.gate.set()
    await reader.flush()
    # The first write (4) was under way; the next one carries the latest cursor (10) and
    # every row it passes, once: the backlog counts stay right. 11 and 12 are not passed.
    assert side.writes == [(4, [1, 2, 3, 4]), (10, [5, 6, 7, 8, 9, 10])]
    reader.close()


async def test_a_failed_cursor_write_is_raised_and_its_rows_passed_by_the_next() -> None:
    side = FakeSide([row(o) for o in range(1, 9)])
    reader = reader_over(side)
    await reader.read_after(0, 8)
    side.fail_next = True
    await reader.commit_cursor(4)
    with pytest.raises(OSError):
        await reader.flush()
    await reader.commit_cursor(8)
    await reader.flush()
    assert side.writes == [(8, [1, 2, 3, 4, 5, 6, 7, 8])]
    reader.close()


async def test_a_page_read_ahead_of_unacknowledged_rows_never_moves_the_cursor() -> None:
    # 1-4 from devices, 5-8 the bridge's own downlink (not sent back up).
    side = FakeSide([row(o) for o in range(1, 5)] + [row(o, "bridge-central")
                                                       for o in range(5, 9)])
    reader = reader_over(side)
    assert len(await reader.read_after(0, 4)) == 4
    assert await reader.read_after(4, 4) == []  # read ahead while 1-4 wait for their acks
    await reader.flush()
    assert side.writes == []  # 1-4 are not acknowledged: the cursor must not pass them
    await reader.commit_cursor(4)
    assert await reader.read_after(4, 4) == []  # now from the acknowledged cursor
    await reader.flush()
    assert side.writes == [(8, [1, 2, 3, 4, 5, 6, 7, 8])]  # one write, past its own rows
    reader.close()
