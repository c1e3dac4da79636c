"""The log as a bridge's uplink process reads it: store/log/bridge_file.py's `LogFile`, its
own read-only connection to the store file (the broker stays the only writer).

`ChildLogReader` is the `LogReader` (bridge/forward.py) of the process: pages are read on the
process's event loop (see `ChildLogReader.read_after`), `wait_after` asks the broker to be
woken by its next group commit (no polling), and `commit_cursor` hands the acknowledged
cursor, with the offsets and sizes of the rows it passes, to the broker, which stores it
(server/bridge_proc.py).

*Drops of rows in flight.* When a `max_backlog_bytes` drop or the store budget skipped rows
(after, through], the broker says so ("log_dropped") and this reader answers how many of
them it holds: read, not yet acknowledged ("log_held"). Those count as dropped only if they
are given up (a failed window, a partial acknowledgement: they are not read again, the
store's cursor is past them), which is told at once ("log_released"); acknowledged, they
count as forwarded (the "ack" says how many of its rows were held). See
server/bridge_proc.py `ProcessForwarder.skipped`.
"""

from __future__ import annotations

import asyncio
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from ..bridge.base import BridgeMessage
from ..store.log.bridge_file import LogFile
from .bridge_log import raw_bridge_message


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
        self._held: set[int] = set()  # offsets of those a drop skipped (module docstring)
        self._acked = cursor  # the last cursor handed to the broker
        self._asked = -1  # the offset of the last "wait" sent
        self._wakeup = asyncio.Event()

    def close(self) -> None:
        self.file.close()

    def appended(self, offset: int) -> None:
        """The broker committed the log up to `offset`."""
        if offset > self.last_committed:
            self.last_committed = offset
        self._wakeup.set()

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        """The page is read on the event loop, then one loop turn is given up (what the
        windows sent before need: a sink's hand-over, acknowledgements that came in).

        Why not a thread, as the broker reads its store: this process has nothing else to
        keep responsive, and the thread cost more CPU per message than the read itself
        saved. It took the GIL back after every SQLite step (one per row) against a loop
        busy with the sink's work: a Kafka drain's uplink process used 9.0-11.2 us of CPU
        per message with the thread and 7.1-7.8 without it (benchmarks/results/h7-drain.md).
        A page of `window` rows holds the loop for well under a millisecond; only a store
        file that stays locked (SQLite's busy timeout, store/log/bridge_file.py) holds it
        longer, and then the forwarder has nothing to send anyway."""
        # Rows come as the bridge's messages straight from the raw rows (no LogRow).
        rows, end = self.file.page_of(raw_bridge_message, cursor, limit)
        # Kept before the loop turn: a word of a drop handled then must see them.
        self.rewind(cursor)  # read again from the cursor: replaces the rest
        self._rows.extend([(m.offset, m.size) for m in rows])
        await asyncio.sleep(0)
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

    def rewind(self, cursor: int) -> None:
        """What was read after `cursor` is given up (the forwarder reads again from it): rows
        of it a drop skipped will not be read again, so they are told dropped now."""
        kept = self._rows
        if not kept or kept[-1][0] <= cursor:
            return
        cut = bisect_right(kept, cursor, key=_offset)
        held = self._held
        if held:
            released = [offset for offset, _ in kept[cut:] if offset in held]
            if released:
                held.difference_update(released)
                self.send(("log_released", len(released)))
        del kept[cut:]

    def dropped(self, after: int, through: int) -> None:
        """The broker skipped the rows (after, through]: answer how many of them are held
        here (read, not acknowledged), and keep account of those (drops do not overlap:
        each starts at the stored cursor, past the one before)."""
        new = [offset for offset, _ in self._rows if after < offset <= through]
        self._held.update(new)
        self.send(("log_held", through, len(new)))

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
        """Hand `cursor` to the broker with the rows it passes: their count, their bytes and
        one array of their offsets and sizes (bridge_wire.py "ack"), copied whole into the
        frame, not a tuple per row to pickle here and rebuild in the broker."""
        if cursor <= self._acked:
            return
        self._acked = cursor
        rows = self._rows
        cut = bisect_right(rows, cursor, key=_offset)  # they are in offset order
        # Flattened to a list first: array("q") from a list is its fast path (from the
        # chain it cost a third more than pickling the tuples; so it costs the same).
        passed = list(chain.from_iterable(rows[:cut]))
        del rows[:cut]
        held = self._held
        late = 0
        if held:  # (rare: a drop skipped rows in flight)
            before = len(held)
            held.difference_update(passed[0::2])
            late = before - len(held)
        self.send(("ack", cursor, cut, sum(passed[1::2]), array("q", passed), late))


def _offset(row: tuple[int, int]) -> int:
    return row[0]
