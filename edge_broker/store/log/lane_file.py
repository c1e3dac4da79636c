"""The QoS 0 lane's own log (docs/bridges.md "The QoS 0 lane"): a SQLite file beside the
store, written by the broker (`LaneFile`, on its event loop) and read by one bridge's uplink
process (`LaneView`, server/bridge_lane_child.py).

The broker appends the QoS 0 messages that only this bridge's uplink takes, one row per
one or more event-loop turns (server/bridge_lane.py), as an opaque blob (the records of
store/log/lane_codec.py; read back by `load_blob`, which also reads the pickled lists of
earlier versions, refusing any global, so no code runs). A row (`first` = the lane offset
of its first message, `count` messages) costs one INSERT and one commit, not one per
message. Lane offsets count from 1 in the file and never repeat in it; with the store id
they make the message ids of the lane (a namespace of their own: `<store_id>q`).

- `cursor`: every lane offset up to it was acknowledged by the remote side (the process
  reports it, the broker stores it in `lane_meta`); rows entirely up to it are deleted.
- `max_backlog_bytes`: when the rows after the cursor exceed it, the oldest rows are deleted
  and the cursor moved past them; the messages are counted in `dropped` (kept in the file).
- A file made for another store (its `store_id` differs: the store was rebuilt) is emptied.

The broker is the only writer (single-writer, as the store). Writes are committed with
`synchronous = NORMAL` in WAL mode: a crash of the broker or of the process loses nothing
committed, a power loss the last commits (QoS 0 is at most once). The process reads with a
read-only connection; WAL lets it read beside the writer, each read seeing the last commit.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import sqlite3
from collections import deque
from typing import Any, Final
from urllib.parse import quote

from ...errors import StoreError
from .lane_codec import decode_records

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS lane_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lane (first INTEGER PRIMARY KEY, count INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL, at REAL NOT NULL, mark INTEGER NOT NULL, data BLOB NOT NULL)",
)
_SET: Final = "INSERT OR REPLACE INTO lane_meta (key, value) VALUES (?, ?)"


def _refuse_global(module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f"a lane blob names {module}.{name}")


# Loads only what a lane blob holds (lists, tuples, str, bytes, numbers, bools, None): every
# global (a class or function, the only way a pickle runs code) is refused, so a lane file
# written by someone else cannot make the process run anything. Made with type(), not a
# class statement: mypyc compiles a class statement into a native class, and a native
# subclass of the C `pickle.Unpickler` crashed the compiled process (SIGSEGV at the first
# load, so the compiled uplink process never forwarded a lane message). A staticmethod: a
# compiled function does not bind `self` as a Python one does.
_PlainUnpickler: Any = type("_PlainUnpickler", (pickle.Unpickler,),
                            {"find_class": staticmethod(_refuse_global)})


def load_blob(path: str, first: int, blob: bytes,
              count: int | None = None) -> list[tuple[Any, ...]]:
    """The records of the lane row at `first` (store/log/lane_codec.py's format; a pickled
    list, the format of earlier versions, is still read: rows an upgrade found in the file).
    A damaged blob (or one holding other than `count` messages, when given) raises
    StoreError naming the file, table and row."""
    records: list[tuple[Any, ...]]
    try:
        if blob[:1] == b"\x80":  # a pickle: written by an earlier version
            loaded = _PlainUnpickler(io.BytesIO(blob)).load()
            if not isinstance(loaded, list) or not all(
                    isinstance(r, tuple) and len(r) == 6 for r in loaded):
                raise ValueError("not a list of 6-item records")
            records = loaded
        else:
            records = decode_records(blob)
        if count is not None and len(records) != count:
            raise ValueError(f"{len(records)} messages in a row of {count}")
    except Exception as exc:  # a damaged blob: any error of the decoder
        raise StoreError(f"{path}: table lane, row first={first}: damaged batch of QoS 0 "
                         f"messages ({exc})") from exc
    return records


class LaneFile:
    """The broker's access to one bridge's lane file, the only writer (its event loop)."""

    def __init__(self, path: str, store_id: str, max_backlog_bytes: int = 0) -> None:
        """Raises StoreError naming the file when it cannot be opened or read (not a
        database, damaged, unwritable)."""
        self.path = path
        self.max_backlog_bytes = max_backlog_bytes
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the QoS 0 lane file: {exc}") from exc
        self._conn = conn
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                conn.execute(statement)
            meta = dict(conn.execute("SELECT key, value FROM lane_meta").fetchall())
            if meta.get("store_id", store_id) != store_id:
                conn.execute("DELETE FROM lane")
                meta = {}
            conn.execute(_SET, ("store_id", store_id))
            self.cursor = int(meta.get("cursor", 0))
            self.dropped = int(meta.get("dropped", 0))
            last = conn.execute("SELECT MAX(first + count) FROM lane").fetchone()[0]
            self.next_offset = max(int(last or 0), self.cursor + 1)
            self.backlog_bytes = int(conn.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM lane WHERE first + count - 1 > ?",
                (self.cursor,)).fetchone()[0])
            # (first, count, bytes, at, mark) of the rows after the cursor, oldest first
            self._rows: list[tuple[int, int, int, float, int]] = [
                (int(f), int(c), int(b), float(a), int(m)) for f, c, b, a, m in conn.execute(
                    "SELECT first, count, bytes, at, mark FROM lane "
                    "WHERE first + count - 1 > ? ORDER BY first", (self.cursor,))]
        except (sqlite3.Error, ValueError) as exc:  # ValueError: a damaged lane_meta value
            conn.close()
            raise StoreError(f"{path}: cannot open the QoS 0 lane file: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    @property
    def backlog_messages(self) -> int:
        return self.next_offset - 1 - self.cursor

    @property
    def oldest_at(self) -> float | None:
        return self._rows[0][3] if self._rows else None

    @property
    def pending_mark(self) -> int | None:
        """The `mark` of the oldest row not acknowledged yet (None: none)."""
        return self._rows[0][4] if self._rows else None

    def append(self, batches: list[tuple[int, int, float, bytes]], mark: int) -> int:
        """Store batches of (count, bytes, publish time of the first, blob), in one
        transaction, with `mark`: the broker's last log offset when the running process's
        lane opened (every message of the bridge's up to it in the log comes first; see
        server/bridge_lane_child.py `LogGate`). Then drop the oldest rows beyond
        `max_backlog_bytes`. Returns the number of messages dropped. A write that fails
        (disk full, I/O error) raises StoreError naming the file, and stores nothing."""
        try:
            return self._append(batches, mark)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: table lane: {exc}") from exc

    def _append(self, batches: list[tuple[int, int, float, bytes]], mark: int) -> int:
        # What a failed write must leave as it was (the rows and figures in memory).
        saved = (self.next_offset, self.backlog_bytes, self.cursor, self.dropped)
        kept_before = len(self._rows)
        rows = []
        for count, size, at, blob in batches:
            rows.append((self.next_offset, count, size, at, mark, blob))
            self._rows.append((self.next_offset, count, size, at, mark))
            self.next_offset += count
            self.backlog_bytes += size
        conn = self._conn
        try:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO lane (first, count, bytes, at, mark, data) VALUES (?, ?, ?, ?, ?, ?)",
                rows)
            dropped, cut = self._bound()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # no transaction if BEGIN failed
                conn.execute("ROLLBACK")
            del self._rows[kept_before:]
            self.next_offset, self.backlog_bytes, self.cursor, self.dropped = saved
            raise
        del self._rows[:cut]
        return dropped

    def _bound(self) -> tuple[int, int]:
        """Within append's transaction: delete the oldest rows beyond max_backlog_bytes.
        Returns (messages dropped, rows of `_rows` to remove once committed)."""
        limit = self.max_backlog_bytes
        if not limit or self.backlog_bytes <= limit:
            return 0, 0
        kept = self._rows
        cut = 0
        dropped = 0
        cursor = self.cursor
        while cut < len(kept) - 1 and self.backlog_bytes > limit:  # the newest row stays
            first, count, size, _at, _mark = kept[cut]
            last = first + count - 1
            dropped += last - max(cursor, first - 1)
            cursor = last
            self.backlog_bytes -= size
            cut += 1
        if not cut:
            return 0, 0
        self.cursor = cursor
        self.dropped += dropped
        conn = self._conn
        conn.execute("DELETE FROM lane WHERE first <= ?", (cursor,))
        conn.execute(_SET, ("cursor", str(cursor)))
        conn.execute(_SET, ("dropped", str(self.dropped)))
        return dropped, cut

    def commit_cursor(self, cursor: int) -> None:
        """Everything up to `cursor` was acknowledged: store it, delete the rows it passes.
        A write that fails raises StoreError and changes nothing (a later cursor is
        stored with the next acknowledgement)."""
        if cursor <= self.cursor:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN")
            conn.execute("DELETE FROM lane WHERE first <= ? AND first + count - 1 <= ?",
                         (cursor, cursor))
            conn.execute(_SET, ("cursor", str(cursor)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StoreError(f"{self.path}: table lane_meta, key cursor: {exc}") from exc
        self.cursor = cursor
        kept = self._rows
        cut = 0
        while cut < len(kept) and kept[cut][0] + kept[cut][1] - 1 <= cursor:
            self.backlog_bytes -= kept[cut][2]
            cut += 1
        del kept[:cut]


def _page(conn: sqlite3.Connection, after: int,
          limit: int) -> list[tuple[int, int, int, bytes]]:
    """(first offset, count, mark, blob) of the rows holding the offsets after `after`, up
    to about `limit` messages, in order."""
    row = conn.execute("SELECT MAX(first) FROM lane WHERE first <= ?", (after + 1,)).fetchone()
    start = int(row[0]) if row is not None and row[0] is not None else after + 1
    out: list[tuple[int, int, int, bytes]] = []
    taken = 0
    for first, count, mark, data in conn.execute(
            "SELECT first, count, mark, data FROM lane WHERE first >= ? ORDER BY first",
            (start,)):
        out.append((int(first), int(count), int(mark), bytes(data)))
        taken += int(first) + int(count) - 1 - max(after, int(first) - 1)
        if taken >= limit:
            break
    return out


class LaneView:
    """The uplink process's read-only view of the lane file. The broker tells it what it
    committed (`refresh`: the last offset written, and the cursor below which rows were
    deleted: acknowledged, or dropped for max_backlog_bytes); it keeps the (first, count,
    mark) of the rows after its cursor, oldest first, and reads the blobs by page."""

    def __init__(self, path: str, cursor: int, last: int) -> None:
        self.path = path
        self._conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True,
                                     isolation_level=None, check_same_thread=False)
        self.cursor = cursor  # acknowledged by this process, or deleted by the broker
        self.next_offset = cursor + 1  # after the last row known
        self._rows: deque[tuple[int, int, int]] = deque()
        for first, count, mark in self._conn.execute(
                "SELECT first, count, mark FROM lane WHERE first + count - 1 > ? "
                "AND first <= ? ORDER BY first", (cursor, last)):
            self._add(int(first), int(count), int(mark))
        self.next_offset = max(self.next_offset, last + 1)

    def _add(self, first: int, count: int, mark: int) -> None:
        self._rows.append((first, count, mark))
        self.next_offset = first + count

    def refresh(self, last: int, floor: int) -> None:
        """The broker committed the rows up to offset `last` and deleted those up to
        `floor`."""
        if last >= self.next_offset:
            for first, count, mark in self._conn.execute(
                    "SELECT first, count, mark FROM lane WHERE first >= ? AND first <= ? "
                    "ORDER BY first", (self.next_offset, last)):
                self._add(int(first), int(count), int(mark))
            self.next_offset = max(self.next_offset, last + 1)
        self.advance(floor)

    def poll(self) -> bool:
        """Read the rows the broker committed past the last one known, without waiting for
        its word (the process asks for that only once it has read everything: a busy
        process learns of new rows here). Returns whether any was found."""
        before = self.next_offset
        for first, count, mark in self._conn.execute(
                "SELECT first, count, mark FROM lane WHERE first >= ? ORDER BY first",
                (before,)):
            self._add(int(first), int(count), int(mark))
        return self.next_offset != before

    def advance(self, cursor: int) -> None:
        if cursor <= self.cursor:
            return
        self.cursor = cursor
        rows = self._rows
        while rows and rows[0][0] + rows[0][1] - 1 <= cursor:
            rows.popleft()

    @property
    def pending_mark(self) -> int | None:
        """The `mark` of the oldest row not acknowledged yet (None: none)."""
        return self._rows[0][2] if self._rows else None

    def mark_after(self, after: int) -> int | None:
        """The `mark` of the row holding the offset after `after` (None: no such row)."""
        for first, count, mark in self._rows:
            if first + count - 1 > after:
                return mark
        return None

    def page(self, after: int, limit: int) -> list[tuple[int, int, int, bytes]]:
        return _page(self._conn, after, limit)

    def close(self) -> None:
        self._conn.close()
