"""A group commit writes the sessions' backlog counts (ReaderCounted) in one multi-row UPDATE
after the group's other reader records (store/sqlite/plan.py): what a restart reads back is
the last count of each reader, and a reader made again later in the group starts from its
new row, not from a count meant for the old one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_broker.core.changes import (
    Change,
    LogAppended,
    Message,
    ReaderCounted,
    ReaderOpened,
    reader_name,
)
from edge_broker.store.sqlite import SqliteStore


def _appended(offset: int) -> LogAppended:
    return LogAppended(Message(offset, "s/x", b"p" * 10, 1, False, offset=offset))


async def test_the_last_count_of_each_reader_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    names = [reader_name(f"c{k}") for k in range(12)]  # more than one UPDATE chunk
    store = SqliteStore(path, ballast_bytes=0, disk_reserve_bytes=0)
    await store.open()
    await store.apply([ReaderOpened(n, 0, (("s/#", 0),)) for n in names])
    again = reader_name("again")
    batches: list[list[Change]] = [
        [_appended(1), *[ReaderCounted(n, 1, 10, 0) for n in names],
         ReaderOpened(again, 0, (("s/#", 0),)), ReaderCounted(again, 9, 90, 9)],
        [_appended(2), *[ReaderCounted(n, 2, 20, 1) for n in names],
         ReaderOpened(again, 2, (("s/#", 2),))],
    ]
    # Queued together, so the writer takes them as one group.
    await asyncio.gather(*[store.apply(b) for b in batches])
    await store.close()
    store = SqliteStore(path, ballast_bytes=0, disk_reserve_bytes=0)
    snapshot = await store.open()
    await store.close()
    for n in names:
        state = snapshot.readers[n]
        assert (state.backlog_count, state.backlog_bytes, state.skip) == (2, 20, 1)
    state = snapshot.readers[again]
    assert (state.offset, state.backlog_count, state.backlog_bytes, state.skip) == (2, 0, 0, 0)
