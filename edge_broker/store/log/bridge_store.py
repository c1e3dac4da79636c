"""The SQLite store's bridge side: what server/bridges.py asks the store (bridges.py beside
it holds the synchronous operations and the tables).

`SqliteStore.bridges` is one `BridgeStoreSide`. Every read and write is one hop to the
store's single database thread (like the pages of a `$stream/` replay), each write its own
short transaction (a cursor commit without its own fsync: see `commit`).
`committed(offset)` is called by the store on the event loop after every group commit that
appended to the log: it wakes the bridges waiting for new rows (no polling).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ...errors import StoreError
from . import bridges as ops
from .cursors import Passed
from .log import LogRow, Page, Reader

if TYPE_CHECKING:
    from ..sqlite import SqliteStore

_T = TypeVar("_T")


class BridgeStoreSide:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.store_id = ""  # set at open
        self.last_committed = 0  # the log's last offset known committed
        self._listeners: list[Callable[[int], None]] = []

    # -- on the database thread, from SqliteStore ----------------------------------------

    def open_sync(self, conn: sqlite3.Connection) -> None:
        """At open, inside a transaction: the tables and the store id."""
        ops.ensure_tables(conn)
        self.store_id = ops.store_id(conn)

    # -- on the event loop ---------------------------------------------------------------

    def listen(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[int], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def committed(self, last_offset: int) -> None:
        """After a group commit (called by the store on the loop)."""
        if last_offset <= self.last_committed:
            return
        self.last_committed = last_offset
        for callback in list(self._listeners):
            callback(last_offset)

    def reader(self, bridge: str) -> Reader | None:
        """The bridge's reader as the log holds it in memory (read only)."""
        return self._store._log.log.readers.get(ops.reader_name(bridge))

    async def setup(self, bridges: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, int]:
        """Make (or update) the readers of the configured bridges and forget the readers of
        bridges no longer configured; returns each bridge's cursor."""
        def work(conn: sqlite3.Connection) -> dict[str, int]:
            log = self._store._log.log
            out: dict[str, int] = {}
            for name, filters in bridges:
                out[name] = ops.setup_reader(log, conn, name, filters).offset
            ops.forget_readers(log, conn, [name for name, _ in bridges])
            return out

        return await self._write(work)

    async def page(self, bridge: str, after: int, limit: int) -> Page:
        log = self._store._log.log
        return await self._read(lambda conn: ops.page(log, conn, bridge, after, limit))

    async def commit(self, bridge: str, offset: int,
                     consumed: Sequence[LogRow | Passed]) -> None:
        """Move the bridge's cursor. Written without its own fsync (see `_write`): it is
        made durable by the next fsynced commit (WAL frames are synced in order). A crash
        before that leaves the cursor where it was, never ahead of what the remote side
        acknowledged, so those messages are sent again and the remote drops them by their
        message id (Nats-Msg-Id, the Kafka/MQTT message id)."""
        await self.commit_now(bridge, offset, consumed)

    def commit_now(self, bridge: str, offset: int,
                   consumed: Sequence[LogRow | Passed]) -> Awaitable[None]:
        """`commit`, queued for the store's thread before this returns (await the result):
        a write asked for after it, e.g. a `drop`, runs after it (one thread, in order)."""
        log = self._store._log.log
        return self._result(self._submit(
            lambda conn: ops.commit(log, conn, bridge, offset, consumed), fsync=False))

    async def drop(self, bridge: str, max_bytes: int) -> ops.Skipped:
        log = self._store._log.log
        return await self._write(lambda conn: ops.drop(log, conn, bridge, max_bytes))

    async def positions(self) -> dict[tuple[str, str], int]:
        return await self._read(ops.positions)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        store: Any = self._store
        try:
            result: _T = await store._call(store._read_sync, fn)
        except sqlite3.Error as error:
            raise store_error(store, "read for a bridge", error) from None
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], _T], *, fsync: bool = True) -> _T:
        """`fn` in its own transaction (see `_submit`)."""
        return await self._result(self._submit(fn, fsync=fsync))

    def _submit(self, fn: Callable[[sqlite3.Connection], _T], *,
                fsync: bool = True) -> asyncio.Future[_T]:
        """Queue `fn` for the store's thread now, in its own transaction. fsync=False under
        durability "fsync": the commit is written with `synchronous = NORMAL` (to the OS,
        not fsynced; in WAL mode the file stays consistent), then FULL again."""
        store: Any = self._store
        relax = not fsync and getattr(store, "durability", None) == "fsync"

        def run(conn: sqlite3.Connection) -> _T:
            if relax:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.commit()
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    store._log.load(conn)  # the log's memory may be ahead of the file
                    raise
            finally:
                if relax:
                    conn.execute("PRAGMA synchronous = FULL")
            return result

        loop = asyncio.get_running_loop()
        if store._executor is None:
            closed: asyncio.Future[_T] = loop.create_future()
            closed.set_exception(StoreError(f"{store.path}: the store is not open"))
            return closed
        return loop.run_in_executor(
            store._executor, functools.partial(store._read_sync, run))

    async def _result(self, future: Awaitable[_T]) -> _T:
        try:
            result: _T = await future
        except sqlite3.Error as error:
            raise store_error(self._store, "write for a bridge", error) from None
        return result


def store_error(store: Any, doing: str, error: sqlite3.Error) -> StoreError:
    return StoreError(f"{store.path}: {doing}: {error}")


