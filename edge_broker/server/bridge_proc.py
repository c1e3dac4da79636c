"""The broker's side of a bridge's uplink process (`separate_process = true`, docs/bridges.md
"A separate uplink process").

`ProcessForwarder` stands where the in-process `Forwarder` and `StoreLogReader` stand in
server/bridges.py: it starts the process (server/bridge_child.py) with the broker's own
interpreter, supervises it (a process that ends unexpectedly, e.g. SIGKILLed, is started
again after a backoff delay, from the stored cursor), and serves it over one socketpair
(server/bridge_wire.py):

- *waiting for the log*: the process asks to be woken once the log is committed past an
  offset; the store's group commits (`BridgeStoreSide.listen`) answer it - one comparison per
  commit, nothing polled;
- *the cursor*: the process sends each cursor the remote side acknowledged, with the
  count and bytes of the rows it passes and their offsets and sizes in one array
  (`store.log.cursors.Passed`: the broker's work per acknowledgement does not grow with
  its messages); they are stored
  here, by the store's writer thread, exactly as in-process (one short transaction,
  coalesced: one write at a time carrying the latest cursor; `StoreLogReader` does the
  same). The broker stays the only writer of the file, and the reader's backlog counts in
  its memory stay exact (rows a drop skipped meanwhile are not counted out twice);
- *status*: the process sends its `ForwarderStatus` fields when they change (at most every
  0.2 s); `status` here adds what the earlier runs of the process forwarded, refused,
  left unrouted and failed.

Durability is the in-process one: the cursor moves only after the remote side acknowledged;
a crash of either process loses nothing, and what was sent after the stored cursor is sent
again with the same message ids (duplicates only within the remote's dedup window). Cursor
commits start at most once per `COMMIT_INTERVAL_S` (the acknowledgements meanwhile are
coalesced), so the stored cursor lags the acknowledged one by at most that long plus the
commit under way: that is all a crash adds to the resend (`flush`, at a graceful stop,
commits at once). A `max_backlog_bytes` drop and the store budget's tier 2 call `store_acked`
first, which queues the write of the acknowledged cursor for the store's thread at once, ahead
of theirs: they skip no row whose acknowledgement the broker holds. Rows they skip that the
process has in flight count as dropped only if it gives them up (`skipped`,
server/bridge_drops.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import quote

from ..bridge.base import Backoff
from ..bridge.config import BridgeConfig
from ..bridge.forward import ForwarderStatus
from ..errors import StoreError
from ..store.log.bridge_store import BridgeStoreSide
from ..store.log.bridges import reader_name
from ..store.log.cursors import Passed
from ..store.log.lane_file import LaneFile
from .bridge_drops import DropSettler, count_none
from .bridge_lane import Lane, LaneHub
from .bridge_wire import encode_config, frame, read_frame

log = logging.getLogger("edge_broker.bridges")

CHILD_CODE: Final = "from edge_broker.server.bridge_child import main; main()"
STOP_TIMEOUT_S: Final = 10.0  # a stopping process that takes longer is killed
STABLE_S: Final = 30.0  # a process that ran this long resets the restart backoff
# At most one cursor commit started per this many seconds (the first at once): during a
# drain the process acknowledges a window every few ms, and each commit costs the event loop
# a hop to the store's thread and back. So the stored cursor lags what the remote side
# acknowledged by at most this long (plus the commit under way); a crash re-sends those
# messages, which the remote drops by message id. flush() (a graceful stop) does not wait.
COMMIT_INTERVAL_S: Final = 0.025


def _die_with_parent() -> None:
    """In the child, before exec: prctl(PR_SET_PDEATHSIG, SIGKILL), so the uplink process
    never outlives a broker that was killed (Linux; elsewhere the socket's end stops it)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child_setup(nice: int) -> Callable[[], None]:
    """The child's set-up before exec: `_die_with_parent`, and `process_nice` (a lower CPU
    priority than the broker's: the broker and its clients get the cores first, the uplink
    forwards with what is left)."""
    def setup() -> None:
        _die_with_parent()
        if nice:
            os.nice(nice)
    return setup


class ProcessForwarder:
    """The uplink of one bridge, run by a process of its own (see the module docstring)."""

    def __init__(self, config: BridgeConfig, side: BridgeStoreSide, *, path: str,
                 gateway_id: str, store_id: str, cursor: int,
                 dropped: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.side = side
        self.path = path
        self.gateway_id = gateway_id
        self.store_id = store_id
        self.status = ForwarderStatus(cursor=cursor)
        self._log_oldest_at: float | None = None  # the process's, of the log
        self.pid: int | None = None
        self.starts = 0  # processes started (1 + restarts)
        self._writer: asyncio.StreamWriter | None = None
        self._told = False  # the running process has its "init": it may be asked things
        self._waiting: int | None = None  # the process waits for a commit past this
        self._stopping = False
        self._base_forwarded = 0
        self._base_refused = 0
        self._base_unrouted = 0
        self._base_failures = 0
        self._ended = asyncio.Event()
        # Cursor commits, coalesced (as server/bridge_log.py): the rows of each
        # acknowledgement in no write yet, with its cursor; and those of the writes not yet
        # known stored, which every later write carries again (a row passes a cursor once
        # in the store: cursors.py `after`), so that the first write failing and the next
        # succeeding still counts them (they leave it once stored).
        self._passed: list[tuple[int, Passed]] = []
        self._writing: list[tuple[int, Passed]] = []
        self._target = 0  # the latest acknowledged cursor
        self._queued = 0  # the cursor of the last write queued for the store's thread
        self._stored = 0
        # Rows (and bytes) in _passed and _writing.
        self._unstored_count = 0
        self._unstored_bytes = 0
        self._writes: set[asyncio.Task[bool]] = set()  # queued, not yet done
        self._committer: asyncio.Task[None] | None = None
        self._commit_error: BaseException | None = None
        self._commit_at = -COMMIT_INTERVAL_S  # loop time the last commit started
        self._nap: asyncio.Future[None] | None = None  # the committer waiting for its turn
        self._hurry = False  # flush(): commit without waiting for the interval
        # The QoS 0 lane (server/bridge_lane.py): open while the process runs, when set.
        self.lanes: LaneHub | None = None
        self.lane: Lane | None = None
        self._lane_file: LaneFile | None = None  # opened when first needed, kept open
        self._lane_dropped_before = 0  # by the lanes of earlier runs of the process
        # Drops of rows the process has in flight (`dropped(n)`: n more count as dropped).
        self.drops = DropSettler(dropped if dropped is not None else count_none)
        side.listen(self._committed)

    # -- running the process ------------------------------------------------------------

    async def run(self) -> None:
        """Start the process and start it again whenever it ends, until `stop()`."""
        config = self.config
        backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        try:
            while not self._stopping:
                started = time.monotonic()
                try:
                    code = await self._run_once()
                    why = f"the uplink process exited with {code}"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("bridge %s: uplink process failed", config.name)
                    why = f"uplink process: {type(exc).__name__}: {exc}"
                if self._stopping:
                    break
                status = self.status
                status.connected = False
                status.failed(why)
                self._base_failures = status.failures
                log.warning("bridge %s: %s (cursor %d); starting it again", config.name, why,
                            status.cursor)
                if time.monotonic() - started >= STABLE_S:
                    backoff.reset()
                await asyncio.sleep(backoff.next_delay())
        finally:
            self._ended.set()

    async def _run_once(self) -> int:
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD_CODE, str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_child_setup(self.config.process_nice))
        finally:
            theirs.close()
        self.pid = proc.pid
        self.starts += 1
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            self._writer = writer
            reader_state = self.side.reader(self.config.name)
            cursor = max(self.status.cursor, reader_state.offset if reader_state else 0)
            self.status.cursor = cursor
            self._base_forwarded = self.status.forwarded
            self._base_refused = self.status.refused
            self._base_unrouted = self.status.unrouted
            self._base_failures = self.status.failures
            lane_file = self.lane_file
            if lane_file is not None and not await lane_file.written():
                # Rows of the last run still queued for its writer thread (a stalled disk)
                # would reach the file after this run read where it ends, and be sent
                # after the log's rows published later: this run sends QoS 0 by the log.
                log.error("bridge %s: the QoS 0 lane's writer is behind; QoS 0 messages go "
                          "by the store's log for this run of the uplink process",
                          self.config.name)
                lane_file = None
            mark = self.lanes.core.log_end() if self.lanes is not None else 0
            writer.write(frame(("init", {
                "config": encode_config(self.config), "path": self.path,
                "gateway_id": self.gateway_id, "store_id": self.store_id, "cursor": cursor,
                "last_committed": self.side.last_committed,
                "log_level": logging.getLogger("edge_broker").getEffectiveLevel(),
                "lane_path": lane_file.path if lane_file is not None else "",
                "lane_cursor": lane_file.cursor if lane_file is not None else 0,
                "lane_last": lane_file.next_offset - 1 if lane_file is not None else 0,
                # Every QoS 0 message of the bridge's in the log is at or below this offset
                # (from now on they take the lane): the process sends those first.
                "lane_mark": mark})))
            self._told = True
            if self.lanes is not None and lane_file is not None:
                self.lane = Lane(self.config.name, self.config.downlink_identity, lane_file,
                                 mark, self._send)
                self.lanes.open(reader_name(self.config.name), self.lane)
            log.info("bridge %s: uplink process %d started (cursor %d)", self.config.name,
                     proc.pid, cursor)
            while True:
                message = await read_frame(reader)
                if message is None:
                    break
                self._handle(message)
            writer.close()
        except BaseException:
            if proc.returncode is None:  # cancelled, or this side failed: it goes too
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self.pid = None
            raise
        finally:
            self._close_lane()
            self._writer = None
            self._told = False
            self._waiting = None
            self.drops.ended()  # what it held is given up: the next run starts past it
            self.status.connected = False
            ours.close()
        try:
            try:
                return await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            return await proc.wait()  # killed: reaped after the `except` (docs/compiled.md)
        finally:
            self.pid = None  # reaped (or being): never signal a pid that may be reused

    async def stop(self) -> None:
        """Stop the process gracefully (it closes its remote connection and sends its last
        status), then store the last acknowledged cursor."""
        self._stopping = True
        self._close_lane()  # first: what follows goes to the log, the process stores the rest
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(frame(("stop",)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), STOP_TIMEOUT_S)
        pid = self.pid
        if not self._ended.is_set() and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.side.unlisten(self._committed)
        if self._lane_file is not None:
            self._lane_file.close()
            self._lane_file = None

    @property
    def lane_path(self) -> str:
        """The lane's own file, beside the store (store/log/lane_file.py)."""
        return f"{self.path}.lane-{quote(self.config.name, safe='')}"

    @property
    def lane_file(self) -> LaneFile | None:
        """The lane's file (the broker writes it; None: this bridge has no lane)."""
        if self._lane_file is None and self.lanes is not None:
            try:
                self._lane_file = LaneFile(self.lane_path, self.store_id,
                                           self.config.max_backlog_bytes)
            except StoreError as exc:  # tried again at the process's next start
                log.error("bridge %s: %s; its QoS 0 messages go by the store's log meanwhile",
                          self.config.name, exc)
        return self._lane_file

    @property
    def opened_lane_file(self) -> LaneFile | None:
        return self._lane_file

    def _close_lane(self) -> None:
        lane = self.lane
        if self.lanes is not None and lane is not None:
            self.lanes.close(reader_name(self.config.name))
            self._lane_dropped_before += lane.dropped
            self.lane = None

    @property
    def lane_dropped(self) -> int:
        """QoS 0 lane messages the broker dropped besides max_backlog_bytes: it could not
        write them to the lane file, or the lane had closed when they were drained."""
        lane = self.lane
        lost = self.lanes.lost.get(reader_name(self.config.name), 0) if self.lanes else 0
        return lost + (lane.dropped if lane is not None else 0) + self._lane_dropped_before

    # -- messages from the process --------------------------------------------------------

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ack":
            passed = Passed(int(message[2]), int(message[3]), message[4])
            if message[5] or self.drops.busy:
                self.drops.acked(passed, int(message[5]))
            self._acked(int(message[1]), passed)
        elif kind == "wait":
            after = int(message[1])
            if self.side.last_committed > after:
                self._send(("appended", self.side.last_committed))
            else:
                self._waiting = after
        elif kind == "lane_ack":  # (cursor, messages delivered since the last one)
            self._lane_acked(int(message[1]), int(message[2]) if len(message) > 2 else None)
        elif kind == "lane_held":  # (drop floor, [first, last] runs of it it may send)
            floor = int(message[1])
            runs = [(int(first), int(last)) for first, last in message[2]]
            if self.lane is not None:
                self.lane.held(floor, runs)
            elif self._lane_file is not None:
                self._lane_file.held(floor, runs)
        elif kind == "lane_wait":
            lane = self.lane
            if lane is not None:
                lane.wanted(int(message[1]))
        elif kind == "log_held":
            self.drops.answered(int(message[1]), int(message[2]))
        elif kind == "log_released":
            self.drops.released(int(message[1]))
        elif kind == "status":
            self._update(message[1])

    def skipped(self, after: int, through: int, count: int) -> None:
        """A drop skipped `count` rows, the bridge's in (after, through]: settled with the
        process (bridge_drops.py)."""
        unstored = [passed for _, passed in self._passed]
        unstored += [passed for _, passed in self._writing]
        writer = self._writer
        running = self._told and writer is not None and not writer.is_closing()
        if self.drops.skipped(after, through, count, unstored, running):
            self._send(("log_dropped", after, through))

    def _lane_acked(self, cursor: int, delivered: int | None = None) -> None:
        """The remote side acknowledged the lane up to `cursor`: stored, rows deleted
        (`delivered`: see LaneFile.commit_cursor)."""
        file = self._lane_file
        if file is None:
            return
        try:
            file.commit_cursor(cursor, delivered)
        except StoreError as exc:  # not stored: the next ack stores a later one
            log.error("bridge %s: cannot store the QoS 0 lane's cursor %d: %s",
                      self.config.name, cursor, exc)
        if self.lane is not None:  # drops made since the last word, told now
            self.lane.tell()

    def _send(self, message: tuple[Any, ...]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(frame(message))

    def _committed(self, offset: int) -> None:
        """After a group commit that appended (on the loop): wake a waiting process."""
        waiting = self._waiting
        if waiting is not None and offset > waiting:
            self._waiting = None
            self._send(("appended", offset))

    def _update(self, fields: dict[str, Any]) -> None:
        status = self.status
        status.connected = bool(fields["connected"])
        status.cursor = max(status.cursor, int(fields["cursor"]))
        status.forwarded = self._base_forwarded + int(fields["forwarded"])
        status.refused = self._base_refused + int(fields.get("refused", 0))
        status.unrouted = self._base_unrouted + int(fields.get("unrouted", 0))
        status.failures = self._base_failures + int(fields["failures"])
        at = fields["last_error_at"]
        if at is not None and (status.last_error_at is None or at >= status.last_error_at):
            status.last_error = fields["last_error"]
            status.last_error_at = float(at)
        oldest = fields["oldest_at"]
        self._log_oldest_at = float(oldest) if oldest is not None else None

    @property
    def oldest_at(self) -> float | None:
        """The publish time of the oldest message not forwarded, of the log and the lane."""
        log_at = self._log_oldest_at
        lane = self._lane_file
        lane_at = lane.oldest_at if lane is not None else None
        if log_at is None or (lane_at is not None and lane_at < log_at):
            return lane_at
        return log_at

    # -- storing the cursor ----------------------------------------------------------------

    def _acked(self, cursor: int, passed: Passed) -> None:
        """The remote side acknowledged up to `cursor`, passing `passed` (bridge_wire.py
        "ack")."""
        if passed.count:
            self._passed.append((cursor, passed))
            self._unstored_count += passed.count
            self._unstored_bytes += passed.size
        if cursor > self.status.cursor:
            self.status.cursor = cursor
        if cursor <= self._target:
            return
        self._target = cursor
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_loop(), name=f"bridge {self.config.name} cursor")

    @property
    def unstored(self) -> tuple[int, int]:
        """(rows, bytes) acknowledged whose cursor is not stored yet: the reader's backlog
        (counted from the stored cursor) is that much smaller in fact."""
        return self._unstored_count, self._unstored_bytes

    def store_acked(self) -> None:
        """Queue the write of the acknowledged cursor for the store's thread now, without
        waiting for COMMIT_INTERVAL_S: what the caller queues next (a `max_backlog_bytes`
        drop, a step of the store budget) then runs after it and sees the rows acknowledged
        so far as passed (forwarded), not as backlog to skip and count as dropped."""
        self._write()

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queued < self._target:
            wait = self._commit_at + COMMIT_INTERVAL_S - loop.time()
            if wait > 0 and not self._hurry:  # the acknowledgements meanwhile go in one
                nap = self._nap = loop.create_future()
                timer = loop.call_later(wait, _wake, nap)
                try:
                    await nap
                finally:
                    timer.cancel()
                    self._nap = None
            write = self._write()  # None: store_acked() queued it meanwhile
            if write is not None and not await write:
                return

    def _write(self) -> asyncio.Task[bool] | None:
        """Queue the write of the latest acknowledged cursor with the rows it passes (and
        those of the writes not yet known stored), unless it is queued already; the task's
        result says whether it was stored."""
        target = self._target
        if target <= self._queued:
            return None
        loop = asyncio.get_running_loop()
        self._commit_at = loop.time()
        pending = self._passed
        cut = len(pending)
        for i, (cursor, _) in enumerate(pending):  # one per acknowledgement
            if cursor > target:
                cut = i
                break
        self._writing += pending[:cut]
        del pending[:cut]
        self._queued = target
        # Queued now (before this returns), awaited by the task.
        stored = self.side.commit_now(self.config.name, target,
                                      [passed for _, passed in self._writing])
        task = loop.create_task(self._stored_or_not(stored, target),
                                name=f"bridge {self.config.name} cursor write")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def _stored_or_not(self, stored: Awaitable[None], target: int) -> bool:
        try:
            await stored
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not stored: its rows stay in _writing for the next write, and the latest
            # acknowledged cursor stays the target (the next acknowledgement, a drop's
            # `store_acked` or `flush` writes it again). The process goes on; after a crash
            # it resends from the stored cursor (duplicates only).
            self._commit_error = exc
            self._queued = min(self._queued, self._stored)
            log.error("bridge %s: cannot store the cursor %d: %s", self.config.name, target,
                      exc)
            return False
        self._stored = max(self._stored, target)
        writing = self._writing
        done = 0
        while done < len(writing) and writing[done][0] <= target:
            _, passed = writing[done]
            self._unstored_count -= passed.count
            self._unstored_bytes -= passed.size
            done += 1
        del writing[:done]
        return True

    async def flush(self) -> None:
        """Wait until the latest acknowledged cursor is stored (at once: not after
        COMMIT_INTERVAL_S), and the lane file's writes (its writer thread awaited, not
        joined on the loop; `close` then closes it)."""
        self._hurry = True
        _wake(self._nap)
        committer = self._committer
        if committer is not None and not committer.done():
            await asyncio.shield(committer)
        self._write()  # after a failed write, the latest acknowledged cursor once more
        for write in list(self._writes):  # (and one queued by store_acked())
            await asyncio.shield(write)
        if self._lane_file is not None:
            await self._lane_file.aclose()


def _wake(nap: asyncio.Future[None] | None) -> None:
    if nap is not None and not nap.done():
        nap.set_result(None)
