"""`Log`: append, read in pages and look up by time, over the `log` table (the read side is
its base class, pages.py; the records it keeps are records.py).

The object holds what must be known without touching the rows: the last offset and `at`,
the interned topics with their counters, and which streams and readers each topic feeds.
Every method that writes takes the store's connection and runs inside the caller's
transaction; none begins or commits one. After a transaction the caller rolled back, call
`load()` again: the in-memory state is then ahead of the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, Final

from ...core.changes import SubscriptionRecord
from ...core.router import Router
from ...mqtt.properties import NO_PROPERTIES
from ...mqtt.topics import topic_matches
from .pages import LogPages
from .records import (
    LOG_COLUMNS,
    Appendable,
    LogMessage,
    LogRow,
    Page,
    RawRow,
    Reader,
    StreamState,
    TopicStats,
    log_row,
)
from .schema import encode_props, ensure_schema
from .streams import StreamConfig

# The records are defined in records.py, the read side in pages.py; their names are also
# importable from here, as before the split.
__all__ = ["LOG_COLUMNS", "Appendable", "Log", "LogMessage", "LogRow", "Page", "RawRow",
           "Reader", "StreamState", "TopicStats", "log_row", "transaction"]

_CHUNKS: Final = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_COLUMNS: Final = LOG_COLUMNS
_WIDTH: Final = 9  # columns per row
_INSERT_HEAD: Final = f"INSERT INTO log ({_COLUMNS}) VALUES "
_ROW_GROUP: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_SQL: Final = {n: _INSERT_HEAD + ", ".join([_ROW_GROUP] * n) for n in _CHUNKS}
# Multi-row UPDATEs of log_readers, keyed by name (the first value of each row).
_UPDATE_CHUNKS: Final = (32, 8, 2, 1)
_READERS_UPDATE: Final = {n: (
    "UPDATE log_readers SET offset = v.column2, backlog_count = v.column3,"
    " backlog_bytes = v.column4, dropped = v.column5 FROM (VALUES "
    + ", ".join(["(?, ?, ?, ?, ?)"] * n) + ") AS v WHERE log_readers.name = v.column1")
    for n in _UPDATE_CHUNKS}
_COUNTED_UPDATE: Final = {n: (
    "UPDATE log_readers SET queued_count = v.column2, queued_bytes = v.column3,"
    " queued_skip = v.column4 FROM (VALUES " + ", ".join(["(?, ?, ?, ?)"] * n)
    + ") AS v WHERE log_readers.name = v.column1") for n in _UPDATE_CHUNKS}


def _update_many(conn: sqlite3.Connection, sql: Mapping[int, str],
                 rows: Sequence[tuple[Any, ...]]) -> None:
    """Rows of one multi-row UPDATE (`sql[n]` takes n rows), in chunks of the sizes it has."""
    start = 0
    total = len(rows)
    for chunk in _UPDATE_CHUNKS:
        while total - start >= chunk:
            conn.execute(sql[chunk], tuple(chain.from_iterable(rows[start:start + chunk])))
            start += chunk


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT (standalone use; the store wraps its own groups)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.commit()


class Log(LogPages):
    """The in-memory side of the log; see the module docstring. Reading pages: pages.py."""

    def __init__(self, streams: Sequence[StreamConfig] = ()) -> None:
        self.stream_configs = tuple(streams)
        self._reset()

    def _reset(self) -> None:
        self.last_offset = 0
        self.last_at = 0.0
        self.total_count = 0
        self.total_bytes = 0
        self.topics: dict[str, TopicStats] = {}
        self.by_id = {}
        self.streams: dict[str, StreamState] = {}
        self.readers: dict[str, Reader] = {}
        self.topic_streams: dict[int, list[StreamState]] = {}
        self.topic_readers: dict[int, list[Reader]] = {}
        # Every reader filter, as the core's subscription trie (client id = reader name): a
        # topic is matched against all readers in one walk (start-up, a new topic).
        self._router = Router()

    # -- loading --------------------------------------------------------------------------

    def load(self, conn: sqlite3.Connection) -> None:
        """(Re)read the state from the file: counters and cursors, never the rows. A stream
        that is new in the configuration starts at the next offset; one whose filter changed
        has its count and bytes recomputed (a scan of its topics, only then); one no longer
        configured is forgotten (its rows then go unless another holder keeps them). Those
        stream changes are the only writes: run it in a transaction (or autocommit)."""
        ensure_schema(conn)
        # Readers' `advanced` is memory only: kept across a reload (after a failed
        # transaction), never above the offset read back (cursors.py `advance`).
        advanced = {name: reader.advanced for name, reader in self.readers.items()}
        self._reset()
        self.last_offset, self.last_at = conn.execute(
            "SELECT last_offset, last_at FROM log_state WHERE id = 0").fetchone()
        for tid, name, count, size, first, last in conn.execute(
                "SELECT id, name, count, bytes, first_offset, last_offset FROM log_topics"):
            stats = TopicStats(tid, name, len(name.encode()), count, size, first, last)
            self.topics[name] = self.by_id[tid] = stats
            self.total_count += count
            self.total_bytes += size
        for name, offset, count, size, dropped in conn.execute(
                "SELECT name, offset, backlog_count, backlog_bytes, dropped FROM log_readers"):
            self.readers[name] = Reader(name, offset, backlog_count=count,
                                        backlog_bytes=size, dropped=dropped)
        for name, reader in self.readers.items():
            before = advanced.get(name, -1)
            if before >= 0:
                reader.advanced = min(before, reader.offset)
        for name, topic_filter, since in conn.execute(
                "SELECT reader, filter, since FROM log_reader_filters"):
            self.readers[name].filters[topic_filter] = since
        for name, packet_id, offset, state in conn.execute(
                "SELECT reader, packet_id, offset, state FROM log_inflight"):
            self.readers[name].inflight[packet_id] = (offset, state)
        for reader in self.readers.values():
            for topic_filter in reader.filters:
                self._router.subscribe(SubscriptionRecord(reader.name, topic_filter, 0),
                                       topic_filter)
        for stats in self.by_id.values():
            self._match_readers(stats)
        stored = {row[0]: row[1:] for row in conn.execute(
            "SELECT name, filter, first_offset, first_at, count, bytes FROM log_streams")}
        for config in self.stream_configs:
            row = stored.pop(config.name, None)
            state = StreamState(config, self.last_offset + 1)
            self.streams[config.name] = state
            self._index_stream(state)
            if row is None:
                conn.execute("INSERT INTO log_streams (name, filter, first_offset) "
                             "VALUES (?, ?, ?)", (config.name, config.filter,
                                                  state.first_offset))
                continue
            state.first_offset, state.first_at, state.count, state.bytes = row[1:]
            if row[0] != config.filter:
                self._recount_stream(conn, state)
        for name in stored:
            conn.execute("DELETE FROM log_streams WHERE name = ?", (name,))

    def _recount_stream(self, conn: sqlite3.Connection, state: StreamState) -> None:
        state.count = state.bytes = 0
        state.first_at = None
        for tid in state.topics:
            stats = self.by_id[tid]
            count, size = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload) + coalesce(length(properties),"
                " 0)), 0) FROM log WHERE topic_id = ? AND offset >= ?",
                (tid, state.first_offset)).fetchone()
            state.count += count
            state.bytes += size + count * stats.name_size
        first = self.read_page(conn, state.first_offset - 1, self.stream_selection(state), 1)
        state.first_at = first.rows[0].at if first.rows else None
        self.save_stream(conn, state)

    # -- topic matching -------------------------------------------------------------------

    def _index_stream(self, state: StreamState) -> None:
        for stats in self.by_id.values():
            if topic_matches(state.config.filter, stats.name):
                state.topics.add(stats.id)
                self.topic_streams.setdefault(stats.id, []).append(state)

    def set_filter(self, reader: Reader, topic_filter: str, since: int) -> None:
        reader.filters[topic_filter] = since
        self._router.subscribe(SubscriptionRecord(reader.name, topic_filter, 0), topic_filter)
        self.index_reader(reader)

    def remove_filter(self, reader: Reader, topic_filter: str) -> bool:
        if reader.filters.pop(topic_filter, None) is None:
            return False
        self._router.unsubscribe(reader.name, topic_filter)
        self.index_reader(reader)
        return True

    def forget_reader(self, reader: Reader) -> None:
        for topic_filter in reader.filters:
            self._router.unsubscribe(reader.name, topic_filter)
        reader.filters = {}
        self.index_reader(reader)
        self.readers.pop(reader.name, None)

    def _match_readers(self, stats: TopicStats) -> None:
        """Add a topic to every reader one of whose filters matches it (one trie walk)."""
        records, _ = self._router.match(stats.name)
        for record in records:
            reader = self.readers[record.client_id]
            since = reader.filters[record.topic_filter]
            seen = reader.topics.get(stats.id)
            if seen is None:
                self.topic_readers.setdefault(stats.id, []).append(reader)
                reader.topics[stats.id] = since
            elif since < seen:
                reader.topics[stats.id] = since

    def index_reader(self, reader: Reader) -> None:
        """(Re)compute which topics a reader selects, with their since (after its filters
        changed: one match per topic and filter of this reader)."""
        for tid in reader.topics:
            holders = self.topic_readers.get(tid)
            if holders is not None and reader in holders:
                holders.remove(reader)
        reader.topics = {}
        for stats in self.by_id.values():
            self._match_reader(reader, stats)

    def _match_reader(self, reader: Reader, stats: TopicStats) -> None:
        since = None
        for topic_filter, filter_since in reader.filters.items():
            if topic_matches(topic_filter, stats.name) and (since is None or filter_since < since):
                since = filter_since
        if since is not None:
            if stats.id not in reader.topics:
                self.topic_readers.setdefault(stats.id, []).append(reader)
            reader.topics[stats.id] = since

    def _intern(self, conn: sqlite3.Connection, topic: str) -> TopicStats:
        cursor = conn.execute("INSERT INTO log_topics (name) VALUES (?)", (topic,))
        tid = cursor.lastrowid
        assert tid is not None
        stats = TopicStats(tid, topic, len(topic.encode()))
        self.topics[topic] = self.by_id[tid] = stats
        for state in self.streams.values():
            if topic_matches(state.config.filter, topic):
                state.topics.add(tid)
                self.topic_streams.setdefault(tid, []).append(state)
        self._match_readers(stats)
        return stats

    def streams_of(self, topic: str) -> list[str]:
        """Names of the streams that record `topic` (whether or not it was seen before)."""
        stats = self.topics.get(topic)
        if stats is not None:
            return [s.config.name for s in self.topic_streams.get(stats.id, ())]
        return [s.config.name for s in self.streams.values()
                if topic_matches(s.config.filter, topic)]

    def selection(self, filters: Mapping[str, int]) -> dict[int, int]:
        """Topic id -> since for a set of filters (filter -> since); for `read_page`."""
        out: dict[int, int] = {}
        for stats in self.by_id.values():
            for topic_filter, since in filters.items():
                if topic_matches(topic_filter, stats.name):
                    seen = out.get(stats.id)
                    if seen is None or since < seen:
                        out[stats.id] = since
        return out

    def stream_selection(self, state: StreamState) -> dict[int, int]:
        return dict.fromkeys(state.topics, 0)

    # -- append ---------------------------------------------------------------------------

    def append(self, conn: sqlite3.Connection, messages: Sequence[Appendable],
               now: float) -> list[int]:
        """Append messages (in order) stamped `max(now, last at)`; returns their offsets,
        which are `last_offset + 1 ...` (never reused: `log_state` keeps the last one)."""
        if not messages:
            return []
        at = now if now > self.last_at else self.last_at
        offset = self.last_offset
        rows: list[Any] = []  # the rows' values, one after the other (9 per row)
        # Per topic touched: [rows, bytes] of this group; streams and readers are credited
        # once per topic after the loop, not once per message.
        group: dict[int, list[int]] = {}
        topics = self.topics
        append = rows.extend  # flat: the multi-row INSERTs take one flat tuple each
        stats: TopicStats | None = None
        topic = None
        counts: list[int] = []
        for message in messages:
            if message.topic != topic:  # runs of one topic are the common case
                topic = message.topic
                stats = topics.get(topic)
                if stats is None:
                    stats = self._intern(conn, topic)
                if stats.first_offset is None:
                    stats.first_offset = offset + 1
                seen = group.get(stats.id)
                if seen is None:
                    seen = group[stats.id] = [0, 0]
                counts = seen
            assert stats is not None
            offset += 1
            payload = message.payload
            properties = message.properties
            if properties is NO_PROPERTIES:
                props = None
                size = stats.name_size + len(payload)
            else:
                props = encode_props(properties)
                size = stats.name_size + len(payload) + (len(props) if props else 0)
            append((offset, at, stats.id, message.qos, message.retain, payload, props,
                    message.origin, message.expires_at))
            stats.last_offset = offset
            counts[0] += 1
            counts[1] += size
        streams: dict[str, StreamState] = {}
        readers: dict[str, Reader] = {}
        touched: list[TopicStats] = []
        for tid, (count, size) in group.items():
            stats = self.by_id[tid]
            stats.count += count
            stats.bytes += size
            touched.append(stats)
            self.total_count += count
            self.total_bytes += size
            for state in self.topic_streams.get(tid, ()):
                if state.count == 0:
                    state.first_at = at
                state.count += count
                state.bytes += size
                streams[state.config.name] = state
            for reader in self.topic_readers.get(tid, ()):
                reader.backlog_count += count
                reader.backlog_bytes += size
                readers[reader.name] = reader
        # Few statements: each is a step with the GIL released, and the writer thread must
        # win the GIL back from a busy event loop after every one of them.
        start = 0
        total = len(rows)
        for chunk in _CHUNKS:
            width = chunk * _WIDTH
            while total - start >= width:
                conn.execute(_INSERT_SQL[chunk], rows[start:start + width])
                start += width
        if len(touched) == 1:
            self.save_topic(conn, touched[0])
        else:
            conn.executemany(
                "UPDATE log_topics SET count = ?, bytes = ?, first_offset = ?, last_offset = ?"
                " WHERE id = ?",
                [(s.count, s.bytes, s.first_offset, s.last_offset, s.id) for s in touched])
        conn.execute("UPDATE log_state SET last_offset = ?, last_at = ? WHERE id = 0",
                     (offset, at))
        for state in streams.values():
            self.save_stream(conn, state)
        self.save_readers(conn, list(readers.values()))
        first = self.last_offset + 1
        self.last_offset = offset
        self.last_at = at
        return list(range(first, offset + 1))

    def save_stream(self, conn: sqlite3.Connection, state: StreamState) -> None:
        conn.execute("UPDATE log_streams SET first_offset = ?, first_at = ?, count = ?,"
                     " bytes = ? WHERE name = ?", (state.first_offset, state.first_at,
                                                   state.count, state.bytes, state.config.name))

    def save_readers(self, conn: sqlite3.Connection, readers: Sequence[Reader]) -> None:
        """`save_reader` for many readers, in a few multi-row statements (not one each)."""
        _update_many(conn, _READERS_UPDATE, [
            (r.name, r.offset, r.backlog_count, r.backlog_bytes, r.dropped) for r in readers])

    def save_counted(self, conn: sqlite3.Connection,
                     counted: Sequence[tuple[str, int, int, int]]) -> None:
        """The sessions' own counts of their backlogs ((reader, count, bytes, skip); see
        `ReaderCounted`), in a few multi-row statements; unknown readers are skipped."""
        readers = self.readers
        _update_many(conn, _COUNTED_UPDATE, [row for row in counted if row[0] in readers])

    def save_reader(self, conn: sqlite3.Connection, reader: Reader) -> None:
        conn.execute("UPDATE log_readers SET offset = ?, backlog_count = ?, backlog_bytes = ?,"
                     " dropped = ? WHERE name = ?", (reader.offset, reader.backlog_count,
                                                     reader.backlog_bytes, reader.dropped,
                                                     reader.name))

    def save_topic(self, conn: sqlite3.Connection, stats: TopicStats) -> None:
        conn.execute("UPDATE log_topics SET count = ?, bytes = ?, first_offset = ?,"
                     " last_offset = ? WHERE id = ?", (stats.count, stats.bytes,
                                                       stats.first_offset, stats.last_offset,
                                                       stats.id))
