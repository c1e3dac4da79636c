"""Retention by age and size, last-value compaction, and the clock retention trusts.

Two passes per `retention_step`, each bounded by a row budget so a step is a short
transaction the writer can run between groups (it never stalls publishing):

1. *Streams.* A stream holds the rows of its topics at or above its floor `first_offset`.
   While its oldest row is older than `max_age` (by the trusted clock), or it holds more than
   `max_bytes`, the floor moves past its oldest row (read in offset order, so "oldest go
   first" for both bounds, since `at` never decreases along the offsets). Nothing is deleted
   in this pass; only the stream's floor, count and bytes change.
2. *Rows.* Per topic, the floor is the lowest of what its holders still need: a matching
   stream needs its rows from its floor on (a last-value stream only the topic's newest row,
   and only if at or above its floor), a matching reader its rows above
   `max(done, since)`. A topic nobody holds any more has its floor above its last row. Rows
   below the floor are deleted oldest first, a budget at a time: first the log's oldest
   rows that are below every topic's floor (what readers passed, all topics at once, with
   one table range `offset <= ?`: `_delete_prefix`), then per topic with one index range
   (`topic_id = ? AND offset <= ?`); the counters in `log_topics` follow. A row some reader
   has in flight is never deleted (even if that reader unsubscribed meanwhile): deletion of
   its topic stops below it until the entry is cleared.

So retention never deletes what a reader still needs: a reader over its own bound is moved
forward first by `cursors.drop_to_bound` (counted as dropped), and only then do its rows go.

*Time.* `at` is the wall clock at append, made non-decreasing (`max(now, last at)`), so a
clock stepped backward only holds the stamps still until it catches up. Retention compares
against `TrustedClock.now()`: `min(wall, wall at open + monotonic time since open)`. A wall
clock stepped forward after the broker started (NTP fixing a Pi that booted without an RTC)
therefore does not age every row at once: retention keeps going at the pace of real time
from where it was, keeping more, never less, until the next start, which takes the wall
clock as it then is. Stepped backward, the wall is lower and retention simply waits. The lag
of retention behind its bounds is the interval between steps (run one at least every 10 s)
plus at most one step's budget.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from .log import Log, StreamState

__all__ = ["RetentionReport", "TrustedClock", "retention_due", "retention_step"]

DEFAULT_BUDGET = 2000  # rows per step and pass
# `_delete_prefix` runs only when a step's budget gives each topic it touches at least this
# many rows on average; with more topics, per topic (benchmarks/results/h9-core.md: with
# 2,000 interleaved topics, one row each per step, it cost 3.6 times the per-topic pass).
PREFIX_ROWS_PER_TOPIC = 16


class TrustedClock:
    """Wall-clock seconds that never run ahead of real time elapsed since the anchor."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.anchor_wall = wall()
        self.anchor_monotonic = monotonic()

    def now(self) -> float:
        return min(self._wall(), self.anchor_wall + (self._monotonic() - self.anchor_monotonic))


@dataclass(slots=True)
class RetentionReport:
    stream_rows_released: int = 0  # rows streams stopped holding (their floors moved)
    rows_deleted: int = 0
    bytes_deleted: int = 0
    done: bool = True  # False: the budget ran out, call again soon


def retention_due(log: Log, now: float) -> bool:
    """Whether a stream is past its bounds by more than the allowed lag (1% of max_bytes, or
    10 s of max_age): the caller should run a step now rather than at its next interval."""
    for state in log.streams.values():
        config = state.config
        if config.max_bytes is not None and state.bytes > config.max_bytes * 1.01:
            return True
        if (config.max_age_s is not None and state.first_at is not None
                and state.first_at < now - config.max_age_s - 10):
            return True
    return False


def retention_step(log: Log, conn: sqlite3.Connection, now: float, *,
                   budget: int = DEFAULT_BUDGET) -> RetentionReport:
    """One bounded step of both passes, in the caller's transaction. `now` is the trusted
    clock's reading."""
    report = RetentionReport()
    left = budget
    for state in log.streams.values():
        released, left = _trim_stream(log, conn, state, now, left)
        report.stream_rows_released += released
        if left <= 0:
            report.done = False
            break
    left = budget
    # In-flight rows stay whatever the filters say now (a reader that unsubscribed still
    # completes what it has in flight, [MQTT-3.10.4-3] (5.0)).
    pinned = {offset for reader in log.readers.values()
              for offset, _ in reader.inflight.values()}
    floors = _floors(log)
    count, size = _delete_prefix(log, conn, floors, pinned, left)
    left -= count
    report.rows_deleted += count
    report.bytes_deleted += size
    for tid, floor in floors.items():
        stats = log.by_id[tid]
        if stats.first_offset is None or stats.first_offset >= floor:
            continue
        if left <= 0:
            report.done = False
            break
        count, size = _delete_below(log, conn, tid, floor, left, pinned)
        left -= count
        report.rows_deleted += count
        report.bytes_deleted += size
    if left <= 0:  # the budget ran out on the last topic: it may have more below its floor
        report.done = False
    return report


def _trim_stream(log: Log, conn: sqlite3.Connection, state: StreamState, now: float,
                 left: int) -> tuple[int, int]:
    config = state.config
    cutoff = now - config.max_age_s if config.max_age_s is not None else None
    max_bytes = config.max_bytes
    released = 0

    def over(at: float | None) -> bool:
        if max_bytes is not None and state.bytes > max_bytes:
            return True
        return cutoff is not None and at is not None and at < cutoff

    changed = False
    while state.count > 0 and left > 0 and over(state.first_at):
        page = log.read_page(conn, state.first_offset - 1, log.stream_selection(state),
                             min(left, 512))
        if not page.rows:  # counters ahead of the rows: nothing left to release
            state.count = state.bytes = 0
            state.first_at = None
            state.first_offset = max(state.first_offset, page.end + 1)
            changed = True
            break
        stopped = False
        for row in page.rows:
            if not over(row.at):
                state.first_at = row.at
                stopped = True
                break
            state.first_offset = row.offset + 1
            state.count -= 1
            state.bytes -= row.size
            released += 1
            left -= 1
            changed = True
        if stopped:
            break
        if state.count == 0:
            state.first_at = None
    if changed:
        log.save_stream(conn, state)
    return released, left


def _floors(log: Log) -> dict[int, int]:
    """Per topic holding rows, the lowest offset some holder still needs."""
    floors: dict[int, int] = {}
    for tid, stats in log.by_id.items():
        if stats.count == 0 or stats.last_offset is None:
            continue
        floor = stats.last_offset + 1
        for state in log.topic_streams.get(tid, ()):
            need = state.first_offset
            if state.config.last_value:
                need = max(need, stats.last_offset)
            floor = min(floor, need)
        for reader in log.topic_readers.get(tid, ()):
            floor = min(floor, max(reader.done, reader.topics[tid]) + 1)
        floors[tid] = floor
    return floors


def _delete_prefix(log: Log, conn: sqlite3.Connection, floors: dict[int, int],
                   pinned: set[int], left: int) -> tuple[int, int]:
    """The oldest rows of the log that every topic's floor is above, in offset order, at
    most `left` of them, with one range delete over the table (`offset <= ?`) and one
    grouped count for the counters. This is what a bridge or session passing rows of
    interleaved topics leaves behind: deleted topic by topic, the same table pages would be
    rewritten once per topic (about twice the CPU per row, benchmarks/results/h9-core.md).
    Rows a last-value stream holds (at or above its floor) and rows in flight are never in
    the prefix; what is left below the floors goes topic by topic (`_delete_below`), and so
    does everything when too many topics share the prefix (`PREFIX_ROWS_PER_TOPIC`)."""
    if left <= 0 or not floors:
        return 0, 0
    bound = min(floors.values())
    for tid in floors:
        for state in log.topic_streams.get(tid, ()):
            if state.config.last_value:
                bound = min(bound, state.first_offset)
    if pinned:
        bound = min(bound, min(pinned))
    # The topics with rows below the bound: each costs the prefix two statements (its next
    # row, its counters), which only pay while it has several rows in a step.
    below = sum(1 for tid in floors if (log.by_id[tid].first_offset or bound) < bound)
    if not below or below * PREFIX_ROWS_PER_TOPIC > left:
        return 0, 0
    cut = conn.execute("SELECT offset FROM log WHERE offset < ? ORDER BY offset"
                       " LIMIT 1 OFFSET ?", (bound, left - 1)).fetchone()
    last = bound - 1 if cut is None else int(cut[0])
    groups = conn.execute(
        "SELECT topic_id, count(*), sum(length(payload) + coalesce(length(properties), 0))"
        " FROM log NOT INDEXED WHERE offset <= ? GROUP BY topic_id", (last,)).fetchall()
    if not groups:
        return 0, 0
    conn.execute("DELETE FROM log WHERE offset <= ?", (last,))
    count = size = 0
    for tid, rows, payload in groups:
        stats = log.by_id[tid]
        deleted = int(rows)
        gone = deleted * stats.name_size + int(payload)
        nxt = conn.execute("SELECT min(offset) FROM log WHERE topic_id = ?",
                           (tid,)).fetchone()[0]
        # None left: the counters go to zero (as `_delete_below`: they may have been ahead).
        counted, counted_bytes = (stats.count, stats.bytes) if nxt is None else (deleted, gone)
        stats.count -= counted
        stats.bytes -= counted_bytes
        stats.first_offset = nxt
        log.total_count -= counted
        log.total_bytes -= counted_bytes
        log.save_topic(conn, stats)
        count += deleted
        size += gone
    return count, size


def _delete_below(log: Log, conn: sqlite3.Connection, tid: int, floor: int, left: int,
                  pinned: set[int]) -> tuple[int, int]:
    stats = log.by_id[tid]
    rows = conn.execute(
        "SELECT offset, length(payload) + coalesce(length(properties), 0) FROM log"
        " WHERE topic_id = ? AND offset < ? ORDER BY offset LIMIT ?",
        (tid, floor, left)).fetchall()
    if pinned:
        for index, row in enumerate(rows):
            if row[0] in pinned:  # deleted oldest first: stop at the first row in flight
                rows = rows[:index]
                break
    count = len(rows)
    size = sum(r[1] for r in rows) + count * stats.name_size
    if rows:
        conn.execute("DELETE FROM log WHERE topic_id = ? AND offset <= ?", (tid, rows[-1][0]))
        # A last-value stream held the compacted rows at or above its floor: they leave it.
        for state in log.topic_streams.get(tid, ()):
            held = [r for r in rows if r[0] >= state.first_offset]
            if held:
                state.count -= len(held)
                state.bytes -= sum(r[1] for r in held) + len(held) * stats.name_size
                log.save_stream(conn, state)
    nxt = conn.execute("SELECT min(offset) FROM log WHERE topic_id = ?", (tid,)).fetchone()[0]
    if nxt is None:
        count_left, bytes_left = 0, 0
    else:
        count_left, bytes_left = stats.count - count, stats.bytes - size
    log.total_count -= stats.count - count_left
    log.total_bytes -= stats.bytes - bytes_left
    stats.count, stats.bytes, stats.first_offset = count_left, bytes_left, nxt
    log.save_topic(conn, stats)
    return count, size
