"""The writer: one task that commits the queued batches in groups, one transaction each.

*Group commit.* `apply(changes)` (store.py) appends the batch and an asyncio future to a queue
and returns the future; nothing is written on the caller's stack. The writer task takes every
queued batch (up to `MAX_GROUP_CHANGES` changes), coalesces them (plan.py), and writes the
result in ONE transaction on the database thread (`_write_sync`); COMMIT; then the futures
resolve in submission order. While it commits, new batches queue up and form the next group,
so N concurrent publishers cost one commit (one fsync) per group, not per message. An empty
batch resolves with the batches queued before it (or is `DONE` when nothing is pending).
Between groups, when idle, it does the maintenance of maintenance.py; under steady load,
streams' retention steps still run between groups.

*Errors.* SQLITE_FULL rolls the transaction back and the group is retried (space.py makes
room, cheapest first; the group is never dropped). SQLITE_BUSY/LOCKED are retried with a
backoff (at most `RETRY_MAX_S`), each retry taking along the batches queued meanwhile. Any
other SQLite error fails the group's futures and every later `apply` with `StoreError`. A
store closed while commits keep failing fails its pending batches (`StoreFullError` on a full
disk); none of them was acknowledged. After every commit, before its futures resolve, the
file guard (space.py) and the sizes behind `full` are checked.

*Fault hook.* `SqliteStore.before_commit` (None in production; only tests install it, see
tests/faults.py) is called on the database thread with the group commit's number after its
statements ran and before COMMIT, where the power-loss tests kill the process to tear that
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import ClassVar, Final

from ...errors import StoreError, StoreFullError
from .plan import _Pending, _Plan, plan_group
from .schema import _CLEAR_CANDIDATES, _PRUNE_CANDIDATES, _UNCANDIDATE
from .sql import _RETRYABLE, _SQLITE_FULL, _code, _store_error
from .state import StoreState

log = logging.getLogger("edge_broker.store")

MAX_GROUP_CHANGES: Final = 50_000  # one transaction takes at most about this many changes
RETRY_MAX_S: Final = 1.0  # longest backoff between retries of a group on a full disk


class Writer(StoreState):
    """SqliteStore's writer task and its transaction."""

    # Called on the writer thread with each group commit's number, after its statements ran
    # and before COMMIT. Only tests set it (tests/faults.py kills the process there).
    before_commit: ClassVar[Callable[[int], None] | None] = None

    def _write_sync(self, plan: _Plan) -> None:
        """One group, one transaction. On an error it is rolled back and the error raised."""
        conn = self._db()
        self._commit_attempts += 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in plan.deletes:
                conn.executemany(sql, rows)
            if plan.prune_after_deletes:  # free the bodies now: the puts reuse their pages
                if plan.protect:
                    conn.executemany(_UNCANDIDATE, plan.protect)
                conn.execute(_PRUNE_CANDIDATES)
                conn.execute(_CLEAR_CANDIDATES)
            for sql, rows in plan.puts:
                conn.executemany(sql, rows)
            if plan.log:
                self._log.append(conn, plan.log, [m.offset for m in plan.log])
            if plan.readers:  # sessions' cursors, after the appends they may refer to
                self._log.apply_readers(conn, plan.readers)
            if plan.counted:  # the sessions' own backlog counts (plan.py), one statement
                self._log.log.save_counted(conn, plan.counted)
            if plan.prune_after_puts:
                conn.execute(_PRUNE_CANDIDATES)
                conn.execute(_CLEAR_CANDIDATES)
            hook = type(self).before_commit  # a test's fault injection; None in production
            if hook is not None:
                hook(self._commit_attempts)
            conn.commit()
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            if plan.log or plan.readers:  # the log's memory is ahead of the file: reload
                with contextlib.suppress(sqlite3.Error):
                    self._log.load(conn)
            raise

    # -- the writer ---------------------------------------------------------------------

    async def _run_writer(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                try:
                    await self._idle()
                except Exception:  # a bug in maintenance must not stop the commits
                    log.exception("%s: store maintenance failed", self.path)
                    self._wakeup.clear()
                    if not self._queue and not self._closing:
                        await self._wakeup.wait()
                continue
            group = self._take()
            self._busy = True
            try:
                await self._commit_group(group)
            except Exception as error:  # a bug: fail the group, keep the writer alive
                log.exception("%s: store writer failed", self.path)
                _fail(group, StoreError(f"{self.path}: store writer failed: {error!r}"))
            finally:
                self._busy = False
            if self._log.retention_wanted(time.monotonic()) and not self._closing:
                # Under steady load the writer is never idle: retention steps (bounded,
                # short) then run between groups, so streams never lag their bounds.
                try:
                    await self._maintain(self._retention_sync)
                except Exception:
                    log.exception("%s: stream retention failed", self.path)
            if self._give_way_wanted(time.monotonic()) and not self._closing:
                # Near `max_store_bytes`: streams give way (budget.py), between groups.
                try:
                    await self._maintain(self._give_way_sync)
                except Exception:
                    log.exception("%s: giving way to the store budget failed", self.path)

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        count = 0
        queue = self._queue
        while queue and (not group or count < MAX_GROUP_CHANGES):
            item = queue.popleft()
            group.append(item)
            count += len(item[0])
        self._queued_changes -= count
        return group

    async def _commit_group(self, group: list[_Pending]) -> None:
        delay = 0.05
        quick_retries = 0  # disk full: retries made at once after making room
        while True:
            try:
                plan = self._plan(group)
            except Exception as error:
                _fail(group, StoreError(f"{self.path}: cannot store a batch: {error!r}"))
                return
            if plan.empty:  # empty batches, or everything coalesced away
                _resolve(group)
                self.batches += plan.batches
                self.changes_written += plan.changes
                return
            try:
                await self._call(self._write_sync, plan)
            except sqlite3.Error as error:
                code = _code(error)
                if code == _SQLITE_FULL:
                    if not self._disk_full:
                        log.warning("%s: the disk is full; the store keeps %d batch(es) and "
                                    "retries", self.path, len(group))
                    self._disk_full = True
                    # Make room, cheapest first, each followed by one immediate retry: give
                    # the WAL's disk space back (checkpoint + truncate), then the ballast.
                    if quick_retries == 0 and await self._call(self._checkpoint_sync):
                        quick_retries = 1
                        continue
                    if quick_retries < 2 and self._drop_ballast():
                        quick_retries = 2
                        await self._call(self._checkpoint_sync)
                        continue
                    quick_retries = 2
                    await self._call(self._checkpoint_sync)  # before each later retry
                elif code not in _RETRYABLE:
                    failure = _store_error(self.path, "commit", error)
                    self._failed = failure
                    log.error("%s", failure)
                    _fail(group, failure)
                    self._fail_queue(failure)
                    return
                if self._closing:
                    kind = StoreFullError if code == _SQLITE_FULL else StoreError
                    failure = kind(
                        f"{self.path}: closing while commits keep failing; {len(group)} "
                        f"batch(es) not stored (and not acknowledged): {error}")
                    _fail(group, failure)
                    self._fail_queue(failure)
                    return
                await self._backoff(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                group.extend(self._take())  # retry together with what queued meanwhile
                continue
            break
        # Committed.
        self.commits += 1
        if self.durability == "fsync":
            self.fsyncs += 1
        self.batches += plan.batches
        self.changes_written += plan.changes
        self.rows_written += plan.rows
        self._delivery_hwm = max(self._delivery_hwm, plan.max_delivery_id)
        self._message_hwm = max(self._message_hwm, plan.max_message_id)
        self._check_file(group)  # two stat calls
        # Before the acks go out, so `full` already reflects this commit then.
        if self.max_store_bytes or self._disk_full or self._disk_tight:
            await self._maintain(self._check_size_sync)
        else:
            self._check_disk()  # one statvfs: cheap
            if self._disk_tight:
                await self._recover_space()
        _resolve(group)
        if plan.log:
            self.bridges.committed(self._log.last_offset)  # wakes the bridges' uplinks

    async def _backoff(self, delay: float) -> None:
        """Wait before a retry; only close() cuts the wait short (new batches join the
        retry, they do not hasten it: no storm of failing transactions)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _fail_queue(self, failure: StoreError) -> None:
        while self._queue:
            _, future = self._queue.popleft()
            if future is not None and not future.done():
                future.set_exception(failure)
        self._queued_changes = 0

    def _failed_future(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            future.set_exception(self._failed)
        else:
            future.set_exception(StoreError(f"{self.path}: the store is not open (or closing)"))
        return future

    def _plan(self, group: list[_Pending]) -> _Plan:
        """Coalesce a group of batches (plan.py)."""
        return plan_group(group, self._delivery_hwm, self._message_hwm)


def _resolve(group: list[_Pending]) -> None:
    for _, future in group:
        if future is not None and not future.done():
            future.set_result(None)


def _fail(group: list[_Pending], error: BaseException) -> None:
    for _, future in group:
        if future is not None and not future.done():
            future.set_exception(error)
