"""The uplink process's read side of the QoS 0 lane's file (store/log/lane_file.py, whose
docstring has the theory): `LaneView`, a read-only connection, and `load_blob`, which reads a
row's records (store/log/lane_codec.py's format, or the pickled lists of earlier versions,
refusing any global, so no code runs)."""

from __future__ import annotations

import io
import pickle
import sqlite3
from collections import deque
from typing import Any
from urllib.parse import quote

from ...errors import StoreError
from .lane_codec import decode_records


def take_runs(runs: deque[list[int]], upto: int) -> int:
    """Take the offsets up to `upto` off the front of `runs` ([first, last] runs of lane
    offsets, oldest first; a run across `upto` is cut there). Returns how many."""
    taken = 0
    while runs and runs[0][0] <= upto:
        first, last = runs[0]
        if last <= upto:
            taken += last - first + 1
            runs.popleft()
        else:
            taken += upto - first + 1
            runs[0][0] = upto + 1
            break
    return taken


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
        """A row found in the file; not kept when it is at or below the cursor (the word of
        its drop came before the row was read: it is deleted in a later commit)."""
        if first + count - 1 > self.cursor:
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
