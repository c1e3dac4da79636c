"""A window of the QoS 0 lane's forwarder fails (connection lost, remote down; or a
`Resend`) while it holds messages of rows the broker dropped for max_backlog_bytes: those
messages will not be sent again (the process skips the dropped rows), so they count as
dropped as soon as the window is given up, not at the next acknowledgement, which an outage
puts off for as long as it lasts (bridge/forward.py `_rewind`, server/bridge_lane_child.py
`LaneReader.rewind`, store/log/lane_file.py `LaneFile.held`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_broker.bridge.base import Backoff, Resend
from edge_broker.bridge.forward import Forwarder
from edge_broker.server.bridge_lane_child import LaneReader
from edge_broker.store.log.lane_file import LaneFile
from edge_broker.store.log.lane_view import LaneView
from tests.bridge.test_forward import PipelinedSink
from tests.bridge.test_lane_counts import _held
from tests.bridge.test_lane_file import _append, _batch


async def _until(predicate: object, what: str) -> None:
    """Let the loop run until `predicate()` holds (bounded: a fixed number of turns)."""
    for _ in range(1000):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)  # one loop turn (not a wait for time)
    raise AssertionError(what)


@pytest.mark.parametrize("failure", [ConnectionResetError("connection lost"),
                                     Resend("no responders")], ids=["lost", "resend"])
async def test_held_drops_of_a_failed_window_count_as_dropped_during_the_outage(
        tmp_path: Path, failure: Exception) -> None:
    path = str(tmp_path / "lane")
    broker = LaneFile(path, "s1", max_backlog_bytes=25)  # two rows of 10 bytes
    sent: list[tuple[object, ...]] = []
    reader = LaneReader(LaneView(path, 0, 0), mark=0, send=sent.append)
    sink = PipelinedSink()
    outage = asyncio.Event()  # the backoff delay lasts until the remote is back
    waiting: list[float] = []

    async def backoff_sleep(delay: float) -> None:
        waiting.append(delay)
        await outage.wait()

    forwarder = Forwarder(lambda: sink, reader, cursor=0, window=3, depth=1,
                          backoff=Backoff(1.0, 8.0), sleep=backoff_sleep)
    _append(broker, [_batch(0, 2)], mark=0)  # 1-2
    _append(broker, [_batch(2, 2)], mark=0)  # 3-4
    step = asyncio.ensure_future(forwarder.step())
    await _until(lambda: sink.windows, "a window written")
    assert sink.windows[0][0] == [1, 2, 3]
    assert _append(broker, [_batch(4, 2)], mark=0) == 2  # 5-6: 1-2 dropped, in flight
    reader.appended(broker.next_offset - 1, broker.cursor)  # the broker's word of it
    assert _held(sent) == (2, [(1, 2)])
    broker.held(*_held(sent))
    assert broker.dropped == 0 and broker._unsettled_count == 2
    sink.windows[0][1].set_exception(failure)
    await _until(lambda: waiting, "the forwarder waits for its backoff delay")
    # The window is given up: the process says it holds none of 1-2 now (before: nothing
    # was said until its next acknowledgement, after the outage).
    assert _held(sent) == (2, [])
    broker.held(*_held(sent))
    assert broker.dropped == 2 and broker._unsettled_count == 0
    assert broker.backlog_messages == 4  # 3-6: each message counted once
    outage.set()
    await step
    for _ in range(4):  # the remote is back: 3-5, then 6, acknowledged in full
        step = asyncio.ensure_future(forwarder.step())
        await _until(lambda: sink.windows and not sink.windows[-1][1].done(),
                     "the next window written")
        offsets, acks = sink.windows[-1]
        acks.set_result(len(offsets))
        await step
        kind, cursor, delivered = sent[-1]
        assert kind == "lane_ack"
        broker.commit_cursor(cursor, delivered)  # type: ignore[arg-type]
        if cursor == 6:
            break
    assert [w for w, _ in sink.windows[1:]] == [[3, 4, 5], [6]]
    assert broker.dropped == 2 and broker.backlog_messages == 0
    assert broker._unsettled_count == 0
    reader.close()
    broker.close(5)
