"""The uplink process's side of the QoS 0 lane (docs/bridges.md "The QoS 0 lane").

The broker sends the process batches of QoS 0 messages ("lane" frames, server/
bridge_lane.py); `LaneReader.received` stores them in the lane's own file (store/log/
lane_file.py), several frames per transaction (one per turn of the process's loop), and
`LaneReader` is the `LogReader` (bridge/forward.py) of a second `Forwarder` in the process:
its cursor is over the lane's offsets (stored in the lane file), its sink has the store id
`<store_id>q`, so the lane's message ids (`<gateway_id>-<store_id>q-<lane offset>`) never
meet the log's. Pages come from memory for the rows appended lately (up to
`CACHE_BYTES`), else from the file (after a restart, or a long outage).

*Order per topic across the two sources* (`LogGate`). Two forwarders on two connections
would let a QoS 0 message overtake an older one of the same topic when the older one is in
the other source: the log holds the bridge's QoS 0 messages published while no process ran
(at start-up, after a crash), the lane the others. Each run of the process gets the
broker's last log offset when its lane opened (`mark`) and stores it with every lane row:

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
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

from ..bridge.base import BridgeMessage
from ..store.log.lane_file import LaneFile, load_blob
from .bridge_child_log import ChildLogReader

log = logging.getLogger("edge_broker.bridges")

CACHE_BYTES: Final = 16 * 1024 * 1024  # blobs of the latest rows kept in memory
DROP_LOG_INTERVAL_S: Final = 10.0
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


class LaneReader:
    """`LogReader` over one bridge's lane file (see the module docstring)."""

    def __init__(self, file: LaneFile, name: str, mark: int) -> None:
        self.file = file
        self.name = name
        self.mark = mark  # this run's (see the module docstring)
        self.gate: LogGate | None = None
        self._pending: list[tuple[int, int, float, bytes]] = []
        self._scheduled = False
        self._wakeup = asyncio.Event()
        self.progress = asyncio.Event()  # set when the lane's cursor moved
        # (first, count, mark, blob)
        self._recent: deque[tuple[int, int, int, bytes]] = deque()
        self._recent_bytes = 0
        self._decoded: tuple[int, list[tuple[Any, ...]]] | None = None
        self._logged = file.dropped
        self._logged_at = -1e18
        self.forwarder_cursor_floor = file.cursor

    # -- writing -------------------------------------------------------------------------

    def received(self, count: int, size: int, at: float, blob: bytes) -> None:
        """A "lane" frame from the broker: stored at the end of this loop turn."""
        self._pending.append((count, size, at, blob))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        batches, self._pending = self._pending, []
        if not batches:
            return
        file = self.file
        first = file.next_offset
        dropped = file.append(batches, self.mark)
        recent = self._recent
        for count, size, _at, blob in batches:
            recent.append((first, count, self.mark, blob))
            first += count
            self._recent_bytes += size
        while recent and (self._recent_bytes > CACHE_BYTES
                          or recent[0][0] + recent[0][1] - 1 <= file.cursor):
            self._recent_bytes -= len(recent.popleft()[3])
        if dropped:
            self._log_drops()
            self.progress.set()
        self._wakeup.set()

    def _log_drops(self) -> None:
        now = time.monotonic()
        file = self.file
        if now - self._logged_at < DROP_LOG_INTERVAL_S:
            return
        log.warning("bridge %s: QoS 0 lane over max_backlog_bytes (%d): %d oldest message(s) "
                    "dropped (%d in all)", self.name, file.max_backlog_bytes,
                    file.dropped - self._logged, file.dropped)
        self._logged = file.dropped
        self._logged_at = now

    def close(self) -> None:
        self.flush()
        self.file.close()

    # -- LogReader -----------------------------------------------------------------------

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        file = self.file
        after = max(cursor, file.cursor)  # rows dropped for max_backlog_bytes are skipped
        if after >= file.next_offset - 1:
            return []
        out: list[BridgeMessage] = []
        done_to = self.gate.done_to if self.gate is not None else None
        for first, _count, mark, blob in self._rows_after(after, limit):
            if done_to is not None and mark > done_to:
                break  # the log's rows up to its mark go first
            out.extend(lane_messages(first, self._records(first, blob), after,
                                     limit - len(out)))
            if len(out) >= limit:
                break
        return out

    def _rows_after(self, after: int, limit: int) -> list[tuple[int, int, int, bytes]]:
        """The rows holding the offsets after `after`, about `limit` messages."""
        recent = self._recent
        if not recent or recent[0][0] > after + 1:
            return self.file.page(after, limit)
        out: list[tuple[int, int, int, bytes]] = []
        taken = 0
        for row in recent:  # oldest first; stops after `limit` messages
            last = row[0] + row[1] - 1
            if last <= after:
                continue
            out.append(row)
            taken += last - max(after, row[0] - 1)
            if taken >= limit:
                break
        return out

    def _ready_after(self, cursor: int) -> bool:
        """Whether a row after `cursor` may go now."""
        file = self.file
        after = max(cursor, file.cursor)
        if file.next_offset - 1 <= after:
            return False
        if self.gate is None:
            return True
        rows = self._rows_after(after, 1)
        return bool(rows) and rows[0][2] <= self.gate.done_to

    def _records(self, first: int, blob: bytes) -> list[tuple[Any, ...]]:
        decoded = self._decoded
        if decoded is not None and decoded[0] == first:
            return decoded[1]
        records = load_blob(self.file.path, first, blob)
        self._decoded = (first, records)
        return records

    async def wait_after(self, cursor: int) -> None:
        while not self._ready_after(cursor):
            self._wakeup.clear()
            await self._wakeup.wait()

    def wake(self) -> None:
        self._wakeup.set()

    async def commit_cursor(self, cursor: int) -> None:
        self.file.commit_cursor(cursor)
        recent = self._recent
        while recent and recent[0][0] + recent[0][1] - 1 <= cursor:
            self._recent_bytes -= len(recent.popleft()[3])
        self.progress.set()

    def status(self) -> dict[str, Any]:
        file = self.file
        return {"backlog_messages": file.backlog_messages,
                "backlog_bytes": file.backlog_bytes, "dropped": file.dropped,
                "oldest_at": file.oldest_at, "cursor": file.cursor}


class LogGate:
    """The log forwarder's `LogReader` in a process with a lane: the `ChildLogReader`, with
    the order between the two sources kept (see the module docstring)."""

    def __init__(self, reader: ChildLogReader, lane: LaneReader, mark: int) -> None:
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
