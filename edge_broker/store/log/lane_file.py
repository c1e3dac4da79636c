"""The QoS 0 lane's own log (docs/bridges.md "The QoS 0 lane"): a SQLite file beside the
store, written by the broker (`LaneFile`: figures on its event loop, writes on a thread of the
file's own) and read by one bridge's uplink process (`LaneView`, store/log/lane_view.py;
server/bridge_lane_child.py).

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
  and the cursor moved past them; the messages are counted in `dropped` (kept in the file),
  which only grows. Until the process says which of them it had read already (`held`: the
  [first, last] runs it may still send; the broker tells it of the drop at once,
  server/bridge_lane.py)
  they are unsettled (in neither figure); those it holds are settled by its next
  acknowledgement (`commit_cursor`: the ones it delivered count as forwarded), by its next
  answer (it gave up the window holding them: a failure, a resend; they count as dropped),
  or when its next run starts (`settle`).
- A file made for another store (its `store_id` differs: the store was rebuilt) is emptied.

The broker is the only writer (single-writer, as the store). Writes are committed with
`synchronous = NORMAL` in WAL mode: a crash of the broker or of the process loses nothing
committed, a power loss the last commits (QoS 0 is at most once). They run on the file's
writer thread, in the order asked for: SQLite's WAL auto-checkpoint, which copies the WAL
into the file and syncs it inside a commit every ~1,000 pages (tens of ms on an SD card),
then holds that thread, not the broker's event loop. The rows queued while it writes go in
its next statement (one INSERT, autocommit). The process reads with a read-only connection;
WAL lets it read beside the writer, each read seeing the last commit; it is told of a row
only after its commit. `close` does not wait for the thread (`aclose` awaits it without
holding the loop); a file whose previous writer thread still runs is not opened again (one
writer per file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, Final

from ...errors import StoreError
from .lane_view import take_runs

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS lane_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lane (first INTEGER PRIMARY KEY, count INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL, at REAL NOT NULL, mark INTEGER NOT NULL, data BLOB NOT NULL)",
)
_SET: Final = "INSERT OR REPLACE INTO lane_meta (key, value) VALUES (?, ?)"
# What may wait for the writer thread (LaneFile.queue_full): at most this many row writes
# and bytes of messages (a row is up to 256 KiB, or 1 MiB gathered while the writer is
# behind: server/bridge_lane.py). The bytes are what a stall of the disk (a WAL checkpoint's
# sync, the scheduler) can absorb in memory before QoS 0 messages are dropped: 16 MiB is
# 0.3-0.5 s of S1 with every message uplinked at 300,000-500,000 msgs/s. Until round 9 it
# was 8 rows (2 MiB at most), and S1 at ~200,000 msgs/s and more dropped 1-8 % of the lane's
# messages (benchmarks.s1_uplink; h9 in benchmarks/ANALYSIS.md).
MAX_QUEUED_ROWS: Final = 64
MAX_QUEUED_BYTES: Final = 16 * 1024 * 1024
# Rows the writer thread writes in one statement at most (those queued meanwhile).
MAX_ROWS_PER_WRITE: Final = 64
_ROW_VALUES: Final = "(?, ?, ?, ?, ?, ?)"
_INSERT: Final = "INSERT INTO lane (first, count, bytes, at, mark, data) VALUES "
_STOP: Final = ("stop",)
CLOSE_TIMEOUT_S: Final = 10.0
# The writer thread of each lane file this process opened (by real path): a file is not
# opened again while its previous writer still writes (`LaneFile.close` does not wait). A
# writer removes its own entry as the last thing it does (`LaneFile._run`).
_WRITERS: Final[dict[str, threading.Thread]] = {}

log = logging.getLogger("edge_broker.bridges")


class LaneFile:
    """The broker's access to one bridge's lane file, its only writer.

    The figures (offsets, cursor, backlog, drops, the rows after the cursor) live on the
    broker's event loop and change there at once; the writes - INSERT, DELETE, COMMIT, and
    SQLite's WAL checkpoint, which runs inside a COMMIT every ~1,000 pages and syncs the file -
    run on a thread of the file's own, in the order they were asked for, so no sync holds the
    loop. Between the two, a queue of at most `max_queued_rows` row writes and
    `max_queued_bytes` of messages (`queue_full`: the lane then keeps gathering, see
    server/bridge_lane.py). `next_offset` is what a reader
    of the file can see (after the last committed row), `queued_next` the next offset to
    give; a row the thread could not write is reported by `collect`, on the loop."""

    def __init__(self, path: str, store_id: str, max_backlog_bytes: int = 0, *,
                 max_queued_rows: int = MAX_QUEUED_ROWS,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        """Raises StoreError naming the file when it cannot be opened or read (not a
        database, damaged, unwritable), or while the writer thread of its previous opening
        still finishes its writes (a stalled disk; tried again later)."""
        self.path = path
        key = self._key = os.path.realpath(path)
        previous = _WRITERS.get(key)
        if previous is not None and previous.is_alive():
            raise StoreError(f"{path}: cannot open the QoS 0 lane file: its previous writer "
                             "thread is still finishing its writes")
        self.max_backlog_bytes = max_backlog_bytes
        self.max_queued_rows = max_queued_rows
        self.max_queued_bytes = max_queued_bytes
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the QoS 0 lane file: {exc}") from exc
        self._conn = conn
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA secure_delete = OFF")  # as the store's (sqlite/opening.py)
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
        self.queued_next = self.next_offset  # the loop's: the next offset to give
        # The cursor the process acknowledged (`cursor` is past it when max_backlog_bytes
        # dropped the rows after it).
        self._acked = self.cursor
        # Called on the writer thread after each write it finished (server/bridge_lane.py
        # hops to the loop from there); None: nobody listens.
        self.on_written: Callable[[], None] | None = None
        self._ops: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._rows_put = 0  # row writes queued (the loop's)
        self._rows_done = 0  # ... and finished (the thread's)
        self._bytes_put = 0  # bytes of messages in the row writes queued (the loop's)
        self._bytes_done = 0  # ... and finished (the thread's)
        self._cursor_target = self.cursor  # the acknowledged cursor to store (the loop's)
        self._cursor_queued = False  # a cursor write is in the queue, not started yet
        self._stored_cursor = self.cursor  # the thread's: the cursor in lane_meta
        # The cursor max_backlog_bytes moved last (at a row's end; the loop's), and up to
        # where the thread deleted for it: a failed write's drop is done by the next one.
        self._bound_cursor = self.cursor
        self._bound_deleted = self.cursor
        # (firsts, messages, bytes, error) of row writes that failed (thread -> loop)
        self._failed: deque[tuple[list[int], int, int, str]] = deque()
        self._lost = 0  # messages of failed writes taken from the figures, not yet collected
        self._lost_error = ""
        # Dropped for max_backlog_bytes, not yet in `dropped` (the process may still send
        # them: see `held`, `commit_cursor`): [first, last] runs, oldest first.
        self._unsettled: deque[list[int]] = deque()
        self._unsettled_count = 0
        self._drop_total = self.dropped  # `dropped` and the unsettled: what lane_meta keeps
        self.answered_to = self.cursor  # the last drop floor the process answered (`held`)
        self._closed = False
        # (Not `_thread`: mypyc names the C struct member `__thread`, a C keyword.)
        self._writer = threading.Thread(target=self._run, name=f"lane writer {path}",
                                        daemon=True)
        _WRITERS[key] = self._writer  # (before it runs: it removes the entry as it ends)
        self._writer.start()

    def close(self, wait_s: float = 0.0) -> None:
        """Queue the end: the writer thread finishes the queued writes, then closes the file.
        Waits for it at most `wait_s` (0: not at all, as on the event loop; `aclose` awaits
        it without holding the loop). The file is not opened again before it finished."""
        if not self._closed:
            self._closed = True
            self._ops.put(_STOP)
        if wait_s > 0:
            self._writer.join(wait_s)

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """`close`, then wait for the writer thread to finish, at most `timeout_s`, on
        another thread (the loop runs meanwhile). False when it did not: it is left behind,
        logged, and the file is not opened again until it finished."""
        self.close()
        writer = self._writer
        if writer.is_alive():
            await asyncio.to_thread(writer.join, timeout_s)
        if writer.is_alive():
            log.error("%s: the QoS 0 lane's writer did not finish in %.0f s; left behind "
                      "(the file is not opened again before it finished)", self.path,
                      timeout_s)
            return False
        return True

    def wait_written(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Block until every write asked for so far finished (tests, tools); False on
        timeout."""
        done = threading.Event()
        self._ops.put(("sync", done))
        return done.wait(timeout_s)

    async def written(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """`wait_written` on another thread (the loop runs meanwhile): before a run of the
        uplink process starts, so that the rows of the previous run are in the file (or
        failed) when it reads where the file ends (server/bridge_proc.py). At once when no
        row write waits (the usual start: no thread hop before the lane opens)."""
        if self._rows_done == self._rows_put:
            return True
        return await asyncio.to_thread(self.wait_written, timeout_s)

    @property
    def backlog_messages(self) -> int:
        """Messages after the cursor in the rows kept (queued ones included, rows whose
        write failed not; dropped ones not yet settled neither: see `held`)."""
        rows = self._rows
        if not rows:
            return 0
        first = rows[0][0]
        return sum(row[1] for row in rows) - max(0, self.cursor - first + 1)

    @property
    def acked(self) -> int:
        """The cursor the process acknowledged last (`cursor` is past it after drops)."""
        return self._acked

    @property
    def drop_cursor(self) -> int:
        """The cursor max_backlog_bytes moved last (drops move it, acknowledgements do
        not): what the process must be told of (server/bridge_lane.py `Lane.tell`)."""
        return self._bound_cursor

    @property
    def oldest_at(self) -> float | None:
        return self._rows[0][3] if self._rows else None

    @property
    def pending_mark(self) -> int | None:
        """The `mark` of the oldest row not acknowledged yet (None: none)."""
        return self._rows[0][4] if self._rows else None

    @property
    def write_failed(self) -> bool:
        """A row write failed and `collect` has not reported it yet (any thread; also once
        an append or acknowledgement took it from the figures: the writer's next callback
        then still wakes the lane to count it)."""
        return bool(self._failed) or self._lost > 0

    @property
    def queue_full(self) -> bool:
        """`max_queued_rows` row writes, or `max_queued_bytes` of messages, wait for the
        writer thread (a slow disk)."""
        return (self._rows_put - self._rows_done >= self.max_queued_rows
                or self._bytes_put - self._bytes_done >= self.max_queued_bytes)

    def append(self, batches: list[tuple[int, int, float, bytes]], mark: int) -> int:
        """Queue batches of (count, bytes, publish time of the first, blob) for one
        transaction, with `mark`: the broker's last log offset when the running process's
        lane opened (every message of the bridge's up to it in the log comes first; see
        server/bridge_lane_child.py `LogGate`). Their offsets are given now, in order; the
        oldest rows beyond `max_backlog_bytes` are dropped now (deleted in the same
        transaction). Returns the number of messages dropped. A write that fails (disk full,
        I/O error) stores nothing: `collect` reports it. Queued even when `queue_full` (the
        caller decides)."""
        if self._failed:  # failed rows leave the figures before any drop (counted once)
            self._take_failed()
        rows = []
        firsts = []
        total = 0
        total_bytes = 0
        for count, size, at, blob in batches:
            first = self.queued_next
            rows.append((first, count, size, at, mark, blob))
            self._rows.append((first, count, size, at, mark))
            firsts.append(first)
            self.queued_next += count
            self.backlog_bytes += size
            total += count
            total_bytes += size
        dropped = self._bound()
        self._rows_put += 1
        self._bytes_put += total_bytes
        self._ops.put(("rows", rows, firsts, total, total_bytes, self.queued_next,
                       self._bound_cursor, self._drop_total))
        return dropped

    def _bound(self) -> int:
        """Drop the oldest rows beyond max_backlog_bytes (from the figures now; the queued
        write deletes them). Returns the messages dropped (unsettled: they go to `dropped`
        once the process says it did not send them, see `held`)."""
        limit = self.max_backlog_bytes
        if not limit or self.backlog_bytes <= limit:
            return 0
        kept = self._rows
        cut = 0
        dropped = 0
        cursor = self.cursor
        while cut < len(kept) - 1 and self.backlog_bytes > limit:  # the newest row stays
            first, count, size, _at, _mark = kept[cut]
            last = first + count - 1
            start = max(cursor, first - 1) + 1
            if last >= start:
                dropped += last - start + 1
                self._unsettled.append([start, last])
            cursor = last
            self.backlog_bytes -= size
            cut += 1
        if not cut:
            return 0
        self.cursor = self._bound_cursor = cursor
        self._drop_total += dropped
        self._unsettled_count += dropped
        del kept[:cut]
        return dropped

    def _take_failed(self) -> None:
        """On the loop: the rows of the writes that failed leave the figures (those still
        kept: a row max_backlog_bytes dropped first is counted there, not here too)."""
        failed = self._failed
        while failed:
            firsts, _count, _size, error = failed.popleft()
            self._lost_error = error
            gone = set(firsts)
            kept = []
            for row in self._rows:
                if row[0] in gone:
                    self.backlog_bytes -= row[2]
                    self._lost += row[1]
                else:
                    kept.append(row)
            self._rows = kept

    def collect(self) -> tuple[int, str]:
        """On the loop: the messages of the row writes that failed since the last call (not
        stored: lost, QoS 0 is at most once; their rows leave the figures; a row dropped for
        max_backlog_bytes before its write failed is in `dropped` only), and the last error
        ("" when none)."""
        self._take_failed()
        lost, error = self._lost, self._lost_error
        self._lost = 0
        self._lost_error = ""
        return lost, error

    def held(self, floor: int, runs: Sequence[tuple[int, int]]) -> None:
        """The process learnt of the drops up to `floor` (it skips the rest of them from
        now on) and holds `runs` of their messages ([first, last], oldest first), read
        before (in flight, not yet acknowledged): those of the unsettled drops stay
        unsettled until its next acknowledgement or answer, the others go to `dropped` (it
        answers again, with the same floor, when it gives up a window: `LaneReader.rewind`
        in server/bridge_lane_child.py). The runs it
        names, not a count: what it holds need not be the oldest dropped (it read on past
        rows deleted before it was told; a resend cut runs it held at an earlier word)."""
        self.answered_to = max(self.answered_to, floor)
        unsettled = self._unsettled
        kept: deque[list[int]] = deque()
        settled = 0
        i = 0
        while unsettled and unsettled[0][0] <= floor:
            start, end = unsettled.popleft()
            if end > floor:  # (not dropped when the process was told: later)
                unsettled.appendleft([floor + 1, end])
                end = floor
            at = start  # [start, at) is kept or settled
            while i < len(runs) and runs[i][0] <= end:
                first, last = runs[i]
                low = max(first, at)
                high = min(last, end)
                if low <= high:
                    kept.append([low, high])
                    settled += low - at
                    at = high + 1
                if last > end:  # (also over the next unsettled run)
                    break
                i += 1
            settled += end - at + 1
        unsettled.extendleft(reversed(kept))
        if settled:
            self._unsettled_count -= settled
            self.dropped += settled

    def settle(self) -> None:
        """The process that might still have sent the dropped rows it had read ended (a new
        run starts at the cursor): they all count in `dropped` now."""
        if self._unsettled_count:
            self.dropped += self._unsettled_count
            self._unsettled_count = 0
            self._unsettled.clear()

    def commit_cursor(self, cursor: int, delivered: int | None = None) -> None:
        """Everything up to `cursor` was acknowledged: the figures move now; the writer
        thread stores it and deletes the rows it passes (a write that fails is logged, and
        a later cursor is stored with the next acknowledgement).

        `delivered`: how many messages after the previous acknowledged cursor the process
        sent and had acknowledged (server/bridge_lane_child.py). Rows max_backlog_bytes
        dropped after the process had read them (its window in flight, the row it had
        decoded) were sent all the same: the unsettled drops (see `held`) up to `cursor` go
        to `dropped` now, less the ones delivered, so a message is counted in `forwarded`
        or in `dropped`, not both, and `dropped` never goes down. The process skips the
        rest of a dropped range, so they are what it delivered beyond the rows still
        kept."""
        if self._failed:  # a failed row the process skipped is lost, not delivered
            self._take_failed()
        acked = self._acked
        if cursor <= acked:
            return
        self._acked = cursor
        if self._unsettled:
            self._settle_to(cursor, delivered, acked)
        if cursor <= self.cursor:
            return
        self.cursor = cursor
        kept = self._rows
        cut = 0
        while cut < len(kept) and kept[cut][0] + kept[cut][1] - 1 <= cursor:
            self.backlog_bytes -= kept[cut][2]
            cut += 1
        del kept[:cut]
        self._cursor_target = cursor
        self._queue_cursor()

    def _settle_to(self, cursor: int, delivered: int | None, acked: int) -> None:
        """The unsettled drops up to `cursor` into `dropped`, less those delivered."""
        settled = take_runs(self._unsettled, cursor)
        if not settled:
            return
        resent = 0
        if delivered is not None:
            kept_messages = 0  # messages of the kept rows in (acked, cursor]
            for first, count, _size, _at, _mark in self._rows:
                if first > cursor:
                    break
                kept_messages += max(0, min(first + count - 1, cursor)
                                     - max(first - 1, self.cursor, acked))
            resent = min(max(0, delivered - kept_messages), settled)
        self._unsettled_count -= settled
        self.dropped += settled - resent
        if resent:
            self._drop_total -= resent
            self._queue_cursor()

    def _queue_cursor(self) -> None:
        """Queue a write of the cursor and `dropped` (one in the queue at a time: it
        writes the latest)."""
        if not self._cursor_queued:
            self._cursor_queued = True
            self._ops.put(("cursor",))

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        ops = self._ops
        held: tuple[Any, ...] | None = None  # taken while gathering rows: the next to run
        try:
            while True:
                op = held if held is not None else ops.get()
                held = None
                kind = op[0]
                if kind == "stop":
                    return
                if kind == "sync":
                    op[1].set()
                    continue
                if kind == "rows":
                    # The rows queued meanwhile go in the same write: under a busy loop
                    # every step of this thread waits for the GIL, so it writes fewer,
                    # larger statements rather than falling behind.
                    batch = [op]
                    while len(batch) < MAX_ROWS_PER_WRITE:
                        try:
                            more = ops.get_nowait()
                        except queue.Empty:
                            break
                        if more[0] != "rows":
                            held = more
                            break
                        batch.append(more)
                    self._bytes_done += self._write_rows(batch)
                    self._rows_done += len(batch)
                else:
                    self._write_cursor()
                callback = self.on_written
                if callback is not None:
                    try:
                        callback()
                    except Exception:  # the loop closed: nobody to tell
                        log.debug("%s: lane writer callback failed", self.path, exc_info=True)
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            # Done with the file: forgotten, or the table would keep every writer that ever
            # ran. The entry is still this thread's: an opening replaces only a writer that
            # is not alive, and this one is until it returns from here.
            if _WRITERS.get(self._key) is self._writer:
                del _WRITERS[self._key]

    def _write_rows(self, batch: list[tuple[Any, ...]]) -> int:
        """One write of the rows of queued appends (in order). Without a drop to store it is
        one INSERT statement in autocommit (its own transaction: one step, so one wait for
        the GIL); with one, a transaction that also deletes the dropped rows. Returns the
        bytes of messages the appends queued (written or failed: no longer waiting)."""
        rows: list[Any] = []
        firsts: list[int] = []
        count = size = 0
        for op in batch:
            rows.extend(op[1])
            firsts.extend(op[2])
            count += op[3]
            size += op[4]
        _kind, _rows, _firsts, _count, _size, end, cursor, dropped = batch[-1]
        conn = self._conn
        bound = cursor > self._bound_deleted
        try:
            if not bound:
                conn.execute(_INSERT + ", ".join([_ROW_VALUES] * len(rows)),
                             list(chain.from_iterable(rows)))
            else:
                conn.execute("BEGIN")
                conn.executemany(_INSERT + _ROW_VALUES, rows)
                conn.execute("DELETE FROM lane WHERE first <= ?", (cursor,))
                self._set_cursor(max(cursor, self._stored_cursor))
                conn.execute(_SET, ("dropped", str(dropped)))
                conn.execute("COMMIT")
                self._bound_deleted = cursor
                self._stored_cursor = max(cursor, self._stored_cursor)
        except Exception as exc:  # sqlite3.Error: disk full, I/O error
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._failed.append((firsts, count, size, f"{self.path}: table lane: {exc}"))
        # The offsets are given even when the write failed: a reader skips the gap.
        self.next_offset = end
        return size

    def _set_cursor(self, cursor: int) -> None:
        self._conn.execute(_SET, ("cursor", str(cursor)))

    def _write_cursor(self) -> None:
        self._cursor_queued = False  # before reading the target: a later one queues again
        cursor = max(self._cursor_target, self._stored_cursor)
        dropped = self._drop_total
        conn = self._conn
        try:
            conn.execute("BEGIN")
            conn.execute("DELETE FROM lane WHERE first <= ? AND first + count - 1 <= ?",
                         (cursor, cursor))
            self._set_cursor(cursor)
            conn.execute(_SET, ("dropped", str(dropped)))
            conn.execute("COMMIT")
            self._stored_cursor = cursor
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error("%s: table lane_meta, key cursor: cannot store the QoS 0 lane's "
                      "cursor %d: %s", self.path, cursor, exc)
