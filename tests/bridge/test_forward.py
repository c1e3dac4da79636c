"""The uplink loop: cursor moves only by acknowledgements; outages drain when the link is back."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from edge_broker.bridge.base import Backoff, BridgeMessage, Resend
from edge_broker.bridge.forward import Forwarder
from tests.bridge.memlog import MemoryLog


class ScriptedSink:
    """A sink whose answers are scripted: connect failures, then partial acks."""

    def __init__(self, script: list[object], received: list[int]) -> None:
        self.script = script
        self.received = received

    async def start(self) -> None:
        if self.script and self.script[0] == "refuse":
            self.script.pop(0)
            raise ConnectionRefusedError("refused")

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        answer = self.script.pop(0) if self.script else len(batch)
        if answer == "lost":
            raise ConnectionResetError("lost")
        assert isinstance(answer, int)
        count = min(answer, len(batch))
        self.received.extend(m.offset for m in batch[:count])
        return count

    async def close(self) -> None:
        pass


async def test_cursor_moves_by_acks_and_failures_back_off_with_jitter() -> None:
    log = MemoryLog()
    for i in range(10):
        log.append("s/t", b"%d" % i)
    script: list[object] = ["refuse", "refuse", 3, "lost", 0, 4]
    received: list[int] = []
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    forwarder = Forwarder(lambda: ScriptedSink(script, received), log, cursor=0, window=4,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.5), sleep=record)
    for _ in range(8):
        await forwarder.step()
        if log.committed == 10:
            break
    # refuse, refuse (1/2, 2/2 of the ceiling), 3 acked (reset), lost, 0 acked, then the rest.
    assert delays == [0.5, 1.0, 0.5, 1.0]
    assert received == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert log.committed == 10 and forwarder.status.forwarded == 10
    assert forwarder.status.failures == 4
    assert forwarder.status.last_error == "RuntimeError: nothing acknowledged"


class ReadLog(MemoryLog):
    """A MemoryLog that records after which offset each page was read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        self.reads.append(cursor)
        return await super().read_after(cursor, limit)


async def test_next_page_is_read_ahead_and_dropped_when_a_window_is_acked_in_part() -> None:
    log = ReadLog()
    for i in range(12):
        log.append("s/t", b"%d" % i)
    received: list[int] = []
    reads_when_acked: list[list[int]] = []

    class SlowSink(ScriptedSink):
        async def send(self, batch: Sequence[BridgeMessage]) -> int:
            await asyncio.sleep(0)  # the acks take a while: the loop runs meanwhile
            reads_when_acked.append(list(log.reads))
            return await super().send(batch)

    forwarder = Forwarder(lambda: SlowSink([4, 2], received), log, cursor=0, window=4,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.0))
    for _ in range(10):
        await forwarder.step()
        if log.committed == 12:
            break
    # While window 1-4 waited for its acks, 5-8 was read (and then sent without another
    # read); 5-8 was acked only up to 6: what was read ahead after 8 meanwhile is dropped
    # and the log read again from the cursor, 6.
    assert reads_when_acked[:2] == [[0, 4], [0, 4, 8]]
    assert log.reads[:4] == [0, 4, 8, 6]
    assert received == list(range(1, 13))  # in order, nothing skipped, nothing twice
    assert log.committed == 12 and forwarder.status.forwarded == 12


async def test_idle_forwarder_waits_for_the_log_without_polling() -> None:
    log = MemoryLog()
    received: list[int] = []
    forwarder = Forwarder(lambda: ScriptedSink([], received), log, cursor=0)
    task = asyncio.ensure_future(forwarder.run())
    try:
        await asyncio.sleep(0)  # let it connect and wait on the empty log
        log.append("s/t", b"x")
        while log.committed < 1:
            await asyncio.sleep(0)
        assert received == [1] and forwarder.status.connected
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("outage", ["stopped", "blackholed"])
async def test_jetstream_outage_drains_when_the_uplink_returns(tmp_path: Path,
                                                               outage: str) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    from edge_broker.bridge.jetstream import JetStreamSink
    from tests.bridge.proxy import TcpProxy
    from tests.bridge.servers import NatsServer
    from tests.bridge.test_jetstream import bridge_config, offsets, stored

    server = NatsServer(tmp_path / "nats")
    server.start()
    proxy = await TcpProxy("127.0.0.1", server.port).start()
    config = bridge_config(f"nats://{proxy.address}")
    log = MemoryLog()
    forwarder = Forwarder(
        lambda: JetStreamSink(config, gateway_id="gw7", store_id="5eed", ack_timeout=1.0),
        log, cursor=0, window=256, backoff=Backoff(0.05, 0.5), name="central")
    task = asyncio.ensure_future(forwarder.run())

    async def until(predicate: object, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():  # type: ignore[operator]
            assert loop.time() < deadline, forwarder.status
            await asyncio.sleep(0.02)

    try:
        for i in range(1000):
            log.append(f"sensors/t{i % 4}", b"%d" % i)
        await until(lambda: log.committed == 1000)
        if outage == "stopped":
            server.stop()
        else:
            proxy.blackhole()
        for i in range(1000, 3000):  # devices keep publishing during the outage
            log.append(f"sensors/t{i % 4}", b"%d" % i)
        await until(lambda: forwarder.status.failures > 0)
        assert log.committed < 3000
        if outage == "stopped":
            server.start()
        else:
            proxy.cut()
            proxy.forward()
        # No new message is appended: the backlog drains because the link is back.
        await until(lambda: log.committed == 3000)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await proxy.close()
    try:
        msgs = await stored(server.url)
    finally:
        server.stop()
    assert offsets(msgs) == list(range(1, 3001))  # all, in log order, no stored duplicate


async def test_uplink_down_since_boot_drains_once_the_server_appears(tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    from edge_broker.bridge.jetstream import JetStreamSink
    from tests.bridge.servers import NatsServer
    from tests.bridge.test_jetstream import bridge_config, offsets, stored

    server = NatsServer(tmp_path / "nats")  # its port is chosen, nothing listens yet
    config = bridge_config(server.url)
    log = MemoryLog()
    for i in range(500):
        log.append(f"sensors/t{i % 4}", b"%d" % i)
    forwarder = Forwarder(
        lambda: JetStreamSink(config, gateway_id="gw7", store_id="5eed", ack_timeout=1.0),
        log, cursor=0, backoff=Backoff(0.05, 0.5), name="central")
    task = asyncio.ensure_future(forwarder.run())
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 30
        while forwarder.status.failures < 1:  # it failed, and keeps trying with backoff
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        assert log.committed == 0 and not forwarder.status.connected
        assert "cannot connect" in (forwarder.status.last_error or "")
        server.start()
        while log.committed < 500:
            assert loop.time() < deadline + 30, forwarder.status
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    try:
        assert offsets(await stored(server.url)) == list(range(1, 501))
    finally:
        server.stop()


class PipelinedSink:
    """A sink with `submit`: every window written is recorded with its future, which the
    test resolves (the remote side's acknowledgements)."""

    def __init__(self) -> None:
        self.windows: list[tuple[list[int], asyncio.Future[int]]] = []

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        return await (await self.submit(batch))

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.windows.append(([m.offset for m in batch], future))
        return future

    async def close(self) -> None:
        pass


async def test_a_backlog_has_several_windows_in_flight_and_acks_move_the_cursor_in_order(
        ) -> None:
    log = MemoryLog()
    for i in range(20):
        log.append("s/t", b"%d" % i)
    sink = PipelinedSink()
    forwarder = Forwarder(lambda: sink, log, cursor=0, window=4, depth=3,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.0))
    task = asyncio.ensure_future(forwarder.step())
    while len(sink.windows) < 3:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    # Three windows written before any acknowledgement (not one round trip per window).
    assert [w for w, _ in sink.windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    sink.windows[1][1].set_result(4)  # a later window's acks do not move the cursor
    await asyncio.sleep(0)
    assert not task.done() and log.committed == 0
    sink.windows[0][1].set_result(4)
    await task
    assert forwarder.status.cursor == 4 and log.committed == 4
    await forwarder.step()  # the pipeline refilled (13-16), then 5-8: acknowledged already
    assert forwarder.status.cursor == 8
    assert [w[0] for w, _ in sink.windows[3:]] == [13]
    # 9-12 acknowledged up to 10: what was in flight after it is dropped and sent again
    # from the cursor, in order.
    sink.windows[2][1].set_result(2)
    await forwarder.step()  # (17-20 written first)
    assert forwarder.status.cursor == 10
    assert [w[0] for w, _ in sink.windows[3:5]] == [13, 17]
    assert all(f.cancelled() for _, f in sink.windows[3:5])
    task = asyncio.ensure_future(forwarder.step())
    while len(sink.windows) < 6:
        await asyncio.sleep(0)
    assert sink.windows[5][0] == [11, 12, 13, 14]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _turns(done: Callable[[], bool], turns: int = 50) -> None:
    """Give the loop turns until `done()` (or `turns` have passed: the asserts say why)."""
    for _ in range(turns):
        if done():
            return
        await asyncio.sleep(0)


async def test_a_full_pipeline_reads_its_next_page_while_the_oldest_window_waits() -> None:
    log = ReadLog()
    for i in range(16):
        log.append("s/t", b"%d" % i)
    sink = PipelinedSink()
    forwarder = Forwarder(lambda: sink, log, cursor=0, window=4, depth=2,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.0))
    task = asyncio.ensure_future(forwarder.step())
    await _turns(lambda: len(sink.windows) >= 2 and len(log.reads) >= 3)
    # Both windows out and none acknowledged: the page after 8 is read already, so the
    # window after them is written as soon as 1-4 is acknowledged, without a read first.
    assert log.reads == [0, 4, 8] and not task.done()
    sink.windows[0][1].set_result(4)
    await task
    assert forwarder.status.cursor == 4
    task = asyncio.ensure_future(forwarder.step())
    await _turns(lambda: len(sink.windows) >= 3 and len(log.reads) >= 4)
    assert [w for w, _ in sink.windows[2:]] == [[9, 10, 11, 12]]
    assert log.reads == [0, 4, 8, 12]  # 9-12 was not read again; 13-16 read ahead
    # 5-8 acknowledged up to 6: what was in flight and read ahead after it is dropped,
    # and the log read again from the cursor.
    sink.windows[1][1].set_result(2)
    await task
    assert forwarder.status.cursor == 6 and sink.windows[2][1].cancelled()
    task = asyncio.ensure_future(forwarder.step())
    await _turns(lambda: len(sink.windows) >= 5)
    assert [w for w, _ in sink.windows[3:5]] == [[7, 8, 9, 10], [11, 12, 13, 14]]
    assert log.reads[4:6] == [6, 10]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_after_a_resend_one_window_goes_until_one_is_acknowledged_in_full() -> None:
    # An R3 stream whose leader was killed refuses the windows in flight ("no responders");
    # were the forwarder to send its whole pipeline again at once, the new leader could
    # store a later window before an earlier refused one goes again: out of log order.
    log = MemoryLog()
    for i in range(20):
        log.append("s/t", b"%d" % i)
    sink = PipelinedSink()

    async def no_wait(_: float) -> None:
        pass

    forwarder = Forwarder(lambda: sink, log, cursor=0, window=4, depth=3,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.0), sleep=no_wait)
    task = asyncio.ensure_future(forwarder.step())
    await _turns(lambda: len(sink.windows) >= 3)
    assert [w for w, _ in sink.windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    sink.windows[0][1].set_exception(Resend("no responders"))
    await task
    assert all(f.cancelled() for _, f in sink.windows[1:3])
    task = asyncio.ensure_future(forwarder.step())
    await _turns(lambda: len(sink.windows) >= 5)
    assert [w for w, _ in sink.windows[3:]] == [[1, 2, 3, 4]]  # alone in flight
    sink.windows[3][1].set_result(4)
    await task
    assert forwarder.status.cursor == 4
    task = asyncio.ensure_future(forwarder.step())  # acknowledged in full: the pipeline again
    await _turns(lambda: len(sink.windows) >= 6)
    assert [w for w, _ in sink.windows[4:]] == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_cancelled_during_its_read_ahead_the_forwarder_leaves_no_future_unretrieved(
        ) -> None:
    """Shut down while the full pipeline's page after the newest window is being read: the
    oldest window's acknowledgements (failed by the sink's close, as a lost connection
    fails them) must not be left to asyncio's "exception was never retrieved" log."""
    log = ReadLog()
    for i in range(16):
        log.append("s/t", b"%d" % i)
    reading = asyncio.Event()
    never = asyncio.Event()

    class BlockedAhead(ReadLog):
        async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
            if cursor == 8:  # the read-ahead: held until the forwarder is cancelled
                reading.set()
                await never.wait()
            return await log.read_after(cursor, limit)

    class FailingSink(PipelinedSink):
        async def close(self) -> None:
            for _, future in self.windows:
                if not future.done():
                    future.set_exception(ConnectionResetError("closed"))

    sinks = [FailingSink()]  # (dropped before the collection below)
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
    try:
        forwarder = Forwarder(lambda: sinks[0], BlockedAhead(), cursor=0, window=4, depth=2,
                              backoff=Backoff(1.0, 8.0, rand=lambda: 0.0))
        task = asyncio.ensure_future(forwarder.run())
        await asyncio.wait_for(reading.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert len(sinks[0].windows) == 2
        for _ in range(3):  # the done callbacks run
            await asyncio.sleep(0)
        del task, forwarder
        sinks.clear()
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(previous)


async def test_stopped_after_handling_failed_windows_the_forwarder_raises_the_cancel_only(
        ) -> None:
    """Stopped (cancelled) after it handled failed windows, the forwarder raises the
    cancel, and leaves no failure behind as an exception being handled. Compiled, an
    `await` in an `except` or a `finally` got both wrong (docs/compiled.md): `run` raised
    the old `Resend` instead (the broker took it for a local failure and did not stop), and
    an exception raised later by the coroutine that ran it had that `Resend` as context.
    Here a Python coroutine runs it, as server/bridges.py does; tests/system/
    test_compiled.py runs this file against the compiled build."""
    log = MemoryLog()
    for i in range(8):
        log.append("s/t", b"%d" % i)

    class ClosingSink(PipelinedSink):
        async def close(self) -> None:
            await asyncio.sleep(0)  # as closing a connection does: the forwarder suspends

    sink = ClosingSink()
    failures: list[BaseException] = [Resend("no responders"), ConnectionResetError("reset")]

    async def backoff(_: float) -> None:
        await asyncio.sleep(0)  # no time, but the forwarder suspends, as for a real delay

    forwarder = Forwarder(lambda: sink, log, cursor=0, window=4, depth=1,
                          backoff=Backoff(1.0, 8.0, rand=lambda: 0.0), sleep=backoff)
    outcome: dict[str, BaseException | None] = {}

    async def bridge() -> None:
        try:
            await forwarder.run()
        except BaseException as exc:
            outcome["raised"] = exc
        try:
            raise KeyError("later")
        except KeyError as later:
            outcome["context"] = later.__context__

    task = asyncio.ensure_future(bridge())
    answered = 0
    while True:
        await _turns(lambda seen=answered: len(sink.windows) > seen or log.committed == 8)
        if log.committed == 8:
            break
        assert len(sink.windows) > answered, "no window written"
        # The forwarder is waiting on it already: a failure is thrown into it.
        window, future = sink.windows[answered]
        answered += 1
        if failures:
            future.set_exception(failures.pop(0))
        else:
            future.set_result(len(window))
    assert forwarder.status.failures == 2
    task.cancel()
    await task
    assert isinstance(outcome["raised"], asyncio.CancelledError), outcome
    assert outcome["context"] is None
