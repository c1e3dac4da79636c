"""A message the remote side can never take (bridge/base.py `Refused`) is skipped by the
forwarder: the cursor moves past exactly it, it counts in `refused` (not `forwarded`, not a
failure, no backoff delay), a warning says which, and log order holds for everything else,
with windows in flight (a pipelined sink) or not.

The sinks here are fakes that refuse chosen offsets as the real ones do: the window is cut
before such a message (`written`), `Refused` when it is the first, or `Refused` from the
acknowledgement of a window's first message (JetStream's API error 10054).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from edge_broker.bridge.base import Backoff, BridgeMessage, Refused, WarnEvery
from edge_broker.bridge.forward import Forwarder
from tests.bridge.memlog import MemoryLog


class RefusingSink:
    """A pipelined sink that refuses the offsets in `refused` before sending (cut / raise)
    and those in `refused_in_ack` in their acknowledgement (JetStream with one PubAck per
    message: the others of the window are stored, the count ends before the refused one;
    `Refused` when it is the window's first). What the remote stored, in order, is
    `stored`; every window's acknowledgement comes one loop turn after it was written."""

    def __init__(self, refused: set[int], refused_in_ack: set[int] = frozenset(),  # type: ignore[assignment]
                 pipelined: bool = True) -> None:
        self.refused = refused
        self.refused_in_ack = refused_in_ack
        self.stored: list[int] = []
        self.written = 0
        self.windows: list[list[int]] = []
        if not pipelined:
            self.submit = None  # type: ignore[assignment]

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        return await (await RefusingSink.submit(self, batch))

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        self.written = len(batch)
        for index, message in enumerate(batch):
            if message.offset in self.refused:
                if not index:
                    raise Refused(f"offset {message.offset} is too large", "too_large")
                self.written = index
                break
        window = list(batch[:self.written])
        self.windows.append([m.offset for m in window])
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        acknowledged = -1
        for index, message in enumerate(window):
            if message.offset in self.refused_in_ack:
                if acknowledged < 0:
                    acknowledged = index
            elif message.offset not in self.stored:  # a resend: the remote drops it
                self.stored.append(message.offset)
        if acknowledged < 0:
            acknowledged = len(window)
        outcome: int | Refused = acknowledged or Refused(
            "message size exceeds maximum allowed", "max_msg_size")
        asyncio.get_running_loop().call_soon(_settle, future, outcome)
        return future

    async def close(self) -> None:
        pass


def _settle(future: asyncio.Future[int], outcome: int | Refused) -> None:
    if future.done():  # dropped by the forwarder meanwhile
        return
    if isinstance(outcome, Refused):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def filled(count: int) -> MemoryLog:
    log = MemoryLog()
    for i in range(count):
        log.append("sensors/a", b"%d" % i)
    return log


async def drain(forwarder: Forwarder, log: MemoryLog, last: int, steps: int = 200) -> None:
    for _ in range(steps):
        if log.committed >= last:
            return
        await forwarder.step()
    raise AssertionError(f"cursor at {log.committed} after {steps} steps, not {last}")


@pytest.mark.parametrize("pipelined", [True, False])
async def test_refused_messages_are_skipped_counted_and_logged_in_log_order(
        pipelined: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_broker.bridge.forward")
    log = filled(30)
    refused = {1, 6, 9, 13, 14, 30}  # first of all, inside windows, two in a row, the last
    in_ack = {20}
    sink = RefusingSink(refused, in_ack, pipelined=pipelined)
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    forwarder = Forwarder(lambda: sink, log, cursor=0, window=4, depth=3, sleep=sleep,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.5))
    await drain(forwarder, log, 30)
    expected = [o for o in range(1, 31) if o not in refused | in_ack]
    assert sink.stored == expected  # every other message, once, in log order
    status = forwarder.status
    assert (status.cursor, status.refused, status.forwarded) == (30, 7, 23)
    assert (status.failures, status.last_error, delays) == (0, None, [])
    # No window is written after one cut before a refused message until it is acknowledged:
    # nothing after a refused message goes out before the messages ahead of it.
    written = [o for window in sink.windows for o in window]
    first_seen = sorted(set(written), key=written.index)
    assert first_seen == sorted(first_seen)
    lines = [r.getMessage() for r in caplog.records if "cannot take" in r.getMessage()]
    # One line per kind per 10 s: the first of each kind.
    assert len(lines) == 2
    assert "log offset 1, topic 'sensors/a': offset 1 is too large" in lines[0]
    assert "log offset 20" in lines[1] and "exceeds maximum" in lines[1]


class HeldSink(RefusingSink):
    """A RefusingSink whose acknowledgements the test gives (`acks`, window by window)."""

    def __init__(self, refused: set[int]) -> None:
        super().__init__(refused)
        self.acks: list[asyncio.Future[int]] = []

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        (await super().submit(batch)).cancel()  # raises Refused for a first message
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.acks.append(future)
        return future


async def test_a_refused_message_behind_windows_in_flight_waits_for_them() -> None:
    """The refused message starts a page while windows before it are in flight: it is
    skipped only once they are acknowledged (the cursor never passes a message not
    acknowledged), and the page is not read again meanwhile."""
    log = filled(12)
    sink = HeldSink({9})
    forwarder = Forwarder(lambda: sink, log, cursor=0, window=4, depth=3)
    task = asyncio.ensure_future(forwarder.step())
    for _ in range(50):
        if len(sink.acks) >= 2:
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sink.windows == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9, first of the next: held back
    assert log.committed == 0 and forwarder.status.refused == 0
    sink.acks[1].set_result(4)  # a later window's acknowledgement moves nothing
    await asyncio.sleep(0)
    assert not task.done() and log.committed == 0
    sink.acks[0].set_result(4)
    await task
    assert log.committed == 4 and forwarder.status.refused == 0
    await forwarder.step()  # 9 still behind 5-8: 5-8 taken (acknowledged already)
    assert log.committed == 8 and forwarder.status.refused == 0
    await forwarder.step()  # 9 first after the cursor now: skipped at once
    assert log.committed == 9 and forwarder.status.refused == 1
    task = asyncio.ensure_future(forwarder.step())
    for _ in range(50):
        if len(sink.acks) >= 3:
            break
        await asyncio.sleep(0)
    assert sink.windows[-1] == [10, 11, 12]
    sink.acks[2].set_result(3)
    await task
    assert log.committed == 12
    assert (forwarder.status.forwarded, forwarder.status.failures) == (11, 0)


def test_warnings_of_a_kind_are_rate_limited_and_the_held_back_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    warnings = WarnEvery(logging.getLogger("test.refused"), 10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.refused")
    assert warnings.warn("a", "first %d", 1)
    assert not warnings.warn("a", "second %d", 2)
    assert warnings.warn("b", "other kind")
    now[0] += 3
    assert not warnings.warn("a", "third %d", 3)
    now[0] += 8
    assert warnings.warn("a", "fourth %d", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "first 1", "other kind",
        "fourth 4 (and 2 more like it in the 11 s before, not logged)"]
