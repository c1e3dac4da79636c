"""The log as a bridge's uplink process reads it: its own read connection to the store file.

The broker's store writes the file; this process only reads it (SQLite's WAL mode lets a
reader work beside the writer, each read seeing the last committed transaction). What the
broker's `StoreLogReader` (server/bridge_log.py) gets from the store's memory, this reader
takes from the tables:

- the bridge's filters and their `since` from `log_reader_filters` (read at start: they
  change only when the broker starts), and each topic's name from `log_topics` (cached);
  a row is the bridge's when its topic matches a filter and its offset is above that
  filter's since (the lowest since of the filters that match);
- the reader's stored offset from `log_readers` before each page: the broker moves it past
  rows dropped for `max_backlog_bytes` or the store budget, and pages start after it.

`ChildLogReader` is the `LogReader` (bridge/forward.py) of the process: pages are read on a
thread of their own, `wait_after` asks the broker to be woken by its next group commit (no
polling), and `commit_cursor` hands the acknowledged cursor, with the (offset, size) of the
rows it passes, to the broker, which stores it (server/bridge_proc.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from ..bridge.base import BridgeMessage
from ..mqtt.topics import topic_matches
from ..store.log.schema import decode_props

_COLUMNS: Final = "offset, at, topic_id, qos, retain, payload, properties, origin"
_SCAN: Final = f"SELECT {_COLUMNS} FROM log WHERE offset > ? ORDER BY offset LIMIT ?"
_READER_OFFSET: Final = "SELECT offset FROM log_readers WHERE name = ?"
_FILTERS: Final = "SELECT filter, since FROM log_reader_filters WHERE reader = ?"
_TOPIC: Final = "SELECT name FROM log_topics WHERE id = ?"
BUSY_TIMEOUT_MS: Final = 5000


@dataclass(slots=True)
class ChildRow:
    """A row of the bridge's, as the process reads it."""

    offset: int
    size: int
    origin: str
    message: BridgeMessage


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

    def reader_offset(self) -> int:
        row = self._db().execute(_READER_OFFSET, (self.reader,)).fetchone()
        return int(row[0]) if row is not None else 0

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

    def page(self, after: int, limit: int) -> tuple[list[ChildRow], int]:
        """Up to `limit` of the bridge's rows after max(after, the reader's stored offset),
        in order, and the page's end: every row of the bridge's up to it is in the page."""
        conn = self._db()
        lo = max(after, self.reader_offset())
        out: list[ChildRow] = []
        batch = max(limit, 64)
        while True:
            raws = conn.execute(_SCAN, (lo, batch)).fetchall()
            for raw in raws:
                offset = int(raw[0])
                name, name_size, since = self._topic(int(raw[2]))
                if since < 0 or offset <= since:
                    continue
                payload: bytes = raw[5]
                blob: bytes | None = raw[6]
                props = decode_props(blob)
                size = name_size + len(payload) + (len(blob) if blob else 0)
                origin = str(raw[7])
                message = BridgeMessage(
                    offset=offset, topic=name, payload=payload, qos=int(raw[3]),
                    retain=bool(raw[4]), publish_time=float(raw[1]), client_id=origin,
                    content_type=props.content_type,
                    payload_utf8=props.payload_format_indicator == 1,
                    user_properties=tuple(props.user_properties), size=size)
                out.append(ChildRow(offset, size, origin, message))
                if len(out) == limit:
                    return out, offset
            if len(raws) < batch:
                return out, int(raws[-1][0]) if raws else lo
            lo = int(raws[-1][0])


class ChildLogReader:
    """`LogReader` of the uplink process (see the module docstring). `send` puts one
    message to the broker; `last_committed` is what the broker said was committed."""

    def __init__(self, file: LogFile, skip_origin: str,
                 send: Callable[[tuple[Any, ...]], None], last_committed: int,
                 cursor: int) -> None:
        self.file = file
        self.skip_origin = skip_origin  # the bridge's downlink identity: not sent back up
        self.send = send
        self.last_committed = last_committed
        self.scanned = 0
        self.oldest_at: float | None = None
        self._rows: list[tuple[int, int]] = []  # (offset, size) read, not yet acknowledged
        self._acked = cursor  # the last cursor handed to the broker
        self._asked = -1  # the offset of the last "wait" sent
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bridge-log")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.file.close()

    def appended(self, offset: int) -> None:
        """The broker committed the log up to `offset`."""
        if offset > self.last_committed:
            self.last_committed = offset
        self._wakeup.set()

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        loop = asyncio.get_running_loop()
        rows, end = await loop.run_in_executor(self._pool, self.file.page, cursor, limit)
        kept = self._rows
        if kept and kept[-1][0] > cursor:  # read again from the cursor: replaces the rest
            kept[:] = [r for r in kept if r[0] <= cursor]
        kept.extend((row.offset, row.size) for row in rows)
        self.oldest_at = rows[0].message.publish_time if rows else None
        skip = self.skip_origin
        taken = [row.message for row in rows if row.origin != skip]
        if not taken:
            # Only its own (or nothing): the cursor moves past them at once, unless this
            # page was read ahead of a window still waiting for its acknowledgements.
            if rows and cursor <= self._acked:
                self._ack(end)
            self.scanned = max(self.scanned, end, cursor)
        return taken

    async def wait_after(self, cursor: int) -> None:
        mark = max(cursor, self.scanned)
        while self.last_committed <= mark:
            if self._asked != mark:
                self._asked = mark
                self.send(("wait", mark))
            self._wakeup.clear()
            await self._wakeup.wait()

    async def commit_cursor(self, cursor: int) -> None:
        self._ack(cursor)
        self.scanned = max(self.scanned, cursor)

    def _ack(self, cursor: int) -> None:
        if cursor <= self._acked:
            return
        self._acked = cursor
        rows = self._rows
        cut = len(rows)
        for i, (offset, _size) in enumerate(rows):
            if offset > cursor:
                cut = i
                break
        passed = rows[:cut]
        del rows[:cut]
        self.send(("ack", cursor, passed))
