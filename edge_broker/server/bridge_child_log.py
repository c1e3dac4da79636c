"""The log as a bridge's uplink process reads it: store/log/bridge_file.py's `LogFile`, its
own read-only connection to the store file (the broker stays the only writer).

`ChildLogReader` is the `LogReader` (bridge/forward.py) of the process: pages are read on a
thread of their own (with a GIL switch interval of PAGE_READ_SWITCH_S in the process,
`use_page_read_switch`), `wait_after` asks the broker to be woken by its next group commit (no
polling), and `commit_cursor` hands the acknowledged cursor, with the (offset, size) of the
rows it passes, to the broker, which stores it (server/bridge_proc.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from ..bridge.base import BridgeMessage
from ..store.log.bridge_file import LogFile
from .bridge_log import raw_bridge_message

# The uplink process's GIL switch interval (Python's default: 5 ms). The page-read thread
# releases the GIL in each SQLite step (once per row) and must then wait for the event loop
# to give it back; with 5 ms a page of 256 rows took about 5 ms on the thread for under 1 ms
# of work while a drain's loop was busy with acknowledgements (benchmarks/ANALYSIS.md,
# round 5), and the forwarder waits for that page. Only this process (the loop and this
# one thread) is affected.
PAGE_READ_SWITCH_S: Final = 0.0005


def use_page_read_switch() -> None:
    """Set the process's GIL switch interval to PAGE_READ_SWITCH_S (the uplink process
    calls it at start; not done by `ChildLogReader` itself, which tests make in-process)."""
    if sys.getswitchinterval() > PAGE_READ_SWITCH_S:
        sys.setswitchinterval(PAGE_READ_SWITCH_S)


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
        # Rows come as the bridge's messages straight from the raw rows (no LogRow).
        rows, end = await loop.run_in_executor(self._pool, self.file.page_of,
                                               raw_bridge_message, cursor, limit)
        kept = self._rows
        if kept and kept[-1][0] > cursor:  # read again from the cursor: replaces the rest
            kept[:] = [r for r in kept if r[0] <= cursor]
        kept.extend([(m.offset, m.size) for m in rows])
        self.oldest_at = rows[0].publish_time if rows else None
        skip = self.skip_origin
        taken = rows
        for m in rows:
            if m.client_id == skip:  # its own downlink's: not sent back up (rare)
                taken = [m for m in rows if m.client_id != skip]
                break
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
