"""The QoS 0 lane's counts and its writer thread's life (store/log/lane_file.py): a message
counted once (a failed write beside a max_backlog_bytes drop), `dropped` never going down,
and a close that neither holds the event loop nor leaves two writers on one file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_broker.core.changes import Message
from edge_broker.errors import StoreError
from edge_broker.server.bridge_lane import Lane
from edge_broker.server.bridge_lane_child import LaneReader
from edge_broker.store.log import lane_file
from edge_broker.store.log.lane_file import LaneFile
from edge_broker.store.log.lane_view import LaneView
from tests.bridge.test_lane_file import _append, _batch


def _messages(start: int, count: int) -> list[Message]:
    return [Message(n, "t", b"%d" % n, 0, False, received_at=100.0 + n, origin="dev")
            for n in range(start, start + count)]


@contextmanager
def _locked(lane: LaneFile) -> Iterator[None]:
    """Another connection holds the file's write lock: the writer thread's writes fail at
    once (as on a full disk)."""
    other = sqlite3.connect(lane.path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    lane._conn.execute("PRAGMA busy_timeout = 0")  # (the writer thread is idle)
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


class _Held:
    """Holds the writer thread after its next write (in `on_written`) until released."""

    def __init__(self, lane: LaneFile) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()
        lane.on_written = self._hold

    def _hold(self) -> None:
        self.inside.set()
        self.release.wait(10)


def test_a_failed_row_then_dropped_for_max_backlog_bytes_is_counted_once(
        tmp_path: Path) -> None:
    """A row whose write failed (not yet collected) is then among the oldest that
    max_backlog_bytes drops: lost or dropped, not both."""
    lane = LaneFile(str(tmp_path / "lane"), "s1", max_backlog_bytes=25)
    with _locked(lane):
        _append(lane, [_batch(0, 4)], mark=0)  # offsets 1-4: the write fails
    dropped = _append(lane, [_batch(4, 4), _batch(8, 4)], mark=0)  # 5-12: stored
    assert lane.write_failed  # (taken from the figures by the append, not yet collected)
    lost, _error = lane.collect()
    assert not lane.write_failed
    assert (lost, dropped, lane.dropped) == (4, 0, 0)
    assert lane.backlog_messages == 8 and lane.backlog_bytes == 20
    lane.close(5)


def test_a_row_dropped_for_max_backlog_bytes_then_failing_its_write_is_counted_once(
        tmp_path: Path) -> None:
    """max_backlog_bytes drops rows still queued for the writer thread, whose write then
    fails: counted in `dropped`, not also as lost."""
    lane = LaneFile(str(tmp_path / "lane"), "s1", max_backlog_bytes=25)
    held = _Held(lane)
    lane.append([_batch(0, 4)], mark=0)  # 1-4: written, then the thread is held
    assert held.inside.wait(5)
    with _locked(lane):
        lane.append([_batch(4, 4)], mark=0)  # 5-8: queued
        assert lane.append([_batch(8, 4), _batch(12, 4)], mark=0) == 8  # 1-8 dropped
        lane.on_written = None
        held.release.set()
        assert lane.wait_written()  # 5-16 in one write, which fails
    lost, _error = lane.collect()
    lane.held(8, [])  # the process, told of the drop, had read none of them
    assert lane.dropped == 8 and lost == 8  # 1-8 dropped, 9-16 lost: 16 messages
    assert lane.backlog_messages == 0 and lane.backlog_bytes == 0
    lane.close(5)


def test_dropped_never_goes_down(tmp_path: Path) -> None:
    """The rows max_backlog_bytes dropped count once the process, told of the drop, says
    which of them it holds (read before, in flight); those it holds once it says
    whether it delivered them (then forwarded, not dropped). `dropped` only grows, in the
    file too."""
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1", max_backlog_bytes=25)
        seen = [writer.dropped]
        sent: list[tuple[object, ...]] = []
        reader = LaneReader(LaneView(path, 0, 0), mark=0, send=sent.append)
        _append(writer, [_batch(0, 4)], mark=0)
        reader.appended(writer.next_offset - 1, writer.cursor)
        window = list(await reader.read_after(0, 3))  # 1-3 in flight
        assert _append(writer, [_batch(4, 4), _batch(8, 4), _batch(12, 4)], mark=0) == 8
        seen.append(writer.dropped)  # 1-8 dropped, not settled yet
        assert writer.dropped == 0 and writer.backlog_messages == 8
        reader.appended(writer.next_offset - 1, writer.cursor)  # the broker's word
        assert sent == [("lane_held", 8, ((1, 3),))]
        writer.held(8, [(1, 3)])
        seen.append(writer.dropped)
        assert writer.dropped == 5 and writer.backlog_messages == 8  # 4-8; 1-3 held
        rest = list(await reader.read_after(3, 100))
        assert [m.offset for m in window + rest] == [1, 2, 3, *range(9, 17)]
        writer.commit_cursor(2, 2)  # 1-2 delivered
        seen.append(writer.dropped)
        writer.commit_cursor(10, 2)  # 3 not delivered (the window failed), 9-10 were
        seen.append(writer.dropped)
        assert writer.dropped == 6 and writer.backlog_messages == 6
        assert seen == sorted(seen)
        writer.close(5)
        again = LaneFile(path, "s1")
        assert again.dropped == 6
        again.close(5)
        reader.close()

    asyncio.run(run())


def test_drops_not_settled_count_when_the_next_run_starts(tmp_path: Path) -> None:
    path = str(tmp_path / "lane")
    lane = LaneFile(path, "s1", max_backlog_bytes=25)
    _append(lane, [_batch(0, 4)], mark=0)
    _append(lane, [_batch(4, 4), _batch(8, 4)], mark=0)
    assert lane.dropped == 0  # the running process has not answered (it ended)
    lane.settle()  # a new run starts at the cursor (server/bridge_lane.py Lane)
    assert lane.dropped == 4 and lane.backlog_messages == 8
    lane.commit_cursor(12, 8)
    assert lane.dropped == 4
    lane.close(5)
    again = LaneFile(path, "s1")
    assert again.dropped == 4
    again.close(5)


def test_a_drop_not_settled_is_stored_as_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "lane")
    lane = LaneFile(path, "s1", max_backlog_bytes=25)
    _append(lane, [_batch(0, 4)], mark=0)
    _append(lane, [_batch(4, 4), _batch(8, 4)], mark=0)
    lane.close(5)  # (a broker restart: the next process starts at the cursor)
    again = LaneFile(path, "s1")
    assert again.dropped == 4 and again.cursor == 4
    again.close(5)


def test_close_does_not_wait_for_a_stalled_writer_and_never_opens_a_second_one(
        tmp_path: Path) -> None:
    """The writer thread is stalled (a slow disk; here held): `close` returns at once (it
    ran on the broker's event loop), the file is not opened again while that thread still
    writes, and `aclose` waits for it without holding the loop."""
    async def run() -> None:
        path = str(tmp_path / "lane")
        lane = LaneFile(path, "s1")
        held = _Held(lane)
        lane.append([_batch(0, 2)], mark=0)
        assert held.inside.wait(5)
        lane.append([_batch(2, 3)], mark=0)  # queued behind the stalled write
        started = time.monotonic()
        lane.close()
        assert time.monotonic() - started < 1.0
        with pytest.raises(StoreError, match="previous writer"):
            LaneFile(path, "s1")
        ticks = 0

        async def tick() -> None:  # the loop keeps running while aclose waits
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 3:
                    held.release.set()
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(tick())
        assert await lane.aclose(5)
        ticking.cancel()
        assert ticks >= 3
        again = LaneFile(path, "s1")
        assert again.next_offset == 6  # the queued row was written before the end
        again.close(5)

    asyncio.run(run())


def test_a_writer_thread_that_ended_is_forgotten(tmp_path: Path) -> None:
    """The table of writer threads (one per file, lane_file._WRITERS) keeps a writer only
    while it runs: closed at once, or left behind stalled and ending later (before: every
    writer that ever ran stayed in it, one entry per file and thread)."""
    for n in range(3):
        path = tmp_path / f"lane-{n}"
        lane = LaneFile(str(path), "s1")
        assert lane_file._WRITERS[os.path.realpath(path)] is lane._writer
        lane.append([_batch(0, 2)], mark=0)
        lane.close(5)
        assert not lane._writer.is_alive()
        assert os.path.realpath(path) not in lane_file._WRITERS
    path = tmp_path / "stalled"
    lane = LaneFile(str(path), "s1")
    held = _Held(lane)
    lane.append([_batch(0, 2)], mark=0)
    assert held.inside.wait(5)
    lane.close()  # left behind, still writing: kept (the file is not opened again)
    assert lane_file._WRITERS[os.path.realpath(path)] is lane._writer
    held.release.set()
    lane._writer.join(5)
    assert os.path.realpath(path) not in lane_file._WRITERS
    again = LaneFile(str(path), "s1")
    assert again.next_offset == 3
    again.close(5)
    assert os.path.realpath(path) not in lane_file._WRITERS


def test_the_process_is_told_of_a_drop_once_until_it_answers(tmp_path: Path) -> None:
    """Every row appended over max_backlog_bytes drops the oldest; the process is told at
    once ("lane" frame), but not again until it answered (a stopped process must not pile
    up frames in the broker)."""
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1", max_backlog_bytes=1)
        sent: list[tuple[object, ...]] = []
        lane = Lane("b", "bridge-c", file, mark=0, notify=sent.append, row_interval_s=0)
        for n in range(5):  # each row drops the one before
            lane.send(_messages(n, 1))
        assert sent == [("lane", file.next_offset - 1, 1)] and file.cursor == 4
        lane.held(1, [])  # the process's answer: told of the drops since at once
        assert sent[1:] == [("lane", file.next_offset - 1, 4)]
        lane.held(4, [])
        lane.send(_messages(5, 1))
        assert sent[2:] == [("lane", file.next_offset - 1, 5)]
        lane.held(5, [])
        assert file.dropped == 5 and file.backlog_messages == 1
        lane.close()
        file.close(5)

    asyncio.run(run())


def _held(sent: list[tuple[object, ...]]) -> tuple[int, list[tuple[int, int]]]:
    """The process's last "lane_held" (drop floor, runs), as server/bridge_proc.py reads
    it."""
    kind, floor, runs = sent[-1]
    assert kind == "lane_held"
    assert isinstance(floor, int) and isinstance(runs, tuple)
    return floor, [(int(first), int(last)) for first, last in runs]


def test_the_dropped_messages_the_process_holds_need_not_be_the_oldest(
        tmp_path: Path) -> None:
    """The process reads on past rows the broker dropped (and deleted) before it was told:
    what it holds of a drop is then its newest messages, not the oldest. It names them;
    counting the oldest as held counted 5 and 6 both forwarded and dropped (5, not 4)."""
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1", max_backlog_bytes=25)  # two rows of 10 bytes
        sent: list[tuple[object, ...]] = []
        reader = LaneReader(LaneView(path, 0, 0), mark=0, send=sent.append)
        _append(writer, [_batch(0, 2)], mark=0)  # 1-2
        _append(writer, [_batch(2, 2)], mark=0)  # 3-4
        assert _append(writer, [_batch(4, 2)], mark=0) == 2  # 5-6: 1-2 dropped
        told = [(writer.next_offset - 1, writer.cursor)]  # (the broker's word, on its way)
        assert _append(writer, [_batch(6, 2)], mark=0) == 2  # 7-8: 3-4 dropped
        window = await reader.read_after(0, 3)  # the rows of 1-4 are gone from the file
        assert [m.offset for m in window] == [5, 6, 7]
        assert _append(writer, [_batch(8, 2)], mark=0) == 2  # 9-10: 5-6 dropped
        told.append((writer.next_offset - 1, writer.cursor))
        reader.appended(*told[0])
        writer.held(*_held(sent))  # holds none of 1-2
        assert writer.dropped == 2
        reader.appended(*told[1])
        assert _held(sent) == (6, [(5, 6)])
        writer.held(*_held(sent))
        assert writer.dropped == 4  # 3-4; 5-6 in flight
        for cursor in (5, 7):  # the remote side acknowledges 5, then 6-7
            await reader.commit_cursor(cursor)
            _kind, acked, delivered = sent[-1]
            assert isinstance(acked, int) and isinstance(delivered, int)
            writer.commit_cursor(acked, delivered)
        rest = await reader.read_after(7, 100)
        assert [m.offset for m in rest] == [8, 9, 10]
        await reader.commit_cursor(10)
        writer.commit_cursor(10, 3)
        assert writer.dropped == 4  # 1-4; 5-10 forwarded
        assert writer.backlog_messages == 0 and writer._unsettled_count == 0
        reader.close()
        writer.close(5)

    asyncio.run(run())


def test_a_resend_cuts_what_the_process_held_at_an_earlier_word(tmp_path: Path) -> None:
    """The process held 1-2 at the word of their drop; a resend (the window failed) reads
    again after them (skipped now): it holds 3-4 at the next word, not 1-2. Counting the
    oldest as held counted 3 or 4 both forwarded and dropped."""
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1", max_backlog_bytes=25)
        sent: list[tuple[object, ...]] = []
        reader = LaneReader(LaneView(path, 0, 0), mark=0, send=sent.append)
        _append(writer, [_batch(0, 2)], mark=0)  # 1-2
        _append(writer, [_batch(2, 2)], mark=0)  # 3-4
        assert [m.offset for m in await reader.read_after(0, 3)] == [1, 2, 3]
        assert _append(writer, [_batch(4, 2)], mark=0) == 2  # 5-6: 1-2 dropped
        reader.appended(writer.next_offset - 1, writer.cursor)
        assert _held(sent) == (2, [(1, 2)])
        writer.held(*_held(sent))
        assert writer.dropped == 0
        again = await reader.read_after(0, 2)  # the window failed: read again
        assert [m.offset for m in again] == [3, 4]
        assert _append(writer, [_batch(6, 2)], mark=0) == 2  # 7-8: 3-4 dropped
        reader.appended(writer.next_offset - 1, writer.cursor)
        assert _held(sent) == (4, [(3, 4)])
        writer.held(*_held(sent))
        assert writer.dropped == 2  # 1-2 (never sent again); 3-4 in flight
        for cursor in (3, 4):
            await reader.commit_cursor(cursor)
            writer.commit_cursor(cursor, 1)
        assert sent[-1] == ("lane_ack", 4, 1)
        assert writer.dropped == 2 and writer._unsettled_count == 0
        assert writer.backlog_messages == 4  # 5-8
        reader.close()
        writer.close(5)

    asyncio.run(run())
