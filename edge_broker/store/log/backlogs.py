"""Persistent sessions' backlogs as readers of the log: the store's side of core/backlog.py.

A session in backlog mode (offline, or reconnected and not caught up) is the reader
`session:<client id>` whose filters are its non-shared subscriptions, each with the offset
it was made at (`since`). Its backlog is the rows after the reader's offset that they select;
nothing per message is written for it. `apply` runs the core's reader records inside the
group transaction, after the group's appends (so a reader opened in the group starts after
rows appended before it in the same group, and its counters are right); `read` gives backlog
pages; `load` gives the readers at start-up (cursor, filters, counters, the ranges unsubscribed
filters left to read, and the in-flight entries with their rows: a few rows per session,
never the backlog).

Counters: the reader's backlog (rows and bytes selected after its offset) is credited at
append by `Log.append` and debited here when the cursor moves, with one index range per
selected topic that has rows in the range passed over (a scan of the range when the reader
selects many topics).

Every function runs in the store's writer thread with its connection; `apply` inside the
caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping

from ...core.changes import (
    SESSION_READER_PREFIX,
    InflightCleared,
    InflightEntry,
    InflightSaved,
    Message,
    ReaderChange,
    ReaderClosed,
    ReaderCounted,
    ReaderFilterDeleted,
    ReaderFilterSaved,
    ReaderMoved,
    ReaderOpened,
    ReaderRangesSaved,
    ReaderState,
    SubscriptionRecord,
)
from ...mqtt.topics import topic_matches
from . import cursors
from .log import _COLUMNS, Log, RawRow, Reader

__all__ = ["apply", "load", "read", "session_backlogs",
           "session_preview"]

MANY_TOPICS = 16  # a reader selecting more topics than this is debited with one range scan


def apply(log: Log, conn: sqlite3.Connection, changes: Iterable[ReaderChange]) -> None:
    """Apply the reader records of a group, in order. `ReaderMoved` records are coalesced:
    only the last one before another record of the same reader is applied."""
    moves: dict[str, int] = {}
    for change in changes:
        if isinstance(change, ReaderMoved):
            moves[change.reader] = change.offset
            continue
        name = change.reader
        if name in moves:
            _move(log, conn, name, moves.pop(name))
        if isinstance(change, InflightSaved):
            reader = log.readers.get(name)
            if reader is not None:
                reader.inflight[change.packet_id] = (change.offset, change.state)
                conn.execute(
                    "INSERT OR REPLACE INTO log_inflight (reader, packet_id, offset, state,"
                    " qos, retain, subscription_ids, dup) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, change.packet_id, change.offset, change.state, change.qos,
                     change.retain, ",".join(map(str, change.subscription_ids)) or None,
                     change.dup))
        elif isinstance(change, InflightCleared):
            if name in log.readers:
                cursors.clear_inflight(log, conn, name, change.packet_id)
        elif isinstance(change, ReaderMoved):
            moves[name] = change.offset
        elif isinstance(change, ReaderOpened):
            _open(log, conn, name, change.offset, dict(change.filters))
        elif isinstance(change, ReaderFilterSaved):
            if name in log.readers:
                cursors.subscribe(log, conn, name, change.topic_filter, change.since)
        elif isinstance(change, ReaderFilterDeleted):
            if name in log.readers:
                cursors.unsubscribe(log, conn, name, change.topic_filter)
        elif isinstance(change, ReaderClosed):
            cursors.remove_reader(log, conn, name)
        elif isinstance(change, ReaderRangesSaved):
            if name in log.readers:
                _save_ranges(conn, change)
        elif isinstance(change, ReaderCounted) and name in log.readers:
            conn.execute("UPDATE log_readers SET queued_count = ?, queued_bytes = ?,"
                         " queued_skip = ? WHERE name = ?",
                         (change.count, change.bytes, change.skip, name))
    for name, offset in moves.items():
        _move(log, conn, name, offset)


def _save_ranges(conn: sqlite3.Connection, change: ReaderRangesSaved) -> None:
    """Replace the reader's ranges left to read (`log_reader_ranges`, store/log/schema.py)."""
    name = change.reader
    conn.execute("DELETE FROM log_reader_ranges WHERE reader = ?", (name,))
    rows: list[tuple[object, ...]] = [
        (name, topic_filter, since, until, record.qos, record.no_local,
         record.retain_as_published, record.subscription_id)
        for topic_filter, since, until, record in change.ranges]
    rows += [(name, topic_filter, since, None, None, None, None, None)
             for topic_filter, since in change.subscribed]
    if rows:
        conn.executemany(
            "INSERT OR REPLACE INTO log_reader_ranges (reader, filter, since, until, qos,"
            " no_local, retain_as_published, subscription_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows)


def _open(log: Log, conn: sqlite3.Connection, name: str, offset: int,
          filters: Mapping[str, int]) -> None:
    cursors.remove_reader(log, conn, name)
    reader = Reader(name, offset)
    conn.execute("INSERT INTO log_readers (name, offset) VALUES (?, ?)", (name, offset))
    log.readers[name] = reader
    for topic_filter, since in filters.items():
        log.set_filter(reader, topic_filter, since)
        conn.execute("INSERT INTO log_reader_filters (reader, filter, since) VALUES (?, ?, ?)",
                     (name, topic_filter, since))
    count, size = _stats(log, conn, reader, offset, log.last_offset)
    reader.backlog_count, reader.backlog_bytes = count, size
    log.save_reader(conn, reader)


def _move(log: Log, conn: sqlite3.Connection, name: str, offset: int) -> None:
    reader = log.readers.get(name)
    if reader is None or offset <= reader.offset:
        return
    if offset >= log.last_offset:
        reader.backlog_count = reader.backlog_bytes = 0
    else:
        count, size = _stats(log, conn, reader, reader.offset, offset)
        reader.backlog_count = max(0, reader.backlog_count - count)
        reader.backlog_bytes = max(0, reader.backlog_bytes - size)
    reader.offset = offset
    log.save_reader(conn, reader)


def _stats(log: Log, conn: sqlite3.Connection, reader: Reader, after: int,
           until: int) -> tuple[int, int]:
    """Rows and bytes the reader selects with after < offset <= until."""
    if until <= after or not reader.topics:
        return 0, 0
    by_id = log.by_id
    live = [(tid, since) for tid, since in reader.topics.items()
            if tid in by_id and (by_id[tid].last_offset or 0) > max(after, since)]
    if not live:
        return 0, 0
    count = size = 0
    if len(live) > MANY_TOPICS:
        wanted = dict(live)
        for tid, offset, length in conn.execute(
                "SELECT topic_id, offset, length(payload) + coalesce(length(properties), 0)"
                " FROM log WHERE offset > ? AND offset <= ?", (after, until)):
            since = wanted.get(tid)
            if since is not None and offset > since:
                count += 1
                size += length + by_id[tid].name_size
        return count, size
    for tid, since in live:
        n, b = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload) + coalesce(length(properties), 0)),"
            " 0) FROM log WHERE topic_id = ? AND offset > ? AND offset <= ?",
            (tid, max(after, since), until)).fetchone()
        count += int(n)
        size += int(b) + int(n) * by_id[tid].name_size
    return count, size


def read(log: Log, conn: sqlite3.Connection, name: str, filters: Mapping[str, int],
         after: int, until: int, limit: int) -> tuple[list[RawRow], dict[int, str], int]:
    """The rows with after < offset <= until that the reader selects (its filters as the
    store holds them, else `filters`), at most `limit`, in order, as SQLite returns them
    (`Log.read_raw`), with the names of their topic ids; and the offset up to which the
    range was looked at. Never past what the log holds (with durability "none" a batch
    counts as done before it is written): the caller asks again from there."""
    until = min(until, log.last_offset)
    if after >= until:
        return [], {}, after
    reader = log.readers.get(name)
    selection = reader.topics if reader is not None else log.selection(filters)
    rows, end = log.read_raw(conn, after, selection, limit)
    if rows and rows[-1][0] > until:
        rows = [row for row in rows if row[0] <= until]
        end = until
    by_id = log.by_id
    topics = {tid: by_id[tid].name for tid in {row[2] for row in rows}}
    return rows, topics, min(end, until)


def load(log: Log, conn: sqlite3.Connection) -> dict[str, ReaderState]:
    """The sessions' readers, after `Log.load`, with their in-flight entries' rows."""
    out: dict[str, ReaderState] = {}
    for name, count, size, skip in conn.execute(
            "SELECT name, queued_count, queued_bytes, queued_skip FROM log_readers"
            " WHERE name LIKE 'session:%'"):
        reader = log.readers.get(name)
        if reader is not None:
            out[name] = ReaderState(reader.offset, dict(reader.filters), count, size, skip)
    if not out:
        return out
    for name, topic_filter, since, until, qos, no_local, as_published, sub_id in conn.execute(
            "SELECT reader, filter, since, until, qos, no_local, retain_as_published,"
            " subscription_id FROM log_reader_ranges ORDER BY reader, filter, since"):
        target = out.get(name)
        if target is None:
            continue
        if until is None:
            target.subscribed[topic_filter] = since
        else:
            record = SubscriptionRecord(name[len(SESSION_READER_PREFIX):], topic_filter, qos,
                                        bool(no_local), bool(as_published),
                                        subscription_id=sub_id)
            target.ranges.append((topic_filter, since, until, record))
    for name, packet_id, offset, state, qos, retain, ids, dup in conn.execute(
            "SELECT reader, packet_id, offset, state, qos, retain, subscription_ids, dup"
            " FROM log_inflight ORDER BY reader, offset"):
        target = out.get(name)
        raw = conn.execute(f"SELECT {_COLUMNS} FROM log WHERE offset = ?",
                           (offset,)).fetchone()
        if target is None or raw is None:
            continue
        row = log._row(raw)
        message = Message(0, row.topic, row.payload, row.qos, row.retain, row.properties,
                          row.at, row.expires_at, row.origin, row.offset)
        sub_ids = tuple(int(i) for i in ids.split(",")) if ids else ()
        target.inflight.append(InflightEntry(packet_id, message, qos, bool(retain), sub_ids,
                                             state, bool(dup)))
    return out


def session_backlogs(conn: sqlite3.Connection) -> dict[str, tuple[int, int, float | None]]:
    """Client id -> (messages, payload bytes, oldest publish time) of each offline session's
    backlog, counted in the file (admin commands: a query per selected topic, proportional to
    the backlog; the running broker keeps counters instead). Works on a plain connection
    (read-only: no `Log` needed)."""
    topics = [(int(tid), str(name)) for tid, name in conn.execute(
        "SELECT id, name FROM log_topics")]
    filters: dict[str, dict[str, int]] = {}
    for reader, topic_filter, since in conn.execute(
            "SELECT reader, filter, since FROM log_reader_filters WHERE reader LIKE 'session:%'"):
        filters.setdefault(reader, {})[topic_filter] = int(since)
    out: dict[str, tuple[int, int, float | None]] = {}
    for name, offset in conn.execute(
            "SELECT name, offset FROM log_readers WHERE name LIKE 'session:%'"):
        count = size = 0
        oldest: float | None = None
        for tid, topic in topics:
            since = min((s for f, s in filters.get(name, {}).items() if topic_matches(f, topic)),
                        default=None)
            if since is None:
                continue
            n, b, at = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0), min(at) FROM log"
                " WHERE topic_id = ? AND offset > ?", (tid, max(int(offset), since))).fetchone()
            count += int(n)
            size += int(b)
            if at is not None and (oldest is None or at < oldest):
                oldest = float(at)
        out[name[len(SESSION_READER_PREFIX):]] = (count, size, oldest)
    return out


def session_preview(conn: sqlite3.Connection, client_id: str,
                    limit: int) -> list[tuple[str, int, bool, int, float]]:
    """The first `limit` messages of an offline session's backlog in the file: (topic, QoS,
    retain, payload bytes, publish time), for `sessions show` on a stopped broker."""
    name = SESSION_READER_PREFIX + client_id
    row = conn.execute("SELECT offset FROM log_readers WHERE name = ?", (name,)).fetchone()
    if row is None:
        return []
    filters = dict(conn.execute(
        "SELECT filter, since FROM log_reader_filters WHERE reader = ?", (name,)).fetchall())
    names: dict[int, str] = {}
    out: list[tuple[int, str, int, bool, int, float]] = []
    for tid, topic in conn.execute("SELECT id, name FROM log_topics"):
        since = min((s for f, s in filters.items() if topic_matches(f, topic)), default=None)
        if since is None:
            continue
        names[tid] = topic
        for offset, qos, retain, size, at in conn.execute(
                "SELECT offset, qos, retain, length(payload), at FROM log WHERE topic_id = ?"
                " AND offset > ? ORDER BY offset LIMIT ?", (tid, max(row[0], since), limit)):
            out.append((offset, topic, qos, bool(retain), size, at))
    out.sort()
    return [entry[1:] for entry in out[:limit]]
