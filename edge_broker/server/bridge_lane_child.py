"""The uplink process's side of the QoS 0 lane (docs/bridges.md "The QoS 0 lane").

The broker sends the process batches of QoS 0 messages ("lane" frames, server/
bridge_lane.py); `LaneReader.received` stores them in the lane's own file (store/log/
lane_file.py), several frames per transaction (one per turn of the process's loop), and
`LaneReader` is the `LogReader` (bridge/forward.py) of a second `Forwarder` in the process:
its cursor is over the lane's offsets (stored in the lane file), its sink has the store id
`<store_id>q`, so the lane's message ids (`<gateway_id>-<store_id>q-<lane offset>`) never
meet the log's. Pages come from memory for the rows appended lately (up to
`CACHE_BYTES`), else from the file (after a restart, or a long outage).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

from ..bridge.base import BridgeMessage
from ..store.log.lane_file import LaneFile

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

    def __init__(self, file: LaneFile, name: str) -> None:
        self.file = file
        self.name = name
        self._pending: list[tuple[int, int, float, bytes]] = []
        self._scheduled = False
        self._wakeup = asyncio.Event()
        self._recent: deque[tuple[int, int, bytes]] = deque()  # (first, count, blob)
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
        dropped = file.append(batches)
        recent = self._recent
        for count, size, _at, blob in batches:
            recent.append((first, count, blob))
            first += count
            self._recent_bytes += size
        while recent and (self._recent_bytes > CACHE_BYTES
                          or recent[0][0] + recent[0][1] - 1 <= file.cursor):
            self._recent_bytes -= len(recent.popleft()[2])
        if dropped:
            self._log_drops()
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
        recent = self._recent
        if recent and recent[0][0] <= after + 1:
            rows = [(first, blob) for first, count, blob in recent if first + count - 1 > after]
        else:
            rows = [(first, blob) for first, _at, blob in file.page(after, limit)]
        out: list[BridgeMessage] = []
        for first, blob in rows:
            out.extend(lane_messages(first, self._records(first, blob), after,
                                     limit - len(out)))
            if len(out) >= limit:
                break
        return out

    def _records(self, first: int, blob: bytes) -> list[tuple[Any, ...]]:
        decoded = self._decoded
        if decoded is not None and decoded[0] == first:
            return decoded[1]
        records: list[tuple[Any, ...]] = pickle.loads(blob)
        self._decoded = (first, records)
        return records

    async def wait_after(self, cursor: int) -> None:
        while self.file.next_offset - 1 <= max(cursor, self.file.cursor):
            self._wakeup.clear()
            await self._wakeup.wait()

    async def commit_cursor(self, cursor: int) -> None:
        self.file.commit_cursor(cursor)
        recent = self._recent
        while recent and recent[0][0] + recent[0][1] - 1 <= cursor:
            self._recent_bytes -= len(recent.popleft()[2])

    def status(self) -> dict[str, Any]:
        file = self.file
        return {"backlog_messages": file.backlog_messages,
                "backlog_bytes": file.backlog_bytes, "dropped": file.dropped,
                "oldest_at": file.oldest_at, "cursor": file.cursor}
