"""The uplink loop of a bridge: a cursor over the log, moved only by remote acknowledgements.

`Forwarder.run()` repeats: read up to `window` log entries after the cursor, hand them to the
sink, move the cursor past the number the sink says were acknowledged, and commit it. When
the log has nothing after the cursor it waits for the next append (`LogReader.wait_after`),
so nothing is polled. When the sink fails (cannot connect, connection lost, no ack within
its timeout) the sink is closed, the failure recorded in `status`, and after a backoff delay
(exponential with full jitter, `Backoff`) a new sink is started and the same entries are
sent again: the backlog drains as soon as the uplink is back, without waiting for a new
message.

*Pipelining.* A sink that has `submit` (JetStream, Kafka: `PipelinedSink`) gets up to
`depth` windows in flight: while the oldest waits for its acknowledgements the next pages
are read and written already, so the broker, the store's thread and the remote server work
at the same time (a drain after an outage is no longer one round trip per window). The next
page is read only after a full one (a backlog); a short page means the bridge caught up.
Acknowledgements are still taken in log order: the cursor moves past a window only after
every window before it was acknowledged in full. A window acknowledged in part drops the
windows after it (their messages are sent again from the cursor, with the same ids: the
remote drops those it stored already); a failure drops them all and starts a new sink. A
`Resend` from a sink (the connection is usable but the window must go again: the server
answered "no responders" during a leader election, or the client reconnected and what was
in flight is lost) keeps the sink and sends again from the cursor after a shorter backoff
delay (`resend_backoff`: full jitter, at most the backoff's initial delay). After a
`Resend` or a failure the pipeline holds one window until one is acknowledged in full: the
windows in flight together during a stream's leader election could otherwise be refused
and, the new leader up, the later ones stored before the earlier ones go again (out of log
order; seen with an R3 stream whose leader was killed).

*A message the remote side can never take* (bridge/base.py `Refused`: larger than the
server allows, a NATS control line too long for it, JetStream's "message size exceeds
maximum allowed"): the sink sends the messages before it and cuts the window there (a
pipelined sink says how many it wrote, `written`: no window goes after a cut one until it is
acknowledged, so nothing after that message is stored before the messages ahead of it).
When it is the first of a window the sink raises `Refused`; once every window before it is
acknowledged the cursor moves past exactly that message, as after an acknowledgement, and
it is counted in `status.refused` and logged (at most one line per kind every 10 s), not
in `forwarded`, not as a failure, with no backoff delay. Messages the sink passes without
sending them inside a window it acknowledged (`take_passed`: MQTT messages whose expiry
passed or larger than the remote's Maximum Packet Size, messages no topic line or
`topic_map` entry sends) count in `expired`, `refused` and `unrouted`, not in `forwarded`.

*A sink that wants another connection* although this one works (`Reconnect`, from `send`
before it wrote anything or from `wait_lost` while idle: an MQTT bridge on a backup address
whose first address answers again) is closed normally and the next started at once, with
no backoff delay and nothing recorded as a failure.

The log side is the `LogReader` protocol; the log of issue 8 implements it (a bridge is one
more cursor over it). Its `read_after` returns entries in offset order; entries the store
dropped for the bridge's `max_backlog_bytes` are simply absent (the store counts them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from .base import (
    Backoff,
    BridgeMessage,
    Reconnect,
    Refused,
    Resend,
    Sink,
    WarnEvery,
    shown_topic,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _outcome(awaitable: Awaitable[T]) -> T | Exception:
    """What `awaitable` gives, or the exception it raised. The callers handle a failure
    after the `except`, not in it: compiled, an `await` in an `except` handler leaves that
    exception behind as the thread's "handled" one (docs/compiled.md)."""
    try:
        return await awaitable
    except Exception as exc:
        return exc


def _take_passed(sink: Sink | None, batch: Sequence[BridgeMessage],
                 acknowledged: int) -> tuple[int, int, int]:
    """(expired, refused, unrouted): of the first `acknowledged` messages of `batch`, those
    the sink passed without sending them (`take_passed`: MqttUpstream, KafkaSink; (0, 0, 0)
    for others)."""
    take = getattr(sink, "take_passed", None)
    if take is None:
        return 0, 0, 0
    expired, refused, unrouted = take(batch, acknowledged)
    return int(expired), int(refused), int(unrouted)


def _written(sink: Sink, batch: Sequence[BridgeMessage]) -> Sequence[BridgeMessage]:
    """What `submit` wrote of `batch`: all of it, or its start when the sink cut it before
    a message it refuses (its `written`)."""
    written = getattr(sink, "written", None)
    if written is None or written >= len(batch):
        return batch
    return batch[:max(1, int(written))]


def _retrieve(future: asyncio.Future[int]) -> None:
    """Mark a dropped window's outcome retrieved, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


class PipelinedSink(Sink, Protocol):
    """A sink that can have several windows in flight (see the module docstring)."""

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        """Write the batch now, in order after those submitted before; return a future of
        how many from its start the remote side acknowledged (as `send` returns). Raises
        when the batch cannot be written; the future raises when none was acknowledged
        (`Resend`: the connection is still usable, send them again)."""
        ...


class LogReader(Protocol):
    """What a bridge needs from the log."""

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        """Up to `limit` entries with offset > cursor that this bridge takes, in order."""
        ...

    async def wait_after(self, cursor: int) -> None:
        """Return once an entry with offset > cursor may exist (soon after an append)."""
        ...

    async def commit_cursor(self, cursor: int) -> None:
        """Store the bridge's cursor durably: everything up to it is acknowledged remotely."""
        ...


@dataclass(slots=True)
class ForwarderStatus:
    """What `edge-broker bridges status` and $SYS show for the uplink."""

    connected: bool = False
    cursor: int = 0
    forwarded: int = 0
    failures: int = 0
    expired: int = 0
    """Messages the cursor passed without sending them, their Message Expiry Interval over
    (reported by the MQTT upstream's `take_passed`); not in `forwarded`."""
    refused: int = 0
    """Messages the cursor passed because the remote side can never take them (`Refused`,
    an MQTT remote's Maximum Packet Size); not in `forwarded`, not failures."""
    unrouted: int = 0
    """Messages the cursor passed because no topic line (mqtt) or `topic_map` entry
    (kafka) sends them; not in `forwarded`."""
    last_error: str | None = None
    last_error_at: float | None = None

    def failed(self, error: str) -> None:
        """Count one failure; `error` says what failed (shown until the next one)."""
        self.failures += 1
        self.last_error = error
        self.last_error_at = time.time()


class Forwarder:
    """Moves a bridge's cursor over the log by sending windows to a sink. See module doc."""

    def __init__(self, make_sink: Callable[[], Sink], reader: LogReader, *, cursor: int,
                 window: int = 256, backoff: Backoff | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 name: str = "bridge", depth: int = 8) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        """Windows in flight at once for a sink that has `submit` (see module doc)."""
        self.make_sink = make_sink
        self.reader = reader
        self.window = window
        self.backoff = backoff or Backoff()
        # A `Resend` waits less: the connection is fine, and a stream's leader election
        # (what "no responders" means on a cluster) takes seconds; full jitter, from a
        # quarter of the backoff's initial delay up to that initial delay.
        self.resend_backoff = Backoff(self.backoff.initial / 4, self.backoff.initial)
        self.sleep = sleep
        self.name = name
        self.status = ForwarderStatus(cursor=cursor)
        self.on_connected: Callable[[bool], None] | None = None
        """Told at once when `status.connected` changes (the bridge's local state topic)."""
        self._sink: Sink | None = None
        # (the offset it reads after, the read): the next page, read while a window is out
        self._prefetch: tuple[int, asyncio.Future[Sequence[BridgeMessage]]] | None = None
        # Windows written to a pipelined sink, oldest first, with their acknowledgements.
        self._inflight: deque[tuple[Sequence[BridgeMessage], asyncio.Future[int]]] = deque()
        # (the offset it was read after, the page): read while a pipelined sink's oldest
        # window waited for its acknowledgements, not yet written (`_step_pipelined`).
        self._ahead: tuple[int, Sequence[BridgeMessage]] | None = None
        # After a `Resend` or a failure a pipelined sink gets one window at a time until one
        # is acknowledged in full (`_step_pipelined`): while a JetStream stream elects its
        # leader, windows in flight together could be refused and then, the leader elected,
        # the later ones stored before the earlier ones are sent again (out of log order).
        self._probing = False
        self._warnings = WarnEvery(log)  # `Refused` messages: one line per kind per 10 s

    async def run(self) -> None:
        """Forward until cancelled. Never raises for remote failures."""
        # Cleaned up after the `except`, not in it nor in a `finally`: compiled, either
        # ends up raising a stale exception (docs/compiled.md).
        try:
            while True:
                await self.step()
        except BaseException as exc:
            stopped = exc
        self._drop_prefetch()
        self._drop_inflight()
        closing = await _outcome(self._close_sink())
        if isinstance(closing, Exception):
            closing.__context__ = stopped  # as a `finally` would have chained it
            raise closing
        raise stopped

    async def step(self) -> None:
        """One round: connect if needed, send one window (or wait for the log).

        While a full window waits for its acknowledgements the next page is read already
        (`_prefetch`), so the store's thread and the remote side work at the same time; it
        is used only if the whole window was acknowledged (it starts right after it),
        otherwise dropped and the log read again from the cursor."""
        status = self.status
        if self._sink is None:
            self._drop_prefetch()
            self._drop_inflight()
            sink = self.make_sink()
            started = await _outcome(sink.start())
            if isinstance(started, Exception):
                await self._failed(sink, started)
                return
            self._sink = sink
            self._connected(True)
        if callable(getattr(self._sink, "submit", None)):
            await self._step_pipelined(cast(PipelinedSink, self._sink))
            return
        batch = await self._take_prefetch(status.cursor)
        if not batch:
            batch = await self.reader.read_after(status.cursor, self.window)
        if not batch:
            await self._idle(self._sink)
            return
        if len(batch) >= self.window:  # a backlog: there is probably more after it
            self._prefetch = (batch[-1].offset, asyncio.ensure_future(
                self.reader.read_after(batch[-1].offset, self.window)))
        acknowledged = await _outcome(self._sink.send(batch))
        if isinstance(acknowledged, Reconnect):
            self._drop_prefetch()
            await self._reconnect(self._sink, acknowledged)
            return
        if isinstance(acknowledged, Refused):
            self._drop_prefetch()
            await self._skip(batch[0], acknowledged)
            return
        if isinstance(acknowledged, Exception):
            self._drop_prefetch()
            await self._failed(self._sink, acknowledged)
            return
        if acknowledged <= 0:
            self._drop_prefetch()
            await self._failed(self._sink, RuntimeError("nothing acknowledged"))
            return
        if acknowledged < len(batch):
            self._drop_prefetch()
        status.cursor = batch[acknowledged - 1].offset
        await self.reader.commit_cursor(status.cursor)
        self._count(self._sink, batch, acknowledged)
        self.backoff.reset()

    async def _step_pipelined(self, sink: PipelinedSink) -> None:
        """One round with a pipelined sink: fill the pipeline up to `depth` windows (after
        a full page only), read the page after the newest while the oldest is not yet
        acknowledged (`_ahead`: the next round writes it without a read first), then take
        the oldest window's acknowledgements."""
        status = self.status
        inflight = self._inflight
        depth = 1 if self._probing else self.depth
        while len(inflight) < depth:
            if inflight:
                last = inflight[-1][0]
                if len(last) < self.window:
                    break  # caught up: the next page is read after these are acknowledged
                after = last[-1].offset
            else:
                after = status.cursor
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == after:
                batch = ahead[1]
            else:
                batch = await self.reader.read_after(after, self.window)
            if not batch:
                break
            acks = await _outcome(sink.submit(batch))
            if isinstance(acks, Refused):  # its first message: nothing of it was written
                if inflight:  # skipped once the windows before it are acknowledged
                    self._ahead = (after, batch)
                    break
                await self._skip(batch[0], acks)
                return
            if isinstance(acks, Exception):
                self._drop_inflight()
                await self._failed(sink, acks)
                return
            written = _written(sink, batch)
            inflight.append((written, acks))
            if len(written) < len(batch):
                break  # cut before a refused message: nothing goes after it meanwhile
        if not inflight:
            await self._idle(sink)
            return
        batch, acks = inflight[0]
        last = inflight[-1][0]
        if (not acks.done() and len(inflight) >= self.depth
                and len(last) >= self.window and self._ahead is None):
            # The pipeline is full and its oldest window not yet acknowledged: the page
            # after the last window is read now, while the remote side works, so that the
            # window taking the acknowledged one's place is written at once when its
            # acknowledgements come (not after a page read). The window stays in
            # `_inflight` meanwhile: cancelled during the read, `run` drops it (its
            # acknowledgements are cancelled or retrieved, not left to asyncio's log).
            after = last[-1].offset
            page = await self.reader.read_after(after, self.window)
            if page:
                self._ahead = (after, page)
        inflight.popleft()
        acknowledged = await _outcome(acks)
        if isinstance(acknowledged, Refused):  # its first message, refused in its ack
            self._drop_inflight()  # sent again after it, from the cursor (same ids)
            await self._skip(batch[0], acknowledged)
            return
        if isinstance(acknowledged, Resend):
            self._drop_inflight()
            await self._resend(acknowledged)
            return
        if isinstance(acknowledged, Exception):
            self._drop_inflight()
            await self._failed(sink, acknowledged)
            return
        if acknowledged <= 0:
            self._drop_inflight()
            await self._failed(sink, RuntimeError("nothing acknowledged"))
            return
        if acknowledged < len(batch):
            self._drop_inflight()  # sent again from the cursor (the remote drops repeats)
        else:
            self._probing = False
        status.cursor = batch[acknowledged - 1].offset
        await self.reader.commit_cursor(status.cursor)
        self._count(sink, batch, acknowledged)
        self.backoff.reset()
        self.resend_backoff.reset()

    def _count(self, sink: Sink | None, batch: Sequence[BridgeMessage],
               acknowledged: int) -> None:
        """The first `acknowledged` messages of `batch` are done: forwarded, but for those
        the sink passed without sending them (`_take_passed`)."""
        status = self.status
        expired, refused, unrouted = _take_passed(sink, batch, acknowledged)
        status.forwarded += acknowledged - expired - refused - unrouted
        status.expired += expired
        status.refused += refused
        status.unrouted += unrouted

    async def _skip(self, message: BridgeMessage, refused: Refused) -> None:
        """`message`, the first after the cursor, is one the remote side can never take:
        the cursor moves past it as after an acknowledgement, and it is counted and logged
        (see the module docstring). No failure, no delay."""
        status = self.status
        status.cursor = message.offset
        await self.reader.commit_cursor(message.offset)
        status.refused += 1
        self._warnings.warn(
            refused.kind, "bridge %s: the remote side cannot take the message at log offset "
            "%d, topic %s: %s; skipped (counted in refused)", self.name, message.offset,
            shown_topic(message.topic), refused)

    def _drop_inflight(self) -> None:
        self._ahead = None  # it started after a window that is sent again
        inflight = self._inflight
        while inflight:
            _, acks = inflight.pop()
            if acks.cancel():  # (a task may still end with an exception: retrieved then)
                acks.add_done_callback(_retrieve)
            else:  # done already: its exception (if any) retrieved now
                _retrieve(acks)

    async def _resend(self, exc: BaseException) -> None:
        """The sink is usable but what was in flight must go again (see `Resend`)."""
        status = self.status
        self._probing = True
        self._rewind()
        status.failed(f"{type(exc).__name__}: {exc}")
        log.warning("bridge %s: %s (cursor %d); sending again", self.name, status.last_error,
                    status.cursor)
        await self.sleep(self.resend_backoff.next_delay())

    async def _idle(self, sink: Sink) -> None:
        """Wait for the log. A sink whose connection also carries the downlink (the MQTT
        upstream) tells when that connection is lost (`wait_lost`): that ends the wait and
        the sink is replaced, else an idle uplink would leave the downlink dead."""
        wait_lost = getattr(sink, "wait_lost", None)
        if wait_lost is None:
            await self.reader.wait_after(self.status.cursor)
            return
        appended = asyncio.ensure_future(self.reader.wait_after(self.status.cursor))
        lost = asyncio.ensure_future(wait_lost())
        try:
            await asyncio.wait((appended, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            appended.cancel()
            lost.cancel()
        if not lost.done() or lost.cancelled():
            return
        error = lost.exception()
        if isinstance(error, Reconnect):
            await self._reconnect(sink, error)
        elif error is None:
            await self._failed(sink, ConnectionError(f"connection lost: {lost.result()}"))

    async def _take_prefetch(self, cursor: int) -> Sequence[BridgeMessage]:
        """The page read ahead, if it starts right after `cursor` (else [])."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is None:
            return []
        after, task = prefetch
        if after != cursor:
            self._cancel(task)
            return []
        return await task  # a local failure (the store) propagates, as for any read

    def _drop_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            self._cancel(prefetch[1])

    @staticmethod
    def _cancel(task: asyncio.Future[Sequence[BridgeMessage]]) -> None:
        task.cancel()
        # Retrieved, so asyncio does not log it; a page read is only a read.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _rewind(self) -> None:
        """What was read after the cursor is given up, read again from the cursor after the
        delay: a reader that keeps account of what it handed out (`rewind`: the QoS 0
        lane's, server/bridge_lane_child.py) is told now, not at that read, which an outage
        puts off for as long as it lasts."""
        rewind = getattr(self.reader, "rewind", None)
        if rewind is not None:
            rewind(self.status.cursor)

    async def _failed(self, sink: Sink, exc: BaseException) -> None:
        status = self.status
        self._probing = True
        self._rewind()
        self._connected(False)
        status.failed(f"{type(exc).__name__}: {exc}")
        log.warning("bridge %s: %s (cursor %d); retrying", self.name, status.last_error,
                    status.cursor)
        self._sink = None
        try:
            await sink.close()
        except Exception:  # closing a broken sink may fail too; it is dropped either way
            log.debug("bridge %s: error closing the sink", self.name, exc_info=True)
        await self.sleep(self.backoff.next_delay())

    async def _reconnect(self, sink: Sink, reason: Reconnect) -> None:
        """The sink asked for a new connection (`Reconnect`): closed normally, the next one
        started by the next step, at once. Not a failure: no backoff, no `last_error`."""
        log.info("bridge %s: %s; reconnecting", self.name, reason)
        self._rewind()
        self._connected(False)
        self._sink = None
        try:
            await sink.close()
        except Exception:
            log.debug("bridge %s: error closing the sink", self.name, exc_info=True)

    async def _close_sink(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            self._connected(False)
            await sink.close()

    def _connected(self, connected: bool) -> None:
        if self.status.connected != connected:
            self.status.connected = connected
            if self.on_connected is not None:
                self.on_connected(connected)
