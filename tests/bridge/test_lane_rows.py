"""The broker's side of the QoS 0 lane (server/bridge_lane.py `Lane`): loop turns gathered
into rows (bounded in bytes and in time, appended at once at low rates, nothing left behind
when the lane closes), offsets in order, and the process told of new rows only when it asks
("lane_wait"); and the process's side (server/bridge_lane_child.py `LaneReader`) reading
new rows from the file without being told, asking only when it has read everything."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from edge_broker.core.changes import Message
from edge_broker.server.bridge_lane import Lane
from edge_broker.server.bridge_lane_child import LaneReader
from edge_broker.store.log.lane_file import LaneFile
from edge_broker.store.log.lane_view import LaneView, load_blob


def _messages(start: int, count: int) -> list[Message]:
    return [Message(n, "t", b"%d" % n, 0, False, received_at=100.0 + n, origin="dev")
            for n in range(start, start + count)]


def _rows(file: LaneFile) -> list[tuple[int, int, list[bytes]]]:
    """(first, count, payloads) of the file's rows."""
    out = []
    for first, count, blob in file._conn.execute(
            "SELECT first, count, data FROM lane ORDER BY first"):
        out.append((first, count, [r[1] for r in load_blob(file.path, first, blob, count)]))
    return out


async def _written(file: LaneFile) -> None:
    """Wait for the file's writer thread to have written what was queued, and let the loop
    run the lane's callback (`Lane._written`)."""
    assert file.wait_written()
    for _ in range(3):
        await asyncio.sleep(0)


def test_turns_are_gathered_into_rows_bounded_in_time(tmp_path: Path) -> None:
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        sent: list[tuple[Any, ...]] = []
        lane = Lane("b", "bridge-c", file, mark=3, notify=sent.append, row_interval_s=0.2)
        lane.send(_messages(0, 2))  # nothing appended for long: appended at once
        assert file.queued_next == 3
        lane.send(_messages(2, 2))  # within the interval: gathered
        lane.send([*_messages(4, 1), Message(9, "t", b"own", 0, False, origin="bridge-c")])
        assert file.queued_next == 3 and lane._timer is not None
        deadline = asyncio.get_running_loop().time() + 10
        while file.next_offset != 6 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # the timer appends the row at the interval's end
        assert _rows(file) == [(1, 2, [b"0", b"1"]), (3, 3, [b"2", b"3", b"4"])]
        assert lane.sent == 5 and sent == []  # the process did not ask
        lane.close()
        file.close()

    asyncio.run(run())


def test_rows_bounded_in_bytes_and_closing_appends_what_was_gathered(tmp_path: Path) -> None:
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        lane = Lane("b", "", file, mark=0, notify=lambda message: None,
                    row_bytes=100, row_interval_s=3600)
        lane.send(_messages(0, 1))
        for n in range(1, 12):  # 18 bytes each (the first of a row 22, + 1): 100 at the 6th
            lane.send(_messages(n, 1))
        await _written(file)
        rows = _rows(file)
        assert [(first, count) for first, count, _ in rows] == [(1, 1), (2, 6)]
        lane.close()  # the lane closes (the process ends): nothing stays gathered
        assert lane._timer is None
        await _written(file)
        rows = _rows(file)
        assert [(first, count) for first, count, _ in rows] == [(1, 1), (2, 6), (8, 5)]
        assert [p for _, _, payloads in rows for p in payloads] == [b"%d" % n
                                                                  for n in range(12)]
        assert file.next_offset == 13
        file.close()

    asyncio.run(run())


def test_the_process_is_told_only_when_it_asks(tmp_path: Path) -> None:
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        sent: list[tuple[Any, ...]] = []
        lane = Lane("b", "", file, mark=0, notify=sent.append, row_interval_s=0)
        lane.send(_messages(0, 2))
        lane.wanted(0)  # not committed yet: answered once it is
        assert sent == []
        await _written(file)
        assert sent == [("lane", 2, 0)]
        lane.wanted(0)  # the process read up to 0: the file goes further, answered at once
        assert sent == [("lane", 2, 0), ("lane", 2, 0)]
        del sent[1:]
        lane.wanted(2)  # read everything: answered after the next append
        assert sent == [("lane", 2, 0)]
        lane.send(_messages(2, 1))
        await _written(file)
        lane.send(_messages(3, 1))  # answered once only
        await _written(file)
        assert sent == [("lane", 2, 0), ("lane", 3, 0)]
        lane.close()
        file.close()

    asyncio.run(run())


def test_the_process_reads_new_rows_without_being_told(tmp_path: Path) -> None:
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        asked: list[tuple[Any, ...]] = []
        lane = Lane("b", "", file, mark=0, notify=lambda message: None, row_interval_s=0)
        reader = LaneReader(LaneView(file.path, file.cursor, file.next_offset - 1), mark=0,
                            send=asked.append)
        waiting = asyncio.ensure_future(reader.wait_after(0))
        await asyncio.sleep(0)
        assert asked == [("lane_wait", 0)] and not waiting.done()  # read all: it asks once
        lane.send(_messages(0, 3))
        lane.send(_messages(3, 2))  # no "lane" frame: it did not ask since
        await _written(file)
        got = await reader.read_after(0, 10)  # a busy reader finds the rows in the file
        assert [m.offset for m in got] == [1, 2, 3, 4, 5]
        assert [m.payload for m in got] == [b"0", b"1", b"2", b"3", b"4"]
        reader.wake()
        await asyncio.wait_for(waiting, 5)
        await reader.wait_after(0)  # rows after 0 known: no question
        assert asked == [("lane_wait", 0)]
        waiting = asyncio.ensure_future(reader.wait_after(5))
        await asyncio.sleep(0)
        assert asked == [("lane_wait", 0), ("lane_wait", 5)]
        lane.send(_messages(5, 1))
        await _written(file)
        reader.appended(file.next_offset - 1, file.cursor)  # the broker's answer
        await asyncio.wait_for(waiting, 5)
        reader.close()
        lane.close()
        file.close()

    asyncio.run(run())


def test_a_row_longer_than_a_window_is_read_from_the_file_once(tmp_path: Path) -> None:
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        lane = Lane("b", "", file, mark=0, notify=lambda message: None, row_interval_s=0)
        lane.send(_messages(0, 10))
        lane.send(_messages(10, 3))
        await _written(file)
        view = LaneView(file.path, file.cursor, file.next_offset - 1)
        pages: list[int] = []
        page = view.page
        view.page = lambda after, limit: pages.append(after) or page(after, limit)  # type: ignore[method-assign]
        reader = LaneReader(view, mark=0, send=lambda message: None)
        got = []
        cursor = 0
        while batch := await reader.read_after(cursor, 4):  # windows of 4
            got.extend(batch)
            cursor = batch[-1].offset
        assert [m.offset for m in got] == list(range(1, 14))
        assert [m.payload for m in got] == [b"%d" % n for n in range(13)]
        # the file read once per row (at 0, at 10 for the second), and after the end (13)
        assert pages == [0, 10, 13]
        reader.close()
        lane.close()
        file.close()

    asyncio.run(run())


def test_the_loop_keeps_serving_while_a_lane_commit_is_held(tmp_path: Path) -> None:
    """The lane file is written on a thread of its own: while its commit is held (here
    another connection holds the file's write lock, as a slow WAL checkpoint's sync holds a
    commit on an SD card), the event loop keeps serving everyone else, and the row is
    written once the lock goes, nothing dropped, the waiting process told. (Written on the
    loop, the append held every client for SQLite's busy timeout, then dropped the row.)"""
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        sent: list[tuple[Any, ...]] = []
        lane = Lane("b", "", file, mark=0, notify=sent.append, row_interval_s=0)
        lane.wanted(0)  # the process read everything
        other = sqlite3.connect(file.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the lane file's commit cannot finish
        served = 0

        async def another_client() -> None:
            nonlocal served
            while served < 200:
                served += 1
                await asyncio.sleep(0)

        client = asyncio.ensure_future(another_client())
        lane.send(_messages(0, 3))
        await asyncio.wait_for(client, 10)
        assert served == 200 and lane.dropped == 0
        assert file.next_offset == 1 and sent == []  # not committed yet: nobody told
        other.execute("ROLLBACK")
        other.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not sent and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert sent == [("lane", 3, 0)] and lane.dropped == 0 and lane.sent == 3
        assert _rows(file) == [(1, 3, [b"0", b"1", b"2"])]
        lane.close()
        file.close()

    asyncio.run(run())


def test_a_stalled_writer_absorbs_megabytes_before_anything_is_dropped(tmp_path: Path) -> None:
    """While the lane file's writer thread is stalled (another connection holds the file's
    write lock, as a WAL checkpoint's sync on a slow disk does), 4 MiB of QoS 0 messages
    wait in memory for it and none is dropped; all are written, in order, once it goes on.
    (With the writer's queue bounded at 8 rows, 2 MiB, plus the 1 MiB row gathered while it
    is behind, the last MiB was dropped: S1 with every message uplinked lost 1-8 % of its
    lane messages on the 2-core benchmark machine.)"""
    async def run() -> None:
        file = LaneFile(str(tmp_path / "lane"), "s1")
        lane = Lane("b", "", file, mark=0, notify=lambda _frame: None, row_interval_s=0)
        other = sqlite3.connect(file.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the writer's first INSERT waits for it
        big = 64 * 1024
        for start in range(0, 64, 4):  # 16 loop turns of 256 KiB (a row's bytes)
            lane.send([Message(n, "t", b"%06d" % n + b"x" * (big - 6), 0, False,
                               received_at=100.0 + n, origin="dev")
                       for n in range(start, start + 4)])
            await asyncio.sleep(0)
        assert lane.dropped == 0
        other.execute("ROLLBACK")
        other.close()
        deadline = asyncio.get_running_loop().time() + 10
        while lane.sent < 64 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # rows that waited for room are queued by their timer
        await _written(file)
        assert lane.dropped == 0 and lane.sent == 64
        payloads = [p for _first, _count, rows in _rows(file) for p in rows]
        assert [p[:6] for p in payloads] == [b"%06d" % n for n in range(64)]
        lane.close()
        file.close()

    asyncio.run(run())
