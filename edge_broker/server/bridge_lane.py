"""The broker's side of the QoS 0 lane (docs/bridges.md "The QoS 0 lane").

While a bridge's uplink process runs (`separate_process = true`), the QoS 0 messages that
only that bridge's uplink takes are not appended to the store's log: the core puts them on
`core.lane_out` (core/streams.py `_to_lane`, a list per reader), and `LaneHub` drains it
once per event-loop turn and hands each bridge's messages to its `Lane`, which encodes them
(store/log/lane_codec.py: per message a small struct head, the topic and client id only
when they differ from the previous message's, the payload, the properties the bridge's
headers carry) into the row it is gathering. A row is appended to the lane's own file
(store/log/lane_file.py) - one INSERT and one commit, WAL, synchronous NORMAL, on the
file's writer thread, so neither they nor SQLite's WAL checkpoint sync hold the event loop -
once it holds `ROW_BYTES`, or `ROW_INTERVAL_S` after the previous append (at once if that is
older): at full speed a row carries several loop turns, at low rates every turn is
appended at once. A crash of the broker loses what was being gathered, at most that
interval (QoS 0 is at most once; nothing is acknowledged for it); the lane's offsets are
given at the append, in order, so the order and the message ids are those of one row per
turn.

The process reads the file (server/bridge_lane_child.py), learning of new rows by reading
the file itself; only once it read everything does it ask ("lane_wait", its last offset),
and the broker answers with a small frame over the process's socketpair
(server/bridge_wire.py), at once or after the next committed row: ("lane", last offset
committed, cursor).
A busy process gets no frames (but for a drop, below), an idle one one per append. It
reports each cursor the remote side acknowledged ("lane_ack"); the broker stores it and
deletes the rows it passes: the broker is the file's only writer.

Nothing is buffered towards the process beyond the row being gathered and the rows queued
for the writer thread (at most `MAX_QUEUED_ROWS`, 64 rows, or `MAX_QUEUED_BYTES`, 16 MiB of
messages: store/log/lane_file.py), so a process that does not keep up loses
nothing: the backlog waits in the file, bounded by `max_backlog_bytes` (the oldest rows
dropped, counted and logged; the process is told at once and answers which of them it
had read already: those it may still send, counted as forwarded if it does). A writer
thread that does not keep up (a stalled disk): the row keeps gathering, up to
`BEHIND_ROWS` x `ROW_BYTES`; beyond, its messages are dropped, counted in the bridge's
`dropped` and logged, as a row the file refused is. While the process is not running
(starting, restarting) its lane is closed (what was gathered is appended first) and the
core appends those messages to the log as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..core.queues import DROP_LOG_INTERVAL_S
from ..errors import StoreError
from ..store.log.lane_codec import LaneBatch
from .droplog import DropLog

if TYPE_CHECKING:
    from ..core.broker import BrokerCore
    from ..core.changes import Message
    from ..store.log.lane_file import LaneFile
    from .bridge_proc import ProcessForwarder
    from .bridge_status import BridgeStatus

log = logging.getLogger("edge_broker.bridges")

# A lane row is appended once it holds ROW_BYTES, or ROW_INTERVAL_S after the last append
# (at once when the last append is older): at most ~200 INSERTs and commits a second.
ROW_BYTES: Final = 256 * 1024
ROW_INTERVAL_S: Final = 0.005
# While the lane file's writer thread is behind (its queue full), a row keeps gathering up to
# this many times ROW_BYTES; beyond, its messages are dropped, counted and logged.
BEHIND_ROWS: Final = 4


class Lane:
    """One bridge's lane while its uplink process runs: appends the loop turns' messages to
    the lane file (the file outlives the process: `ProcessForwarder.lane_file`), several
    turns to a row (see the module docstring), and tells the process what was committed
    when it asks ("lane_wait", `wanted`)."""

    def __init__(self, name: str, skip_origin: str, file: LaneFile, mark: int,
                 notify: Callable[[tuple[Any, ...]], None], *,
                 row_bytes: int = ROW_BYTES, row_interval_s: float = ROW_INTERVAL_S) -> None:
        self.name = name
        self.skip_origin = skip_origin
        self.file = file
        self.mark = mark  # the log's last offset when this lane opened (LogGate)
        self.notify = notify
        self.row_bytes = row_bytes
        self.row_interval_s = row_interval_s
        self.sent = 0
        self.dropped = 0  # not stored: the file could not be written
        self._batch = LaneBatch()
        self._committed_at = -1e18  # time.monotonic() of the last row's append
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: int | None = None  # the process waits for a row past this offset
        # A new run of the process starts at the stored cursor: the rows the previous run
        # may have read before they were dropped are not sent now (they count as dropped).
        file.settle()
        self._cut = 0  # messages max_backlog_bytes dropped since this lane opened
        self._drop_log = DropLog()  # of _cut
        self._told = -1  # the drop floor the process was told of last (-1: none)
        self._failed_at = -1e18
        # Writes run on the file's own thread (store/log/lane_file.py), which tells this
        # lane, on the loop, when each finished.
        self._loop = asyncio.get_running_loop()
        self._wake_pending = False
        file.on_written = self._written_threadsafe

    def send(self, messages: list[Message]) -> None:
        """A loop turn's messages: into the row being gathered, which is appended now if it
        reached `row_bytes` or no row was appended for `row_interval_s`, else by a timer at
        the end of that interval."""
        batch = self._batch
        if not batch.add(messages, self.skip_origin):
            return
        if batch.size >= self.row_bytes:
            self.flush()
            return
        wait = self.row_interval_s - (time.monotonic() - self._committed_at)
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Queue the row being gathered for the lane file's writer thread (one INSERT and
        one commit there). While that thread is `queue_full` (a slow disk) the row keeps
        gathering, up to BEHIND_ROWS x `row_bytes`; beyond, its messages are dropped, counted
        and logged (`force`: queued anyway, when the lane closes)."""
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        batch = self._batch
        if not batch.count:
            return
        file = self.file
        if file.queue_full and not force:
            if batch.size < self.row_bytes * BEHIND_ROWS:  # again after the next write
                self._timer = asyncio.get_running_loop().call_later(
                    self.row_interval_s, self._on_timer)
                return
            count, _at, _blob = batch.take()
            self._lost(count, f"{file.path}: the writer is behind "
                              f"({file.max_queued_rows} rows or "
                              f"{file.max_queued_bytes // 1048576} MiB queued)")
            return
        count, at, blob = batch.take()
        self._committed_at = time.monotonic()
        try:
            dropped = file.append([(count, len(blob), at, blob)], self.mark)
        except StoreError as exc:  # lost (QoS 0, at most once)
            self._lost(count, str(exc))
            return
        self.sent += count
        if dropped:
            self._cut += dropped
            self._log_drops()
            # The process learns of the drop at once (it skips the rest of those rows) and
            # answers which of them it had read already ("lane_held", LaneFile.held):
            # until then they are not counted as dropped, nor after as forwarded.
            self.tell()

    def tell(self) -> None:
        """Tell the process of the drops since the last word, if any, once it answered that
        word or acknowledged past it (one word at a time: a stopped process does not pile
        up frames): after a drop, an answer, an acknowledgement (server/bridge_proc.py).
        Without the last, drops made while a word was out stayed untold, so unsettled
        (counted nowhere), until the next drop, when the process acknowledged past the
        word instead of answering it."""
        file = self.file
        # A drop since the last word (its floor: drops move `drop_cursor`, an
        # acknowledgement only `cursor`: a word per acknowledgement would be a frame for
        # nothing), and the last word answered or acknowledged past.
        if (file.drop_cursor > self._told
                and max(file.answered_to, file.acked) >= self._told):
            self._told = file.cursor
            self.notify(("lane", file.next_offset - 1, file.cursor))

    def held(self, floor: int, runs: list[tuple[int, int]]) -> None:
        """The process's answer to the word of a drop ("lane_held": LaneFile.held); told at
        once of the drops since, if any."""
        self.file.held(floor, runs)
        self.tell()

    def _lost(self, count: int, why: str) -> None:
        """`count` messages not stored (the file cannot be written, or its writer is
        behind): counted in `dropped` and logged (at most every DROP_LOG_INTERVAL_S)."""
        self.dropped += count
        now = time.monotonic()
        if now - self._failed_at >= DROP_LOG_INTERVAL_S:
            self._failed_at = now
            log.error("bridge %s: cannot store QoS 0 lane messages: %s: %d "
                      "message(s) dropped (%d in all)", self.name, why, count, self.dropped)

    def _written_threadsafe(self) -> None:
        """The file's writer thread finished a write: `_written` on the loop (once for the
        writes finished until it runs), if there is something to do there: a process
        waiting to be told, a write that failed. (No wake-up of the loop per row otherwise:
        a row that waits for room in the queue is retried by its timer.)"""
        if self._waiting is None and not self.file.write_failed:
            return
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._written)

    def _written(self) -> None:
        """On the loop, after the writer thread committed: count the rows it could not
        write, tell a waiting process, queue a row that waited for room."""
        self._wake_pending = False
        file = self.file
        lost, error = file.collect()
        if lost:
            self.sent -= lost
            self._lost(lost, error)
        waiting = self._waiting
        if waiting is not None and file.next_offset - 1 > waiting:
            self._waiting = None
            self.notify(("lane", file.next_offset - 1, file.cursor))
        if self._batch.count and not file.queue_full and (
                self._batch.size >= self.row_bytes
                or time.monotonic() - self._committed_at >= self.row_interval_s):
            self.flush()

    def wanted(self, after: int) -> None:
        """The process read every row up to `after` ("lane_wait"): tell it at once if the
        file goes further, else after the next committed row."""
        file = self.file
        # Waiting first, then the check: the writer thread sets `next_offset` before it
        # looks at `_waiting`, so a commit in between is told by one or the other.
        self._waiting = after
        if file.next_offset - 1 > after:
            self._waiting = None
            self.notify(("lane", file.next_offset - 1, file.cursor))

    def close(self) -> None:
        """Queue what is gathered; no timer stays behind (the file's writer thread writes
        it; the file outlives the lane). Drops not logged yet are logged now."""
        self.flush(force=True)
        self.file.on_written = None
        self._log_drops(every=True)

    def _log_drops(self, *, every: bool = False) -> None:
        new = self._drop_log.due(self._cut, every=every)  # `every`: closing
        if not new:
            return
        # (`file.dropped` only grows: the rows the process had read before they were dropped
        # join it once it says whether it sent them.)
        log.warning("bridge %s: QoS 0 lane over max_backlog_bytes (%d): %d oldest message(s) "
                    "dropped (%d counted in all)", self.name, self.file.max_backlog_bytes,
                    new, self.file.dropped)


class LaneHub:
    """Drains the core's lane list once per loop turn into the open lanes."""

    def __init__(self, core: BrokerCore, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.loop = loop
        self.lanes: dict[str, Lane] = {}  # reader name -> lane
        # reader -> messages drained after their lane closed (the process ended meanwhile)
        self.lost: dict[str, int] = {}
        self._scheduled = False
        core.lane_wake = self._wake

    def open(self, reader: str, lane: Lane) -> None:
        self.lanes[reader] = lane
        self.core.lane_open = frozenset(self.lanes)

    def close(self, reader: str) -> None:
        """The process ended or stops: from now on the core appends to the log again (what
        the core put on the lane until now is sent first, if the process still reads)."""
        if reader in self.lanes:
            self.drain()
            self.lanes.pop(reader).close()
            self.core.lane_open = frozenset(self.lanes)

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self._scheduled = False
        core = self.core
        out = core.lane_out
        if not out:
            return
        core.lane_out = {}
        lanes = self.lanes
        for name, messages in out.items():
            lane = lanes.get(name)
            if lane is None:
                self.lost[name] = self.lost.get(name, 0) + len(messages)
                continue
            lane.send(messages)


def add_lane_figures(status: BridgeStatus, forwarder: ProcessForwarder) -> None:
    """The lane's figures into the bridge's (docs/bridges.md "The QoS 0 lane"): its stored
    backlog and its drops (max_backlog_bytes, and those the broker could not store)."""
    status.dropped += forwarder.lane_dropped
    file = forwarder.opened_lane_file  # (the status never opens it)
    if file is None:
        return
    status.backlog_messages += file.backlog_messages
    status.backlog_bytes += file.backlog_bytes
    status.dropped += file.dropped
