"""Cursors: a reader of the log (a persistent session, a stream subscription, a bridge).

A reader is `offset` (the last offset handed out: every selected row at or below it is done,
except the ones in flight) plus `inflight` (packet id -> (offset, QoS 2 state)), plus its
filters, each with the `since` offset at which it was made: a filter only selects rows with
an offset above its since, so a subscription added later never sees older messages. A topic
matched by several filters of a reader uses the lowest since of them.

The reader's backlog (rows selected after `offset`, and their bytes) is kept up to date at
append (every reader whose filters match the topic, in memory, and one UPDATE per reader per
group) and as the reader advances, so a backlog bound can be checked per message and start-up
needs no scan. Retention keeps, per topic, every row above `max(done, since)` of every reader
whose filters match it (`Reader.done` is below the oldest in-flight offset).

Every function runs inside the caller's transaction, like `Log.append`.
"""

from __future__ import annotations

import sqlite3
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from .log import Log, LogRow, Page, Reader

__all__ = ["Backlog", "Passed", "add_reader", "advance", "backlog", "clear_inflight",
           "drop_to_bound", "read", "remove_reader", "set_inflight", "subscribe", "unsubscribe"]


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int
    bytes: int


class Passed:
    """Rows a reader passed, summarised: `count` rows of `size` bytes in all, and `rows`,
    their offsets and sizes interleaved (offset, size, offset, size, ...: e.g. one
    array("q")), in offset order. A bridge's uplink process acknowledges its rows so
    (server/bridge_wire.py "ack"): the broker's work per acknowledgement is then the same
    for one message or thousands, and its backlog counts stay exact (`advance`)."""

    __slots__ = ("count", "rows", "size")

    def __init__(self, count: int, size: int, rows: Sequence[int]) -> None:
        self.count = count
        self.size = size
        self.rows = rows

    def after(self, offset: int) -> tuple[int, int]:
        """(rows, bytes) of those with an offset above `offset`: all of them unless a drop
        moved the cursor meanwhile, then a binary search."""
        rows = self.rows
        if not self.count or rows[-2] <= offset:
            return 0, 0
        if rows[0] > offset:
            return self.count, self.size
        i = bisect_right(rows[0::2], offset)
        return self.count - i, sum(rows[2 * i + 1::2])

    def between(self, after: int, through: int) -> int:
        """How many have an offset in (after, through]."""
        rows = self.rows
        if not self.count or rows[-2] <= after or rows[0] > through:
            return 0
        offsets = rows[0::2]
        return bisect_right(offsets, through) - bisect_right(offsets, after)


def add_reader(log: Log, conn: sqlite3.Connection, name: str) -> Reader:
    """A new reader, positioned at the end of the log (it selects nothing until subscribed).
    An existing reader of that name is returned as it is."""
    reader = log.readers.get(name)
    if reader is not None:
        return reader
    reader = Reader(name, log.last_offset)
    conn.execute("INSERT INTO log_readers (name, offset) VALUES (?, ?)", (name, reader.offset))
    log.readers[name] = reader
    return reader


def remove_reader(log: Log, conn: sqlite3.Connection, name: str) -> bool:
    """Forget a reader, its filters, in-flight entries and ranges left to read (a session's,
    backlogs.py): its rows may then be deleted."""
    reader = log.readers.get(name)
    if reader is None:
        return False
    log.forget_reader(reader)
    for table in ("log_readers WHERE name", "log_reader_filters WHERE reader",
                  "log_inflight WHERE reader", "log_reader_ranges WHERE reader"):
        conn.execute(f"DELETE FROM {table} = ?", (name,))
    return True


def subscribe(log: Log, conn: sqlite3.Connection, name: str, topic_filter: str,
              since: int | None = None) -> int:
    """Add (or keep) a filter; returns its since. A new filter selects only rows appended
    after it was made (`since` = the last offset now), unless `since` is given (a replay
    position: the offset after which it starts). Repeating a filter keeps its since unless
    `since` is given."""
    reader = log.readers[name]
    if since is None:
        if topic_filter in reader.filters:
            return reader.filters[topic_filter]
        since = log.last_offset
    old_topics = dict(reader.topics)
    log.set_filter(reader, topic_filter, since)
    conn.execute("INSERT OR REPLACE INTO log_reader_filters (reader, filter, since)"
                 " VALUES (?, ?, ?)", (name, topic_filter, since))
    _rebase_backlog(log, conn, reader, old_topics)
    return since


def unsubscribe(log: Log, conn: sqlite3.Connection, name: str, topic_filter: str) -> bool:
    reader = log.readers[name]
    old_topics = dict(reader.topics)
    if not log.remove_filter(reader, topic_filter):
        return False
    conn.execute("DELETE FROM log_reader_filters WHERE reader = ? AND filter = ?",
                 (name, topic_filter))
    _rebase_backlog(log, conn, reader, old_topics)
    return True


def _rebase_backlog(log: Log, conn: sqlite3.Connection, reader: Reader,
                    old: dict[int, int]) -> None:
    """Correct the backlog counters for the topics whose since changed (rare: a filter
    removed, or one given an older since for a replay): one index range per such topic."""
    changed = {tid for tid in old.keys() | reader.topics.keys()
               if old.get(tid) != reader.topics.get(tid)}
    for tid in changed:
        for since, sign in ((old.get(tid), -1), (reader.topics.get(tid), 1)):
            if since is None:
                continue
            count, size = _range_stats(log, conn, tid, max(reader.offset, since))
            reader.backlog_count += sign * count
            reader.backlog_bytes += sign * size
    log.save_reader(conn, reader)


def _range_stats(log: Log, conn: sqlite3.Connection, tid: int, after: int) -> tuple[int, int]:
    stats = log.by_id[tid]
    if stats.count == 0 or stats.last_offset is None or after >= stats.last_offset:
        return 0, 0
    if stats.first_offset is not None and after < stats.first_offset:
        return stats.count, stats.bytes
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(length(payload) + coalesce(length(properties), 0)), 0)"
        " FROM log WHERE topic_id = ? AND offset > ?", (tid, after)).fetchone()
    return int(count), int(size) + int(count) * stats.name_size


def read(log: Log, conn: sqlite3.Connection, name: str, limit: int,
         after: int | None = None) -> Page:
    """The reader's next rows after its offset (or after `after`, e.g. the end of the page
    it is still consuming), without moving it."""
    reader = log.readers[name]
    return log.read_page(conn, reader.offset if after is None else after, reader.topics,
                         limit)


def advance(log: Log, conn: sqlite3.Connection, name: str,
            consumed: Sequence[LogRow | Passed], end: int | None = None) -> int:
    """Move the cursor to `end` (default: the last consumed row) past `consumed`, which must
    be every selected row between the old offset and `end` (as `read` returned them), each
    one a `LogRow` or many of them in a `Passed` (`end` is then needed). Rows at or below
    the old offset (skipped meanwhile by `drop_to_bound`, or passed by an earlier advance
    and handed again) were counted out already. Returns how many of them a drop skipped
    and no advance passed before: a bridge's were in flight when the drop skipped them
    (store/log/bridges.py `commit`). A row handed again (a bridge's writes carry those of
    the writes not yet known stored) is not counted twice: `Reader.advanced`."""
    reader = log.readers[name]
    if end is not None:
        target = end
    elif consumed:
        last = consumed[-1]
        assert isinstance(last, LogRow), "advance: a Passed needs its end"
        target = last.offset
    else:
        target = reader.offset
    old = reader.offset
    if reader.advanced < 0:
        reader.advanced = old
    floor = reader.advanced  # rows in (floor, old] were skipped and not passed before
    late = 0
    for row in consumed:
        if isinstance(row, Passed):
            count, size = row.after(old)
            reader.backlog_count -= count
            reader.backlog_bytes -= size
            if floor < old:
                late += row.between(floor, old)
        elif row.offset > old:
            reader.backlog_count -= 1
            reader.backlog_bytes -= row.size
        elif row.offset > floor:
            late += 1
    reader.advanced = max(floor, target)
    if target > old:
        reader.offset = target
        log.save_reader(conn, reader)
    return late


def set_inflight(log: Log, conn: sqlite3.Connection, name: str, packet_id: int, offset: int,
                 state: int) -> None:
    """Record (or update) an in-flight entry: its row is kept until `clear_inflight`."""
    log.readers[name].inflight[packet_id] = (offset, state)
    conn.execute("INSERT OR REPLACE INTO log_inflight (reader, packet_id, offset, state)"
                 " VALUES (?, ?, ?, ?)", (name, packet_id, offset, state))


def clear_inflight(log: Log, conn: sqlite3.Connection, name: str, packet_id: int) -> bool:
    if log.readers[name].inflight.pop(packet_id, None) is None:
        return False
    conn.execute("DELETE FROM log_inflight WHERE reader = ? AND packet_id = ?",
                 (name, packet_id))
    return True


def backlog(log: Log, name: str) -> Backlog:
    """Rows and bytes the reader has not been handed yet (no query: kept up to date)."""
    reader = log.readers[name]
    return Backlog(reader.backlog_count, reader.backlog_bytes)


def drop_to_bound(log: Log, conn: sqlite3.Connection, name: str, *, max_count: int = 0,
                  max_bytes: int = 0, budget: int = 4096) -> Backlog:
    """A reader whose backlog exceeds its bound (0 = none) has its cursor moved forward over
    its oldest rows until it fits (at most `budget` rows per call); returns what was skipped,
    also added to `Reader.dropped`. The policy (when, and the log line) is the caller's."""
    reader = log.readers[name]
    if reader.advanced < 0:
        reader.advanced = reader.offset  # (see `advance`)
    count = size = 0

    def over() -> bool:
        return bool((max_count and reader.backlog_count > max_count)
                    or (max_bytes and reader.backlog_bytes > max_bytes))

    while over() and budget > 0:
        page = log.read_page(conn, reader.offset, reader.topics, min(budget, 512))
        if not page.rows:
            # Counters ahead of the rows (they were deleted under it): nothing left to skip.
            reader.backlog_count = reader.backlog_bytes = 0
            reader.offset = max(reader.offset, page.end)
            break
        for row in page.rows:
            if not over():
                break
            reader.offset = row.offset
            reader.backlog_count -= 1
            reader.backlog_bytes -= row.size
            count += 1
            size += row.size
            budget -= 1
    reader.dropped += count
    log.save_reader(conn, reader)
    return Backlog(count, size)
