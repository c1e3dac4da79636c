"""Where a replay starts, and what a stream holds (for `streams list|show` and SUBSCRIBE).

A replay position is `earliest`, `latest`, an offset (an integer, always an offset) or a
time (ISO-8601 UTC). `stream_start` turns it into the first offset to deliver, inclusive
(Kafka's fetch position): an offset below the stream's first starts at its first; one past
its last waits for it (the reader simply starts there); a time starts at the first row
published at or after it (a binary search, `Log.first_offset_at`). The reader then
subscribes with `since = start - 1` and reads after `start - 1`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from ...errors import StoreError
from ...mqtt.topics import topic_matches
from .log import Log, LogRow, RawRow, StreamState
from .schema import has_schema
from .streams import StreamConfig

__all__ = ["Position", "StreamStats", "open_read_only", "page_raw", "parse_position",
           "read_streams", "replay", "stream_start", "stream_stats"]

Position = str | int | float  # "earliest" | "latest" | offset (int) | time (float seconds)


@dataclass(frozen=True, slots=True)
class StreamStats:
    name: str
    first_offset: int | None  # None: the stream holds nothing
    last_offset: int | None
    count: int
    bytes: int
    oldest_at: float | None
    budget_dropped: int = 0  # rows released early for the store budget, since start-up


def parse_position(text: str) -> Position:
    """`earliest`, `latest`, an integer offset, or an ISO-8601 UTC time (to seconds)."""
    value = text.strip()
    if value in ("earliest", "latest"):
        return value
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected earliest, latest, an offset or an ISO-8601 UTC time, "
                         f"got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _selection(log: Log, state: StreamState, topic_filter: str | None) -> dict[int, int]:
    """The stream's topics (those `topic_filter` matches) -> the offset after which their
    rows are the stream's: all of them, or for a last-value stream only each topic's newest
    (older rows another stream or a reader still holds are not compaction's to show)."""
    by_id = log.by_id
    selection: dict[int, int] = {}
    for tid in state.topics:
        stats = by_id[tid]
        if topic_filter is not None and not topic_matches(topic_filter, stats.name):
            continue
        if not state.config.last_value:
            selection[tid] = 0
        elif stats.last_offset is not None:
            selection[tid] = stats.last_offset - 1
    return selection


def _first_row(log: Log, conn: sqlite3.Connection, name: str,
               after: int) -> tuple[int, float] | None:
    state = log.streams[name]
    page = log.read_page(conn, max(after, state.first_offset - 1), _selection(log, state, None),
                         1)
    return (page.rows[0].offset, page.rows[0].at) if page.rows else None


def stream_stats(log: Log, conn: sqlite3.Connection, name: str) -> StreamStats:
    """First and last offsets, rows, bytes and oldest time of a stream (KeyError if unknown).
    Counters come from memory; the first row costs one index probe per topic at most (a
    last-value stream: its topics' newest rows are counted, one query)."""
    state = log.streams[name]
    first = _first_row(log, conn, name, 0) if state.count else None
    if first is None:
        return StreamStats(name, None, None, 0, 0, None, state.budget_dropped)
    last = max((log.by_id[t].last_offset or 0) for t in state.topics)
    count, size = state.count, state.bytes
    if state.config.last_value:
        newest = {tid: since + 1 for tid, since in _selection(log, state, None).items()
                  if since + 1 >= first[0]}
        count = len(newest)
        size = sum(log.by_id[tid].name_size for tid in newest)
        offsets = list(newest.values())
        for chunk in range(0, len(offsets), 500):
            part = offsets[chunk:chunk + 500]
            size += conn.execute(
                "SELECT coalesce(sum(length(payload) + coalesce(length(properties), 0)), 0)"
                f" FROM log WHERE offset IN ({', '.join('?' * len(part))})", part
            ).fetchone()[0]
    return StreamStats(name, first[0], last, count, size, first[1], state.budget_dropped)


def stream_start(log: Log, conn: sqlite3.Connection, name: str, position: Position) -> int:
    """The first offset a replay of stream `name` from `position` delivers (inclusive)."""
    state = log.streams[name]
    if position == "latest":
        return log.last_offset + 1
    if position == "earliest":
        first = _first_row(log, conn, name, 0)
        return first[0] if first is not None else log.last_offset + 1
    if isinstance(position, bool) or not isinstance(position, int | float):
        raise ValueError(f"not a replay position: {position!r}")
    offset = (max(position, 1) if isinstance(position, int)
              else log.first_offset_at(conn, position))
    if offset > log.last_offset:
        return offset  # past the last: wait for it
    first = _first_row(log, conn, name, max(offset, state.first_offset) - 1)
    return first[0] if first is not None else log.last_offset + 1


def replay(log: Log, conn: sqlite3.Connection, name: str, start: int,
           topic_filter: str | None = None, limit: int | None = None,
           page_size: int = 256) -> Iterator[LogRow]:
    """The rows of stream `name` from offset `start` (inclusive, see `stream_start`), in
    offset order, optionally only the topics `topic_filter` matches, at most `limit`."""
    state = log.streams[name]
    selection = _selection(log, state, topic_filter)
    after = max(start, state.first_offset) - 1
    left = limit
    while left is None or left > 0:
        page = log.read_page(conn, after, selection, page_size if left is None
                             else min(page_size, left))
        yield from page.rows
        if left is not None:
            left -= len(page.rows)
        if page.end == after:
            return
        after = page.end


def page_raw(log: Log, conn: sqlite3.Connection, name: str, after: int, until: int,
             topic_filter: str | None, limit: int) -> tuple[list[RawRow], int]:
    """One page of `$stream/` history: the rows of stream `name` (optionally only the topics
    `topic_filter` matches) with `after < offset <= until`, at most `limit`, as SQLite returns
    them (`Log.read_raw`: no `LogRow`, the core encodes packets from the stored bytes); and
    the offset up to which the range was looked at (`until` when it is complete)."""
    state = log.streams[name]
    selection = _selection(log, state, topic_filter)
    rows, end = log.read_raw(conn, max(after, state.first_offset - 1), selection, limit)
    if end < until:
        return rows, end  # a full page
    if rows and rows[-1][0] > until:
        rows = [row for row in rows if row[0] <= until]
    return rows, until


def open_read_only(path: str | Path) -> tuple[Log, sqlite3.Connection] | None:
    """The log of a store file opened read-only (mode=ro: safe while the broker writes, WAL
    gives a consistent view), with the streams as the file last recorded them (their bounds
    are not in the file and read as None); None if the file has no log yet. The caller
    closes the connection. Raises StoreError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store file")
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True,
                               isolation_level=None)
        if not has_schema(conn):
            conn.close()
            return None
        streams = [StreamConfig(name, topic_filter, None, None) for name, topic_filter in
                   conn.execute("SELECT name, filter FROM log_streams ORDER BY name")]
        log = Log(streams)
        conn.execute("BEGIN")  # one consistent view
        log.load(conn)  # writes nothing: every stream is in the file with its filter
    except sqlite3.Error as error:
        raise StoreError(f"{path}: cannot read the log: {error}") from None
    return log, conn


def read_streams(path: str | Path) -> list[StreamStats]:
    """`streams list` from the file, read-only (empty if the file has no log)."""
    opened = open_read_only(path)
    if opened is None:
        return []
    log, conn = opened
    try:
        return [stream_stats(log, conn, name) for name in sorted(log.streams)]
    finally:
        conn.close()
