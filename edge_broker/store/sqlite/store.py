"""`SqliteStore`: the session store in one SQLite file (WAL, one writer task, group commit).

The class is its public API (open, apply, close, stats, the streams) put together from the
mixins of the other modules (see the package docstring for the map).

*Durability* (`durability=`), all in WAL mode, which never corrupts the file on a crash:
- "fsync" (`synchronous=FULL`, the default): the WAL is fsynced at every commit, so a batch
  whose future resolved survives a power cut. `fsyncs` counts these commits.
- "os" (`synchronous=NORMAL`): a commit is written to the OS but not fsynced (the WAL is
  synced only at checkpoints). A resolved batch survives a crash of the process, not a power
  cut: the last commits before the cut may be lost (whole transactions, in order; the file
  stays consistent). `fsyncs` stays 0.
- "none" (`synchronous=OFF`): `apply` returns `DONE` at once, so acknowledgements do not wait
  for any commit; the writer still commits in groups in the background. A crash of the
  process loses the batches not yet committed (the moments before it); a power cut may lose
  more, and, because SQLite no longer orders its writes, could even damage the file (then
  `--recover`). To bound memory, when more than `NONE_MAX_BACKLOG` changes wait for the
  writer, `apply` returns a future again (back-pressure instead of unbounded growth).

*The log of named streams* (version 3; store/log/, docs/log.md): `LogAppended` records are
appended, in order, by `LogKeeper` inside the group transaction, after the other puts, at the
offsets the core assigned; a rolled-back group reloads the log's in-memory state. Retention
and last-value compaction run as bounded steps (their own short transactions) between groups,
when idle and under steady load alike (maintenance.py). `read_stream` (history pages for
`$stream/` subscriptions), `stream_stats`, `delete_stream` and `replay_stream` are one hop
each to the writer thread. `stream_cursors` holds where stored sessions' `$stream/`
subscriptions resume (`StreamCursorSaved`), deleted with the subscription or the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from ...core.changes import Change, Snapshot
from ...errors import StoreDamagedError, StoreError, StoreFullError
from ..base import DONE
from ..log.bridge_store import BridgeStoreSide
from ..log.keeper import LogKeeper
from ..log.log import LogRow, RawRow
from ..log.replay import Position, StreamStats
from ..log.streams import StreamConfig
from .guard import FileGuard
from .maintenance import Maintenance
from .opening import Opening
from .plan import _Pending
from .readonly import StoreStats
from .space import BALLAST_BYTES, DISK_RESERVE_BYTES, Space, _free_disk_bytes, _make_ballast
from .sql import _SELECT_QUARANTINED, _file_bytes, _query_counts, _same, _scalar, _store_error
from .state import _SYNCHRONOUS
from .writer import Writer

log = logging.getLogger("edge_broker.store")
_T = TypeVar("_T")

NONE_MAX_BACKLOG: Final = 200_000  # durability "none": changes queued before apply() waits


class SqliteStore(Opening, Writer, Maintenance, Space):
    """The SQLite session store; see the package docstring (store/sqlite/__init__.py)."""

    def __init__(self, path: str | Path, *, durability: str = "fsync",
                 max_store_bytes: int = 0, ballast_bytes: int = BALLAST_BYTES,
                 disk_reserve_bytes: int = DISK_RESERVE_BYTES,
                 streams: Sequence[StreamConfig] = ()) -> None:
        if durability not in _SYNCHRONOUS:
            raise ValueError(f"durability must be one of {sorted(_SYNCHRONOUS)}, "
                             f"not {durability!r}")
        if min(max_store_bytes, ballast_bytes, disk_reserve_bytes) < 0:
            raise ValueError("max_store_bytes, ballast_bytes and disk_reserve_bytes must be >= 0")
        self.path = Path(path)
        self.durability = durability
        self.max_store_bytes = max_store_bytes
        self.ballast_bytes = ballast_bytes
        self.disk_reserve_bytes = disk_reserve_bytes
        self.ballast_path = self.path.with_name(self.path.name + ".ballast")
        # The connection lives in (and is only touched from) the one thread of the executor.
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._queue: deque[_Pending] = deque()
        self._queued_changes = 0
        self._busy = False  # the writer holds a group whose futures are not resolved yet
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._failed: StoreError | None = None
        self._delivery_hwm = 0  # no delivery with a higher id is in the file
        self._message_hwm = 0  # no message with a higher id is in the file
        self._disk_full = False  # SQLITE_FULL seen, and the ballast not back yet
        self._disk_tight = False  # free disk space under disk_reserve_bytes
        self._used_bytes = 0
        self._free_bytes = 0
        self._size_checked_at = 0.0
        self._vacuumed_at = 0.0
        self._room_wanted = 0  # bytes streams could not free (set by _give_way_sync)
        self._give_way_at = 0.0  # monotonic time of the last step of giving way (budget)
        self._give_way_more = False  # that step released something: try again at once
        # Called (on the event loop) with the bytes wanted when streams could not give way:
        # the server asks the core which backlogs may (budget.py, tier 2).
        self.on_room_wanted: Callable[[int], None] | None = None
        self._auto_vacuum = False
        self.commits = 0
        self.batches = 0
        self.fsyncs = 0
        self.changes_written = 0
        self.rows_written = 0
        self.vacuum_steps = 0
        self._commit_attempts = 0
        self._guard = FileGuard(self.path)  # the file's lock, and whether it is still there
        self._log = LogKeeper(streams)  # the append-only log of named streams (store/log/)
        self.bridges = BridgeStoreSide(self)  # bridges (store/log/bridge_store.py)
        self.quarantined_at_open = 0  # rows moved to the quarantine table by open()

    # -- public API ---------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """New QoS>0 work should be refused: over `max_store_bytes`, the disk nearly full
        (under `disk_reserve_bytes` free), full (SQLITE_FULL), or the file deleted or
        replaced under the running store (guard.py)."""
        return self._disk_full or self._disk_tight or self._guard.lost or (
            self.max_store_bytes > 0 and self._used_bytes >= self.max_store_bytes)

    @property
    def budget_stream_rows(self) -> int:
        """Rows streams released early to keep the store under `max_store_bytes`."""
        return self._log.budget_stream_rows

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages in use, as of the last check (after commits)."""
        return self._used_bytes

    async def open(self) -> Snapshot:
        if self._executor is not None:
            raise StoreError(f"{self.path}: the store is already open")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a database file")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edge-broker-store")
        try:
            try:
                await self._call(self._guard.lock)
            except OSError as error:
                raise StoreError(f"{self.path}: cannot open: {error.strerror}") from None
            try:
                snapshot = await self._call(self._open_sync)
            except StoreError as error:
                # A disk too full to open the store at all (in WAL mode even reading needs
                # room for the -shm/-wal files): give the ballast back and try once more; the
                # store then reports `full` until space returns, as after SQLITE_FULL.
                free = _free_disk_bytes(self.path.parent)
                if (isinstance(error, StoreDamagedError) or free is None
                        or free >= self.disk_reserve_bytes):
                    raise
                if not self._drop_ballast():
                    raise StoreFullError(f"{error} (the disk is full: {free} bytes free in "
                                         f"{self.path.parent})") from None
                await self._call(self._close_connection)
                self._disk_full = True
                snapshot = await self._call(self._open_sync)
        except BaseException:
            await self._call(self._close_connection)
            self._guard.close()
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._guard.watch()
        if self.ballast_bytes and not self.ballast_path.exists():
            await asyncio.to_thread(_make_ballast, self.ballast_path, self.ballast_bytes)
        self._check_disk()
        self._writer = asyncio.get_running_loop().create_task(
            self._run_writer(), name=f"store-writer {self.path.name}")
        return snapshot

    def apply(self, changes: Sequence[Change]) -> Awaitable[None]:
        """Queue one batch; the awaitable resolves when it and all earlier batches committed.

        The store keeps `changes` until then: do not mutate it.
        """
        if self._failed is not None or self._writer is None or self._closing:
            return self._failed_future()
        if not changes:
            if (not self._queue and not self._busy) or self.durability == "none":
                return DONE
        elif self.durability == "none" and self._queued_changes < NONE_MAX_BACKLOG:
            self._queue.append((changes, None))
            self._queued_changes += len(changes)
            self._wakeup.set()
            return DONE
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((changes, future))
        self._queued_changes += len(changes)
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Commit what is pending, checkpoint the WAL into the file (and truncate it), close."""
        if self._executor is None or self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        try:
            await self._call(self._close_sync)
        finally:
            self._guard.close()  # after SQLite closed the file
            self._executor.shutdown(wait=False)
            self._executor = None
            self._writer = None

    async def ping(self) -> None:
        """Returns once the writer thread is free to answer: health checks and the systemd
        watchdog use it to tell a store that is slow from one that is stuck."""
        if self._executor is None:
            return
        await self._call(_same, None)

    async def stats(self) -> StoreStats:
        if self._executor is None or self._conn is None:
            raise StoreError(f"{self.path}: the store is not open")
        try:
            counts = await self._call(self._stats_sync)
        except sqlite3.Error as error:
            raise _store_error(self.path, "stats", error) from None
        self._check_disk()
        self._check_file()
        return StoreStats(
            sessions=counts[0], queued_messages=counts[1], queued_bytes=counts[2],
            oldest_message_at=counts[3], file_bytes=_file_bytes(self.path),
            used_bytes=self._used_bytes, free_bytes=self._free_bytes, commits=self.commits,
            batches=self.batches, fsyncs=self.fsyncs, changes_written=self.changes_written,
            rows_written=self.rows_written, vacuum_steps=self.vacuum_steps, full=self.full,
            quarantined=counts[4], file_lost=self._guard.lost)

    # -- streams (store/log/keeper.py) ---------------------------------------------------

    @property
    def stream_names(self) -> list[str]:
        return sorted(c.name for c in self._log.log.stream_configs)

    async def read_stream(self, name: str, topic_filter: str | None,
                          position: Position | None, after: int, until: int,
                          limit: int) -> tuple[list[RawRow], dict[int, str], int, int]:
        """A page of a stream's history for replay, rows as stored (see LogKeeper.page)."""
        try:
            return await self._call(self._read_sync, self._log.page, name, topic_filter,
                                    position, after, until, limit)
        except sqlite3.Error as error:
            raise _store_error(self.path, "read a stream", error) from None

    async def read_backlog(self, reader: str, filters: Mapping[str, int], after: int,
                           until: int,
                           limit: int) -> tuple[list[RawRow], dict[int, str], int]:
        """A page of a persistent session's backlog, rows as stored (store/log/backlogs.py)."""
        try:
            return await self._call(self._read_sync, self._log.read_backlog, reader, filters,
                                    after, until, limit)
        except sqlite3.Error as error:
            raise _store_error(self.path, "read a session's queued messages", error) from None

    async def stream_stats(self) -> list[StreamStats]:
        try:
            return await self._call(self._read_sync, self._log.stats)
        except sqlite3.Error as error:
            raise _store_error(self.path, "stream statistics", error) from None

    async def give_way_backlogs(self, readers: Sequence[str],
                                excess: int) -> list[tuple[str, int, int, int, int]]:
        """Tier 2 of the store budget: the readers the core named give way (budget.py);
        (reader, new offset, rows, bytes, old offset) of each that did. Re-checks the pages
        in use, in the same job on the store's thread: a bridge settles the step's rows
        against what its uplink holds (server/bridges.py `gave_way`) before any write
        queued after the step is done (one more job would let those be stored first)."""
        def step() -> list[tuple[str, int, int, int, int]]:
            out = self._read_sync(self._log.give_way_backlogs, readers, excess)
            try:  # the step is committed: its result goes back whatever the check does
                self._check_size_sync()
            except sqlite3.Error as error:
                log.error("%s: the store's size could not be read after the budget's step: "
                          "%s", self.path, error)
            return out

        try:
            out: list[tuple[str, int, int, int, int]] = await self._call(step)
        except sqlite3.Error as error:
            raise _store_error(self.path, "make backlogs give way", error) from None
        return out

    async def delete_stream(self, name: str) -> bool:
        try:
            return await self._call(self._read_sync, self._log.delete, name)
        except sqlite3.Error as error:
            raise _store_error(self.path, "delete a stream", error) from None

    async def replay_stream(self, name: str, position: Position, topic_filter: str | None,
                            limit: int | None, until: int | None = None,
                            max_bytes: int | None = None) -> list[LogRow]:
        try:
            return await self._call(self._read_sync, self._log.replay_rows, name, position,
                                    topic_filter, limit, until, max_bytes)
        except sqlite3.Error as error:
            raise _store_error(self.path, "replay a stream", error) from None

    def _read_sync(self, fn: Callable[..., _T], *args: Any) -> _T:
        return fn(self._db(), *args)

    def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _close_sync(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if self._failed is None:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            log.warning("%s: checkpoint at close failed: %s", self.path, error)
        self._conn = None
        try:
            conn.close()
        except sqlite3.Error as error:
            raise _store_error(self.path, "close", error) from None

    def _stats_sync(self) -> tuple[int, int, int, float | None, int]:
        counts = _query_counts(self._db())
        quarantined = int(_scalar(self._db(), _SELECT_QUARANTINED))
        self._check_size_sync()
        return (*counts, quarantined)

    async def _query(self, sql: str) -> list[Any]:
        """Run one statement in the database thread (maintenance and tests)."""
        return await self._call(lambda: self._db().execute(sql).fetchall())
