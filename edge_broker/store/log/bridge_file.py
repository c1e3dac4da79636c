"""A bridge's rows read from the store file by another process (the uplink process of
`separate_process = true`, server/bridge_child.py): its own read-only connection, beside the
broker's writer (WAL mode: each read sees the last committed transaction, and never blocks
the writer; reads are single statements in autocommit, no transaction is held open).

What the broker's log keeps in memory (store/log/log.py), this reader takes from the tables:

- the bridge's filters and their `since` from `log_reader_filters` (read at open: they change
  only when the broker starts), and each topic's name from `log_topics` (cached); a row is
  the bridge's when its topic matches a filter and its offset is above that filter's since
  (the lowest since of the filters that match);
- the reader's stored offset from `log_readers` before each page: the broker moves it past
  rows dropped for `max_backlog_bytes` or the store budget, and pages start after it.

Pages read the log in offset order (the primary key) and keep the bridge's rows; unlike the
broker's reader they do not use the per-topic index for narrow filters. `page` returns
`LogRow`s; `page_of` makes each row it keeps with a row factory from the columns of
`BRIDGE_COLUMNS` (the uplink process makes the bridge's message straight from the raw row:
no `LogRow` in between, server/bridge_log.py `raw_bridge_message`).

`BRIDGE_COLUMNS` packs the log's eight columns a bridge needs into five: topic id, QoS and
retain in one integer (`topic_id * 8 + qos * 2 + retain`), and the origin (the publishing
client id) with the properties in one value (the origin as text when the row has no
properties, the usual case; else a blob `<len(properties)>:<properties><origin UTF-8>`).
Python 3.11's `_sqlite3` releases and retakes the GIL once per column of every row fetched
(`sqlite3_column_type`), which was the largest single cost of a drained row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

from ...mqtt.topics import topic_matches
from .log import LOG_COLUMNS, LogRow, log_row

# The columns `page_of` reads (see the module docstring): offset, at, topic_id * 8 + qos * 2
# + retain, payload, and the origin (text) or `<len(properties)>:<properties><origin>`
# (blob). Not read: expires_at (a bridge forwards a message whatever its expiry).
BRIDGE_COLUMNS: Final = (
    "offset, at, topic_id * 8 + qos * 2 + retain, payload,"
    " CASE WHEN properties IS NULL THEN origin"
    " ELSE CAST(length(properties) || ':' || properties || origin AS BLOB) END")
_SCAN_ROWS: Final = " FROM log WHERE offset > ? ORDER BY offset LIMIT ?"
_SCAN: Final = f"SELECT {LOG_COLUMNS}{_SCAN_ROWS}"
_SCAN_BRIDGE: Final = f"SELECT {BRIDGE_COLUMNS}{_SCAN_ROWS}"
# The reader's stored offset and the log's last offset, in one statement (one snapshot).
_OFFSETS: Final = ("SELECT (SELECT offset FROM log_readers WHERE name = ?),"
                   " (SELECT last_offset FROM log_state WHERE id = 0)")
_FILTERS: Final = "SELECT filter, since FROM log_reader_filters WHERE reader = ?"
_TOPIC: Final = "SELECT name FROM log_topics WHERE id = ?"
BUSY_TIMEOUT_MS: Final = 5000

T = TypeVar("T")


class LogFile:
    """Synchronous reads of one bridge's rows (on the reader's own thread)."""

    def __init__(self, path: str, reader: str) -> None:
        self.path = path
        self.reader = reader
        self._conn: sqlite3.Connection | None = None
        self.filters: list[tuple[str, int]] = []
        # topic id -> (name, UTF-8 size of the name, since or -1 when no filter matches)
        self._topics: dict[int, tuple[str, int, int]] = {}

    def open(self) -> None:
        uri = f"file:{quote(str(Path(self.path).resolve()))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._conn = conn
        self.filters = [(str(f), int(s)) for f, s in conn.execute(_FILTERS, (self.reader,))]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.open()
        assert self._conn is not None
        return self._conn

    def offsets(self) -> tuple[int, int]:
        """(the reader's stored offset (0: no such reader), the log's last offset)."""
        reader, last = self._db().execute(_OFFSETS, (self.reader,)).fetchone()
        return (int(reader) if reader is not None else 0), int(last)

    def _topic(self, tid: int) -> tuple[str, int, int]:
        known = self._topics.get(tid)
        if known is not None:
            return known
        row = self._db().execute(_TOPIC, (tid,)).fetchone()
        name = str(row[0]) if row is not None else ""
        since = -1
        for topic_filter, filter_since in self.filters:
            if name and topic_matches(topic_filter, name) and (since < 0
                                                               or filter_since < since):
                since = filter_since
        entry = (name, len(name.encode()), since)
        self._topics[tid] = entry
        return entry

    def page(self, after: int, limit: int) -> tuple[list[LogRow], int]:
        """Up to `limit` of the bridge's rows after max(after, the reader's stored offset),
        in order, and the page's end: every row of the bridge's up to it is in the page."""
        return self._scan(_SCAN, log_row, after, limit, 0)

    def page_of(self, make: Callable[[Sequence[Any], str, int], T], after: int,
                limit: int) -> tuple[list[T], int]:
        """`page`, each kept row made by `make(raw row, topic name, its UTF-8 size)` from
        the columns of BRIDGE_COLUMNS (see there)."""
        return self._scan(_SCAN_BRIDGE, make, after, limit, 3)

    def _scan(self, sql: str, make: Callable[[Sequence[Any], str, int], T], after: int,
              limit: int, shift: int) -> tuple[list[T], int]:
        """The scan of `page` and `page_of`: the third column is the topic id shifted left
        by `shift` bits (with QoS and retain below it for `page_of`). A scan that reaches the
        end of the table ends at least at the log's last offset, read before it: offsets up
        to there whose rows were deleted (retention) are passed, as the broker's own reader
        does, else a reader waiting for the log to go past its end would be woken at once,
        for ever (found by the review of round 11: 29,912 page reads in 0.3 s)."""
        conn = self._db()
        stored, last = self.offsets()
        lo = max(after, stored)
        out: list[T] = []
        batch = max(limit, 64)
        topics = self._topics
        while True:
            raws = conn.execute(sql, (lo, batch)).fetchall()
            for raw in raws:
                offset = raw[0]
                tid = raw[2] >> shift
                known = topics.get(tid)
                name, name_size, since = known if known is not None else self._topic(tid)
                if since < 0 or offset <= since:
                    continue
                out.append(make(raw, name, name_size))
                if len(out) == limit:
                    return out, offset
            if len(raws) < batch:
                return out, max(int(raws[-1][0]) if raws else lo, last)
            lo = int(raws[-1][0])
