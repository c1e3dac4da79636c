"""The store budget (`[storage] max_store_bytes`): what gives way when it is reached.

The store (store/sqlite/maintenance.py) calls `give_way_step` between groups while the data
in the file is at or over `max_store_bytes`, one bounded step at a time (like retention, it
never stalls publishing), each in its own short transaction, then re-reads the pages in use.
The order:

1. *Streams' oldest rows that no reader still needs*, oldest first across all streams: a
   stream's floor moves past its oldest row as if its own retention bounds had been reached,
   unless a reader (an offline session, a bridge, a stream subscription) whose filters
   select that row still needs it (it is above the reader's `max(done, since)`): that
   stream then stops giving way at that row (oldest first: it does not skip over it). A row
   held by several streams is released by all of them at once (only then is it deleted).
   Released rows are counted per stream (`StreamState.budget_dropped`) and in total
   (`GiveWay.stream_rows`). Last-value streams do not give way (they hold one row per
   topic). The row pass of retention (retention.py) then deletes what nobody holds, which
   frees whole pages to SQLite's freelist: the store counts free pages as free, so
   `used_bytes` goes down.
2. *Then the largest backlogs, by their own drop policy*. A session's policy and counters
   live in the core, so the core names the readers that may give way (offline sessions
   under drop-oldest, largest backlog first: `BrokerCore.backlogs_giving_way`), and
   `backlogs_give_way` moves their cursors past their oldest rows (`cursors.drop_to_bound`)
   until rows worth `excess` bytes were skipped; the core then takes what was skipped back
   (`backlog_gave_way`: counted and logged as drops, reason store_full). The store asks for
   this (`SqliteStore.on_room_wanted`) when a step of tier 1 released nothing. Bridges'
   readers give way too (a bridge's policy is drop-oldest): the server ranks them with the
   sessions by backlog bytes (server/bridges.py `backlogs_giving_way`) and the bridge counts
   the skip as its drops (`Reader.dropped`, as `max_backlog_bytes`; `Bridge.gave_way`).
3. *Only when nothing can give way*, new QoS 1/2 work stays refused (the store is `full`).

A step releases rows worth `excess` bytes (the caller asks for what is over the budget plus
a margin, so that the store does not flap at its edge), at most `budget` rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from . import cursors
from .log import Log, LogRow, StreamState
from .retention import retention_step

__all__ = ["GiveWay", "backlogs_give_way", "give_way_step"]


@dataclass(slots=True)
class GiveWay:
    stream_rows: int = 0  # rows streams released for the budget
    stream_bytes: int = 0
    rows_deleted: int = 0
    bytes_deleted: int = 0
    more: bool = False  # something may still give way: call again


def _reader_floors(log: Log) -> dict[int, int]:
    """Per topic some reader selects, the lowest offset a reader still needs."""
    floors: dict[int, int] = {}
    for reader in log.readers.values():
        done = reader.done
        for tid, since in reader.topics.items():
            need = max(done, since) + 1
            if need < floors.get(tid, need + 1):
                floors[tid] = need
    return floors


def give_way_step(log: Log, conn: sqlite3.Connection, now: float, excess: int, *,
                  budget: int = 2000) -> GiveWay:
    """One bounded step, in the caller's transaction: streams release their oldest rows
    that no reader needs, worth at least `excess` bytes if they can; then retention deletes
    what nobody holds any more."""
    report = GiveWay()
    streams = [s for s in log.streams.values() if s.count > 0 and not s.config.last_value]
    if not streams or excess <= 0:
        return report
    floors = _reader_floors(log)
    # Each stream's oldest rows; rows past a page that came back full are not looked at in
    # this step (another stream may hold older ones beyond it).
    rows: dict[int, LogRow] = {}
    horizon: int | None = None
    for state in streams:
        page = log.read_page(conn, state.first_offset - 1, log.stream_selection(state), budget)
        for row in page.rows:
            rows[row.offset] = row
        if len(page.rows) >= budget:
            horizon = page.end if horizon is None else min(horizon, page.end)
    blocked: set[str] = set()
    changed: set[str] = set()
    freed = 0
    topic_of = log.topics
    for offset in sorted(rows):
        if freed >= excess or (horizon is not None and offset > horizon):
            break
        row = rows[offset]
        stats = topic_of.get(row.topic)
        if stats is None:
            continue
        holders = [s for s in streams
                   if stats.id in s.topics and s.first_offset <= offset]
        if any(s.config.name in blocked for s in holders):
            blocked.update(s.config.name for s in holders)
            continue
        if offset >= floors.get(stats.id, offset + 1):
            blocked.update(s.config.name for s in holders)  # a reader still needs it
            continue
        for state in holders:
            _release(state, row)
            changed.add(state.config.name)
        report.stream_rows += 1
        report.stream_bytes += row.size
        freed += row.size
    for state in streams:
        if state.config.name in changed:
            log.save_stream(conn, state)
    deleted = retention_step(log, conn, now, budget=budget)
    report.rows_deleted = deleted.rows_deleted
    report.bytes_deleted = deleted.bytes_deleted
    report.more = bool(changed) or not deleted.done
    return report


def _release(state: StreamState, row: LogRow) -> None:
    state.first_offset = row.offset + 1
    state.count -= 1
    state.bytes -= row.size
    state.budget_dropped += 1
    if state.count <= 0:
        state.count = state.bytes = 0
        state.first_at = None
    else:
        state.first_at = row.at  # an earlier time than its oldest row's: allowed


def backlogs_give_way(log: Log, conn: sqlite3.Connection, readers: Sequence[str], excess: int,
                      now: float, *, budget: int = 2000) -> list[tuple[str, int, int, int, int]]:
    """In the caller's transaction: move the cursors of `readers` (in that order: the largest
    backlog first) past their oldest rows until rows worth `excess` bytes were skipped (at
    most `budget` rows), then delete what nobody holds any more. Returns, per reader that
    gave way, (name, its new offset, rows skipped, bytes skipped, its old offset)."""
    out: list[tuple[str, int, int, int, int]] = []
    wanted, left = excess, budget
    for name in readers:
        if wanted <= 0 or left <= 0:
            break
        reader = log.readers.get(name)
        if reader is None or reader.backlog_bytes <= 0:
            continue
        bound = max(1, reader.backlog_bytes - wanted)  # 0 would mean "no bound"
        after = reader.offset
        skipped = cursors.drop_to_bound(log, conn, name, max_bytes=bound, budget=left)
        if skipped.count:
            out.append((name, reader.offset, skipped.count, skipped.bytes, after))
            wanted -= skipped.bytes
            left -= skipped.count
    if out:
        retention_step(log, conn, now, budget=budget)
    return out
