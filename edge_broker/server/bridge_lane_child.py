"""The uplink process's side of the QoS 0 lane (docs/bridges.md "The QoS 0 lane").

The broker appends the lane's messages to the lane's own file (store/log/lane_file.py,
server/bridge_lane.py). `LaneReader` learns of new rows by reading the file itself
(`LaneView.poll`, when it has read everything it knew of); only when the file has nothing
new does it ask the broker ("lane_wait"), which answers once it appended more ("lane"
frames: the last offset written and the cursor below which rows were deleted). It reads
the file read-only (`LaneView`) and is the `LogReader` (bridge/forward.py) of a second
`Forwarder` in the process: its cursor is over the lane's offsets, its sink has the store id
`<store_id>q`, so the lane's message ids (`<gateway_id>-<store_id>q-<lane offset>`) never
meet the log's. Each cursor the remote side acknowledged goes to the broker ("lane_ack"),
which stores it and deletes the rows it passes.

*Order per topic across the two sources* (`LogGate`). Two forwarders on two connections
would let a QoS 0 message overtake an older one of the same topic when the older one is in
the other source: the log holds the bridge's QoS 0 messages published while no process ran
(at start-up, after a crash), the lane the others. Each run of the process has the
broker's last log offset when its lane opened (`mark`), stored with every lane row:

- a lane row goes out only once the log forwarder acknowledged every row of the bridge's up
  to the row's mark (`LogGate.done_to`);
- a QoS 0 log row at an offset in (mark of the oldest lane row not acknowledged, this run's
  mark] - published while no process ran, after lane rows of an earlier run - is held back
  until those lane rows are acknowledged. QoS 1/2 rows are never held (MQTT orders per
  topic per QoS).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from ..bridge.base import BridgeMessage
from ..bridge.forward import LogReader
from ..store.log.lane_view import LaneView, load_blob, take_runs

log = logging.getLogger("edge_broker.bridges")

LANE_ID_SUFFIX: Final = "q"  # lane message ids: <gateway_id>-<store_id>q-<lane offset>


def lane_messages(first: int, records: list[tuple[Any, ...]], after: int,
                  limit: int) -> list[BridgeMessage]:
    out: list[BridgeMessage] = []
    skip = max(0, after + 1 - first)
    offset = first + skip
    for topic, payload, retain, origin, at, props in records[skip:skip + limit]:
        if props is None:
            out.append(BridgeMessage(offset, topic, payload, 0, retain, at, origin))
        else:
            out.append(BridgeMessage(offset, topic, payload, 0, retain, at, origin,
                                     props[0], props[1], props[2]))
        offset += 1
    return out


class _Gate(Protocol):
    """What the lane needs of the `LogGate` beside it."""

    done_to: int


class _LogSide(LogReader, Protocol):
    """What the `LogGate` needs of the log's reader (`ChildLogReader`)."""

    last_committed: int

    def rewind(self, cursor: int) -> None: ...


class LaneReader:
    """`LogReader` over one bridge's lane file (see the module docstring)."""

    def __init__(self, file: LaneView, mark: int,
                 send: Callable[[tuple[Any, ...]], None]) -> None:
        self.file = file
        self.mark = mark  # this run's (see the module docstring)
        self.send = send
        self.gate: _Gate | None = None  # a LogGate (typed by what it must have)
        self._wakeup = asyncio.Event()
        self.progress = asyncio.Event()  # set when the lane's cursor moved
        # the row decoded last: (first offset, records, mark)
        self._decoded: tuple[int, list[tuple[Any, ...]], int] | None = None
        self._asked = -1  # the offset of the last "lane_wait" sent
        # [first, last] offsets of the runs of messages handed to the forwarder and not
        # acknowledged yet, in order: "lane_ack" says how many it delivered, so the broker
        # counts a row it dropped after this process read it as forwarded, not as dropped.
        self._handed: deque[list[int]] = deque()
        self._answered = 0  # the drop floor of the last "lane_held" (0: none)

    def appended(self, last: int, floor: int) -> None:
        """A "lane" frame from the broker (the answer to a "lane_wait"): rows committed up
        to `last`, deleted up to `floor` (acknowledged, or dropped for
        max_backlog_bytes)."""
        before = self.file.cursor
        self.file.refresh(last, floor)
        if self.file.cursor != before:
            self.progress.set()
        if floor > before:
            # Rows dropped for max_backlog_bytes: the rest of them is skipped from now on;
            # the broker counts them as dropped but for those handed out and not yet
            # acknowledged, settled by the next "lane_ack" (LaneFile.held), or by
            # `rewind` when the forwarder gives them up.
            self._answer(floor)
        self._wakeup.set()

    def _answer(self, floor: int) -> None:
        """Answer the word of the drops up to `floor` ("lane_held"): the runs of their
        messages handed out and not acknowledged."""
        self._answered = floor
        held = []
        for first, end in self._handed:
            if first > floor:
                break
            held.append((first, min(end, floor)))
        self.send(("lane_held", floor, tuple(held)))

    def rewind(self, cursor: int) -> None:
        """The forwarder gave up what it had read after `cursor` (a window failed, the
        connection was lost, a resend): it reads again from `cursor`, now or after a
        backoff delay (bridge/forward.py). What it held of rows dropped for
        max_backlog_bytes (named in the last "lane_held") will not be sent: the drop floor
        is skipped. The broker is told at once (a "lane_held" again, with what is still
        held), so that they count as dropped now, not at the next acknowledgement, which
        an outage puts off for as long as it lasts."""
        handed = self._handed
        floor = self._answered
        gave_up = False
        while handed and handed[-1][0] > cursor:
            gave_up = gave_up or handed[-1][0] <= floor
            handed.pop()
        if handed and handed[-1][1] > cursor:
            gave_up = gave_up or cursor < floor
            handed[-1][1] = cursor
        if gave_up:
            self._answer(floor)

    def close(self) -> None:
        self.file.close()

    # -- LogReader -----------------------------------------------------------------------

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        self.rewind(cursor)  # (read again: the forwarder started over, if it did)
        return self._read_after(cursor, limit)

    def _take(self, out: list[BridgeMessage], first: int, records: list[tuple[Any, ...]],
              after: int, limit: int) -> None:
        """The messages of one row after `after` into `out`, noted as handed out (a run of
        consecutive offsets; a row dropped before it leaves a gap)."""
        taken = lane_messages(first, records, after, limit)
        if not taken:
            return
        out.extend(taken)
        start = taken[0].offset
        end = taken[-1].offset
        handed = self._handed
        if handed and handed[-1][1] + 1 == start:
            handed[-1][1] = end
        else:
            handed.append([start, end])

    def _read_after(self, cursor: int, limit: int) -> list[BridgeMessage]:
        file = self.file
        after = max(cursor, file.cursor)  # rows dropped for max_backlog_bytes are skipped
        if after >= file.next_offset - 1 and not file.poll():
            return []
        out: list[BridgeMessage] = []
        done_to = self.gate.done_to if self.gate is not None else None
        decoded = self._decoded
        if decoded is not None and decoded[0] <= after < decoded[0] + len(decoded[1]) - 1:
            # The next message is in the row decoded last (a row holds up to 5 ms of the
            # broker's turns, often more than a window): taken from it, the file not read.
            # (Were that row dropped for max_backlog_bytes meanwhile, the broker's word of
            # it not come yet, its rest goes out anyway: sent, and "lane_ack" tells the
            # broker, which counts them as forwarded, not dropped.)
            first, records, mark = decoded
            if done_to is not None and mark > done_to:
                return out  # the log's rows up to its mark go first
            self._take(out, first, records, after, limit)
            if len(out) >= limit:
                return out
            after = first + len(records) - 1
        for first, count, mark, blob in self.file.page(after, limit - len(out)):
            if done_to is not None and mark > done_to:
                break  # the log's rows up to its mark go first
            self._take(out, first, self._records(first, count, mark, blob), after,
                       limit - len(out))
            if len(out) >= limit:
                break
        return out

    def _ready_after(self, cursor: int) -> bool:
        """Whether a row after `cursor` may go now."""
        file = self.file
        after = max(cursor, file.cursor)
        if file.next_offset - 1 <= after:
            return False
        # No row after `after` although offsets were given past it: a row write the
        # broker's writer thread failed (its offsets are not reused) - nothing to read.
        mark = file.mark_after(after)
        if self.gate is None:
            return mark is not None
        return mark is not None and mark <= self.gate.done_to

    def _records(self, first: int, count: int, mark: int,
                 blob: bytes) -> list[tuple[Any, ...]]:
        decoded = self._decoded
        if decoded is not None and decoded[0] == first:
            return decoded[1]
        records = load_blob(self.file.path, first, blob, count)
        self._decoded = (first, records, mark)
        return records

    async def wait_after(self, cursor: int) -> None:
        file = self.file
        while not self._ready_after(cursor):
            known = file.next_offset - 1
            after = max(cursor, file.cursor)
            # Everything known is read: also when the offsets after `after` have no row (a
            # failed write's, at the end): else the process would never ask again.
            if known <= after or file.mark_after(after) is None:
                if file.poll():
                    continue
                if self._asked != known:  # the broker answers once the file goes further
                    self._asked = known
                    self.send(("lane_wait", known))
            self._wakeup.clear()
            await self._wakeup.wait()

    def wake(self) -> None:
        self._wakeup.set()

    async def commit_cursor(self, cursor: int) -> None:
        self.file.advance(cursor)
        delivered = take_runs(self._handed, cursor)  # handed out and now acknowledged
        # The broker stores it, deletes the rows, and counts what was delivered.
        self.send(("lane_ack", cursor, delivered))
        self.progress.set()

    def status(self) -> dict[str, Any]:
        return {"cursor": self.file.cursor}


class LogGate:
    """The log forwarder's `LogReader` in a process with a lane: the `ChildLogReader`, with
    the order between the two sources kept (see the module docstring)."""

    def __init__(self, reader: _LogSide, lane: LaneReader, mark: int) -> None:
        self.reader = reader
        self.lane = lane
        self.mark = mark
        self.done_to = 0  # every row of the bridge's in the log up to here is acknowledged
        self._held = 0  # the offset of the row the last read held back (0: none)
        self._empty_to = 0  # the last read found none of the bridge's rows up to here
        lane.gate = self

    def _done(self, offset: int) -> None:
        if offset > self.done_to:
            self.done_to = offset
            self.lane.wake()

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        committed = self.reader.last_committed  # before the read: the read sees at least it
        batch = await self.reader.read_after(cursor, limit)
        self._held = 0
        self._empty_to = 0 if batch else committed
        oldest = self.lane.file.pending_mark
        if oldest is None or oldest >= self.mark:
            return batch
        for i, message in enumerate(batch):
            if not message.qos and oldest < message.offset <= self.mark:
                self._held = message.offset
                return batch[:i]
        return batch

    async def wait_after(self, cursor: int) -> None:
        # The forwarder waits only with nothing in flight: everything it read is
        # acknowledged, and the read after `cursor` found nothing it may send.
        held = self._held
        if held:
            self._done(held - 1)
            progress = self.lane.progress
            while (oldest := self.lane.file.pending_mark) is not None and oldest < held:
                progress.clear()
                await progress.wait()
            return
        self._done(max(cursor, self._empty_to))
        await self.reader.wait_after(cursor)

    async def commit_cursor(self, cursor: int) -> None:
        await self.reader.commit_cursor(cursor)
        self._done(cursor)

    def rewind(self, cursor: int) -> None:
        self.reader.rewind(cursor)
