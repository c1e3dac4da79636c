"""Maintenance between groups: size checks, checkpoints, vacuum, and streams' retention.

The writer (writer.py) calls `_idle` whenever its queue is empty; each piece of work is one
bounded hop to the database thread (`_maintain`), so a batch arriving meanwhile waits for at
most one step. Idle, it:
- checks the file is still there (space.py), at least every `FILE_CHECK_S`;
- re-reads the page counts behind `used_bytes` (`_check_size_sync`) every `SIZE_CHECK_S`, or
  every `FULL_RECHECK_S` while the store is full;
- gives free pages back to the file system with `incremental_vacuum` steps
  (`auto_vacuum=INCREMENTAL`, set on a new file) when more than `VACUUM_MIN_FREE_BYTES` and
  `VACUUM_MIN_FREE_RATIO` of the file are free, or eagerly while the disk is short of space;
  at most one step per `VACUUM_INTERVAL_S`;
- runs one bounded step of the named streams' retention and last-value compaction
  (store/log/keeper.py), each its own short transaction; under steady load the writer runs
  them between groups instead;
- near the store budget (`used_bytes` at or over `GIVE_WAY_AT` of `max_store_bytes`), runs
  one bounded step of giving way (store/log/budget.py: streams release their oldest rows
  that no reader needs, and retention deletes them), until `used_bytes` is under
  `GIVE_WAY_TO` of it; the writer runs them between groups too. When a step released
  nothing and the store is still over `GIVE_WAY_AT`, `on_room_wanted` asks the server for
  tier 2 (the core's offline drop-oldest backlogs, budget.py); the step is not tried again
  for `GIVE_WAY_RETRY_S` (if nothing can give way, new QoS 1/2 work is refused while the
  store is `full`). Only `max_store_bytes` makes streams give
  way; a disk short of space does not (it is the operator's disk, not the broker's
  budget: see space.py).
The file follows the data: pruning (schema.py) frees pages inside each transaction, vacuum
gives them back, and checkpoints truncate the WAL (`journal_size_limit`; `_checkpoint_sync`
truncates it at once while space is short, space.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .sql import _SELECT_SIZE
from .state import StoreState

log = logging.getLogger("edge_broker.store")

FULL_RECHECK_S: Final = 1.0  # while full and idle, re-check sizes and the ballast this often
FILE_CHECK_S: Final = 1.0  # while idle, check this often that the file is still there
SIZE_CHECK_S: Final = 5.0  # otherwise, check the free-page count this often (for vacuum)
VACUUM_MIN_FREE_BYTES: Final = 8 * 1024 * 1024  # vacuum when free pages exceed this ...
VACUUM_MIN_FREE_RATIO: Final = 0.25  # ... and this share of the file
VACUUM_STEP_PAGES: Final = 512
VACUUM_INTERVAL_S: Final = 0.5  # at most one vacuum step per interval, only when idle
GIVE_WAY_AT: Final = 0.9  # streams give way from this share of max_store_bytes ...
GIVE_WAY_TO: Final = 0.8  # ... down to this share
GIVE_WAY_RETRY_S: Final = 1.0  # after a step that released nothing, wait this long


class Maintenance(StoreState):
    """SqliteStore's maintenance between groups."""

    def _checkpoint_sync(self) -> bool:
        """Copy the WAL into the file and truncate it, giving its disk space back (the WAL
        keeps its largest size otherwise). True if the WAL file got smaller."""
        wal = Path(f"{self.path}-wal")
        before = wal.stat().st_size if wal.exists() else 0
        try:
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as error:
            log.warning("%s: checkpoint failed: %s", self.path, error)
        after = wal.stat().st_size if wal.exists() else 0
        return after < before

    def _check_size_sync(self) -> None:
        pages, free, page_size = self._db().execute(_SELECT_SIZE).fetchone()
        self._used_bytes = (pages - free) * page_size
        self._free_bytes = free * page_size
        self._size_checked_at = time.monotonic()

    def _retention_sync(self) -> None:
        self._log.retention(self._db())

    def _give_way_wanted(self, now: float) -> bool:
        limit = self.max_store_bytes
        if not limit or self._used_bytes < GIVE_WAY_AT * limit:
            return False
        return self._give_way_more or now - self._give_way_at >= GIVE_WAY_RETRY_S

    def _give_way_sync(self) -> None:
        self._give_way_at = time.monotonic()
        excess = self._used_bytes - int(GIVE_WAY_TO * self.max_store_bytes)
        report = self._log.give_way(self._db(), excess)
        self._give_way_more = report.more
        self._check_size_sync()
        if not report.more and self._used_bytes >= GIVE_WAY_AT * self.max_store_bytes:
            self._room_wanted = self._used_bytes - int(GIVE_WAY_TO * self.max_store_bytes)

    def _vacuum_sync(self) -> None:
        conn = self._db()
        self._vacuumed_at = time.monotonic()
        # Not execute(): the pragma returns an empty row per page, and Python's sqlite3 stops
        # after the first (one page freed); executescript() steps it to the end.
        conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
        self.vacuum_steps += 1
        self._check_size_sync()

    async def _idle(self) -> None:
        """Wait for work; between batches, do maintenance (size checks, vacuum, ballast)."""
        self._wakeup.clear()
        if self._queue or self._closing:
            return
        self._check_file()
        now = time.monotonic()
        timeout = FILE_CHECK_S
        if self.full:
            if now - self._size_checked_at >= FULL_RECHECK_S:
                await self._maintain(self._check_size_sync)
            timeout = min(timeout, FULL_RECHECK_S)
        elif now - self._size_checked_at >= SIZE_CHECK_S:
            await self._maintain(self._check_size_sync)
        if self._vacuum_wanted():
            if now - self._vacuumed_at >= VACUUM_INTERVAL_S:
                await self._maintain(self._vacuum_sync)
            timeout = min(timeout, VACUUM_INTERVAL_S)
        if self._log.retention_wanted(now):
            # Streams' retention and compaction, one bounded step between groups.
            await self._maintain(self._retention_sync)
            if self._log.retention_more:
                timeout = 0.0
        if self._give_way_wanted(now):
            await self._maintain(self._give_way_sync)
            if self._give_way_more:
                timeout = 0.0
        elif self.max_store_bytes and self._used_bytes >= GIVE_WAY_AT * self.max_store_bytes:
            timeout = min(timeout, GIVE_WAY_RETRY_S)
        if self._queue or self._closing:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _vacuum_wanted(self) -> bool:
        if not self._auto_vacuum:
            return False
        if self._disk_full or self._disk_tight:  # every page given back counts now
            return self._free_bytes >= VACUUM_STEP_PAGES * 1024
        if self._free_bytes < VACUUM_MIN_FREE_BYTES:
            return False
        total = self._used_bytes + self._free_bytes
        return self._free_bytes >= VACUUM_MIN_FREE_RATIO * total

    async def _maintain(self, work: Callable[[], None]) -> None:
        try:
            await self._call(work)
        except sqlite3.Error as error:
            log.warning("%s: store maintenance failed: %s", self.path, error)
        wanted, self._room_wanted = self._room_wanted, 0
        if wanted > 0 and self.on_room_wanted is not None:
            self.on_room_wanted(wanted)  # tier 2 (budget.py): the server asks the core
        self._check_disk()
        if self._disk_full or self._disk_tight:
            await self._recover_space()
