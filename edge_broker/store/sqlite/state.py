"""The state the parts of `SqliteStore` share, and the one hop to the database thread.

*Threads.* The one sqlite3 connection lives in the single thread of a private executor; each
operation (a whole group transaction, a query, a vacuum step) is ONE hop to that thread, and
the hot inserts/deletes run as multi-row statements (`_MultiRow`, sql.py). Python's sqlite3
releases the GIL around every statement step and the writer must win it back from a busy event
loop each time, so hops and steps, not rows, are what a loaded broker pays for. (aiosqlite
costs a hop per statement, about ten per commit: measured 10x fewer commits/s than one hop
with a busy loop and small groups, so it is not used here.)

`SqliteStore` (store.py) is put together from one mixin per responsibility: `Opening`
(opening.py), `Writer` (writer.py), `Maintenance` (maintenance.py) and `Space` (space.py).
They hold methods only; the attributes they share are declared here and set in
`SqliteStore.__init__`, and what one mixin calls of another is declared here for the type
checker.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from ...errors import StoreError
from ..log.bridge_store import BridgeStoreSide
from ..log.keeper import LogKeeper
from .guard import FileGuard
from .plan import _Pending

_T = TypeVar("_T")

Durability = Literal["fsync", "os", "none"]
_SYNCHRONOUS: Final[dict[str, str]] = {"fsync": "FULL", "os": "NORMAL", "none": "OFF"}


class StoreState:
    """What the mixins of SqliteStore share; everything is set in SqliteStore.__init__."""

    path: Path
    durability: str
    max_store_bytes: int
    ballast_bytes: int
    disk_reserve_bytes: int
    ballast_path: Path
    _executor: ThreadPoolExecutor | None
    _conn: sqlite3.Connection | None
    _queue: deque[_Pending]
    _queued_changes: int
    _busy: bool
    _wakeup: asyncio.Event
    _writer: asyncio.Task[None] | None
    _closing: bool
    _failed: StoreError | None
    _delivery_hwm: int
    _message_hwm: int
    _disk_full: bool
    _disk_tight: bool
    _used_bytes: int
    _free_bytes: int
    _size_checked_at: float
    _vacuumed_at: float
    _give_way_at: float
    _give_way_more: bool
    _room_wanted: int
    on_room_wanted: Callable[[int], None] | None
    _auto_vacuum: bool
    commits: int
    batches: int
    fsyncs: int
    changes_written: int
    rows_written: int
    vacuum_steps: int
    _commit_attempts: int
    _guard: FileGuard
    _log: LogKeeper
    bridges: BridgeStoreSide
    quarantined_at_open: int

    if TYPE_CHECKING:  # implemented by the mixins (and store.py), called across them
        @property
        def full(self) -> bool: ...
        def _check_file(self, group: list[_Pending] | None = None) -> None: ...
        def _check_disk(self) -> None: ...
        async def _recover_space(self) -> None: ...
        def _drop_ballast(self) -> bool: ...
        def _checkpoint_sync(self) -> bool: ...
        def _check_size_sync(self) -> None: ...
        def _retention_sync(self) -> None: ...
        def _give_way_wanted(self, now: float) -> bool: ...
        def _give_way_sync(self) -> None: ...
        async def _maintain(self, work: Callable[[], None]) -> None: ...
        async def _idle(self) -> None: ...

    # -- the database thread ------------------------------------------------------------
    #
    # Every method ending in _sync runs in the executor's single thread, one whole operation
    # (a transaction, a query) per hop: a busy event loop costs the writer one hand-off per
    # commit, not one per statement.

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: the store is not open")
        return self._conn
