"""The QoS 0 lane's own log (store/log/lane_file.py: the broker's `LaneFile`, the process's
read-only `LaneView`) and its reader in the uplink process (server/bridge_lane_child.py),
without a remote side: offsets, the cursor across a reopen, the `max_backlog_bytes` bound, a
file of another store, the acknowledged cursor going back to the broker, and the order gate
between the log and the lane."""

from __future__ import annotations

import asyncio
import logging
import pickle
import sqlite3
from pathlib import Path

import pytest

from edge_broker.bridge.base import BridgeMessage
from edge_broker.core.changes import Message
from edge_broker.errors import StoreError
from edge_broker.mqtt.properties import Properties
from edge_broker.server.bridge_lane_child import LaneReader
from edge_broker.store.log.lane_codec import decode_records, encode_records
from edge_broker.store.log.lane_file import LaneFile
from edge_broker.store.log.lane_view import LaneView, load_blob


def _batch(first_n: int, count: int, size: int = 10) -> tuple[int, int, float, bytes]:
    """A row of `count` messages (payloads first_n, first_n + 1, ...), `size` bytes as
    the backlog counts it (0: the blob's)."""
    messages = [Message(n, f"t/{n % 2}", b"%d" % n, 0, False, received_at=1000.0 + n,
                        origin="dev") for n in range(first_n, first_n + count)]
    n, at, blob = encode_records(messages, "bridge-c")
    return n, size or len(blob), at, blob


def _view(lane: LaneFile) -> LaneView:
    """The process's view of the file, as the broker's "init" sets it up."""
    return LaneView(lane.path, lane.cursor, lane.next_offset - 1)


def _append(lane: LaneFile, batches: list[tuple[int, int, float, bytes]], mark: int) -> int:
    """`LaneFile.append`, then wait for its writer thread to have written it."""
    dropped = lane.append(batches, mark=mark)
    assert lane.wait_written()
    return dropped


def _payloads(messages: list[BridgeMessage]) -> list[int]:
    return [int(m.payload) for m in messages]


def test_offsets_cursor_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "lane")
    lane = LaneFile(path, "s1")
    _append(lane, [_batch(0, 3), _batch(3, 2)], mark=5)
    assert lane.next_offset == 6 and lane.backlog_messages == 5
    lane.commit_cursor(4)  # the first row gone, the second still needed
    assert lane.backlog_messages == 1 and lane.pending_mark == 5
    lane.close(5)
    again = LaneFile(path, "s1")
    assert again.cursor == 4 and again.next_offset == 6 and again.backlog_messages == 1
    view = _view(again)
    rows = view.page(4, 10)
    assert [(first, count) for first, count, _mark, _blob in rows] == [(4, 2)]
    assert view.pending_mark == 5 and view.mark_after(4) == 5 and view.mark_after(5) is None
    view.close()
    again.close(5)


def test_a_file_of_another_store_is_emptied(tmp_path: Path) -> None:
    path = str(tmp_path / "lane")
    lane = LaneFile(path, "s1")
    _append(lane, [_batch(0, 3)], mark=0)
    lane.close(5)
    other = LaneFile(path, "s2")
    assert other.backlog_messages == 0 and other.next_offset == 1
    other.close()


def test_a_failed_write_is_reported_counted_and_not_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write the file refuses (here: another writer holds its lock; disk full alike)
    stores nothing; `collect` reports its messages (the lane counts them in `dropped`) with
    an error naming the file, and the backlog figures drop them; the next append goes on
    after their offsets. A cursor that could not be stored is logged naming the file and
    table (the next acknowledgement stores a later one)."""
    path = str(tmp_path / "lane")
    lane = LaneFile(path, "s1")
    _append(lane, [_batch(0, 2)], mark=0)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    lane._conn.execute("PRAGMA busy_timeout = 0")  # (the writer thread is idle)
    with caplog.at_level(logging.ERROR, "edge_broker.bridges"):
        _append(lane, [_batch(2, 3), _batch(5, 2)], mark=0)
        lane.commit_cursor(2)
        assert lane.wait_written()
    lost, error = lane.collect()
    assert lost == 5 and error.startswith(f"{path}: table lane: ")
    assert lane.collect() == (0, "")
    assert f"{path}: table lane_meta, key cursor" in caplog.text
    assert (lane.backlog_messages, lane.backlog_bytes, lane.cursor) == (0, 0, 2)
    other.execute("ROLLBACK")
    other.close()
    _append(lane, [_batch(7, 1)], mark=0)
    assert lane.next_offset == 9 and lane.backlog_messages == 1 and lane.backlog_bytes == 10
    view = _view(lane)
    assert [(first, count) for first, count, *_ in view.page(0, 10)] == [(1, 2), (8, 1)]
    view.close()
    lane.close(5)


def test_max_backlog_bytes_drops_the_oldest_rows(tmp_path: Path) -> None:
    lane = LaneFile(str(tmp_path / "lane"), "s1", max_backlog_bytes=25)
    assert _append(lane, [_batch(0, 4)], mark=0) == 0
    assert _append(lane, [_batch(4, 4), _batch(8, 4)], mark=0) == 4  # 30 bytes > 25
    assert lane.cursor == 4 and lane.backlog_bytes == 20
    lane.held(4, [])  # the process, told of the drop, had read none of them
    assert lane.dropped == 4 and lane.backlog_messages == 8
    view = _view(lane)
    assert [first for first, *_ in view.page(lane.cursor, 100)] == [5, 9]
    view.close()
    lane.close(5)


def test_the_broker_writes_the_process_reads_and_acknowledges(tmp_path: Path) -> None:
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1")  # the broker's
        sent: list[tuple[object, ...]] = []
        reader = LaneReader(_view(writer), mark=0, send=sent.append)  # the process's
        for start in range(0, 10, 5):
            _append(writer, [_batch(start, 5)], mark=0)
            reader.appended(writer.next_offset - 1, writer.cursor)  # the "lane" frame
        assert reader._ready_after(0)
        assert _payloads(list(await reader.read_after(0, 3))) == [0, 1, 2]
        assert _payloads(list(await reader.read_after(3, 100))) == list(range(3, 10))
        await reader.commit_cursor(7)
        assert sent == [("lane_ack", 7, 7)]  # the broker stores it and deletes the rows
        writer.commit_cursor(7)
        reader.close()
        writer.close(5)
        again = LaneFile(path, "s1")
        assert again.cursor == 7 and again.backlog_messages == 3
        reader = LaneReader(_view(again), mark=0, send=sent.append)  # a new process
        got = list(await reader.read_after(reader.file.cursor, 100))
        assert [m.offset for m in got] == [8, 9, 10] and _payloads(got) == [7, 8, 9]
        reader.close()
        again.close(5)

    asyncio.run(run())


def test_rows_the_broker_dropped_are_skipped_by_the_process(tmp_path: Path) -> None:
    async def run() -> None:
        writer = LaneFile(str(tmp_path / "lane"), "s1", max_backlog_bytes=25)
        reader = LaneReader(_view(writer), mark=0, send=lambda message: None)
        _append(writer, [_batch(0, 4)], mark=0)
        reader.appended(writer.next_offset - 1, writer.cursor)
        _append(writer, [_batch(4, 4), _batch(8, 4)], mark=0)  # the first row dropped
        reader.appended(writer.next_offset - 1, writer.cursor)
        assert reader.file.cursor == 4 and reader.progress.is_set()
        got = list(await reader.read_after(0, 100))
        assert [m.offset for m in got] == list(range(5, 13))
        reader.close()
        writer.close(5)

    asyncio.run(run())


def test_rows_at_or_below_the_cursor_are_not_kept_by_the_view(tmp_path: Path) -> None:
    """The broker's word of a drop up to 6 left before the row of 5-6 committed (its write
    under way) and is read after: that row, in the file until the drop's delete commits,
    is then found by `poll` or by a later word's `refresh`, below the view's cursor. Kept,
    its mark was the view's `pending_mark` (the LogGate held the log's QoS 0 rows behind
    it) until the cursor moved again."""
    writer = LaneFile(str(tmp_path / "lane"), "s1")
    _append(writer, [_batch(0, 4)], mark=1)  # 1-4
    polled = _view(writer)
    refreshed = _view(writer)
    _append(writer, [_batch(4, 2)], mark=2)  # 5-6, not known to the views yet
    for view in (polled, refreshed):
        view.refresh(4, 6)  # the word of the drop up to 6
        assert view.cursor == 6 and view.pending_mark is None
    assert polled.poll()  # 5-6 found in the file (its offsets known now)
    assert not polled.poll()
    _append(writer, [_batch(6, 2)], mark=3)  # 7-8
    refreshed.refresh(8, 6)  # a later word, the same floor: 5-6 and 7-8 found
    polled.refresh(8, 6)
    for view in (polled, refreshed):
        assert view.pending_mark == 3 and view.mark_after(6) == 3
        assert view.next_offset == 9
        view.close()
    writer.close(5)


def test_a_row_dropped_after_the_process_read_it_counts_as_forwarded_not_dropped(
        tmp_path: Path) -> None:
    """max_backlog_bytes drops the oldest rows, counted in `dropped`; the messages of a row
    the process had already read (its window in flight) are sent all the same: once
    acknowledged they count as forwarded only, not in both (the process says how many it
    delivered). Those of a dropped row it skipped stay dropped, also after a reopen. The
    process, told of the drop, says which of them it holds: those are counted when it
    says whether it delivered them (`dropped` never goes down)."""
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1", max_backlog_bytes=25)
        sent: list[tuple[object, ...]] = []
        reader = LaneReader(_view(writer), mark=0, send=sent.append)
        _append(writer, [_batch(0, 4)], mark=0)
        reader.appended(writer.next_offset - 1, writer.cursor)
        window = list(await reader.read_after(0, 2))  # 1 and 2 in flight
        _append(writer, [_batch(4, 4), _batch(8, 4)], mark=0)  # 30 bytes > 25
        assert writer.dropped == 0  # the row of 1-4: the process may have read it
        reader.appended(writer.next_offset - 1, writer.cursor)  # 3 and 4 skipped
        assert sent == [("lane_held", 4, ((1, 2),))]  # 1 and 2 in flight
        writer.held(4, [(1, 2)])
        assert writer.dropped == 2 and writer.backlog_messages == 8
        rest = list(await reader.read_after(2, 100))
        assert [m.offset for m in window + rest] == [1, 2, *range(5, 13)]
        await reader.commit_cursor(12)  # the remote side acknowledged all it was sent
        assert sent[1:] == [("lane_ack", 12, 10)]
        writer.commit_cursor(12, 10)
        assert writer.dropped == 2 and writer.backlog_messages == 0
        reader.close()
        writer.close(5)
        again = LaneFile(path, "s1")
        assert again.dropped == 2 and again.cursor == 12
        again.close(5)

    asyncio.run(run())


def test_lane_rows_wait_for_the_log_up_to_their_mark(tmp_path: Path) -> None:
    class Gate:
        done_to = 4

    async def run() -> None:
        writer = LaneFile(str(tmp_path / "lane"), "s1")
        reader = LaneReader(_view(writer), mark=7, send=lambda message: None)
        reader.gate = Gate()
        _append(writer, [_batch(0, 2)], mark=7)
        reader.appended(writer.next_offset - 1, writer.cursor)
        assert list(await reader.read_after(0, 10)) == []  # the log is acknowledged up to 4
        Gate.done_to = 7
        assert _payloads(list(await reader.read_after(0, 10))) == [0, 1]
        reader.close()
        writer.close(5)

    asyncio.run(run())


def test_records_carry_what_the_headers_need() -> None:
    plain = Message(1, "a/b", b"x", 0, True, received_at=5.0, origin="dev")
    again = Message(2, "a/b", b"", 0, False, received_at=5.5, origin="dev")  # repeated
    same = Message(6, "a/b", b"s", 0, True, received_at=5.5, origin="dev")  # a short head
    rich = Message(3, "a/\u00e9", b"y", 0, False,
                   properties=Properties(content_type="text/plain", payload_format_indicator=1,
                                         user_properties=(("k", "v"), ("k", "\u00fc"))),
                   received_at=6.0, origin="dev")
    own = Message(4, "a/d", b"z", 0, False, origin="bridge-c")
    bare = Message(5, "a/b", b"w", 0, False, properties=Properties(user_properties=()),
                   received_at=7.0, origin="")
    count, at, blob = encode_records([plain, again, same, rich, own, bare], "bridge-c")
    assert count == 5 and at == 5.0
    assert decode_records(blob) == [
        ("a/b", b"x", True, "dev", 5.0, None),
        ("a/b", b"", False, "dev", 5.5, None),
        ("a/b", b"s", True, "dev", 5.5, None),
        ("a/\u00e9", b"y", False, "dev", 6.0, ("text/plain", True, (("k", "v"), ("k", "\u00fc")))),
        ("a/b", b"w", False, "", 7.0, (None, False, ())),
    ]


def test_a_damaged_row_is_a_store_error_naming_file_table_and_row(tmp_path: Path) -> None:
    """Every way the bytes of a row can be wrong - cut short anywhere, a flag bit or a
    length changed, another count of messages than the row says - is a StoreError naming
    the file, the table and the row; never a crash, never a shortened record."""
    path = str(tmp_path / "lane")
    rich = Message(1, "a/b", b"payload", 0, False,
                   properties=Properties(content_type="text/plain",
                                         user_properties=(("k", "v"),)),
                   received_at=6.0, origin="dev")
    count, _at, blob = encode_records([rich, rich], "")  # the second with a short head
    assert load_blob(path, 3, blob, count) == decode_records(blob)
    damaged = [blob[:cut] for cut in range(1, len(blob))]  # cut short at every byte
    damaged.append(b"\x02" + blob[1:])  # another format
    damaged.append(b"")
    damaged.append(blob[:1] + bytes([blob[1] | 0x40]) + blob[2:])  # an unknown flag
    damaged.append(blob[:1] + bytes([blob[1] | 0x02]) + blob[2:])  # "same topic" first
    damaged.append(blob[:1] + bytes([blob[1] | 0x10]) + blob[2:])  # a short head first
    damaged.append(blob[:14] + b"\xff" + blob[15:])  # the topic's length
    damaged.append(blob + b"\x00")
    for bad in damaged:
        try:
            records = load_blob(path, 3, bad, count)
        except StoreError as exc:
            assert f"{path}: table lane, row first=3: damaged" in str(exc)
        else:  # (a cut that still decodes would have to give whole records)
            raise AssertionError(f"{bad!r} loaded as {records}")
    with pytest.raises(StoreError, match="1 messages in a row of 2"):
        load_blob(path, 3, encode_records([rich], "")[2], 2)


def test_a_damaged_row_stops_the_lane_reader_with_a_store_error(tmp_path: Path) -> None:
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1")
        count, size, at, blob = _batch(0, 3)
        _append(writer, [(count, size, at, blob[:-1])], mark=0)
        reader = LaneReader(_view(writer), mark=0, send=lambda message: None)
        with pytest.raises(StoreError, match=f"{path}: table lane, row first=1"):
            await reader.read_after(0, 10)
        reader.close()
        writer.close(5)

    asyncio.run(run())


def test_rows_of_an_earlier_version_are_still_read(tmp_path: Path) -> None:
    """A pickled list of records (the format before 2026-12) left in the file by an
    upgrade is forwarded, not refused."""
    path = str(tmp_path / "lane")
    records = [("t/0", b"0", False, "dev", 1000.0, None),
               ("t/1", b"1", True, "dev", 1001.0, ("text/plain", True, (("k", "v"),)))]
    assert load_blob(path, 1, pickle.dumps(records, protocol=5), 2) == records


@pytest.mark.parametrize("drained_first", [False, True])
def test_log_gate_holds_qos0_log_rows_behind_older_lane_rows(tmp_path: Path,
                                                             drained_first: bool) -> None:
    from edge_broker.server.bridge_lane_child import LogGate

    class FakeLog:
        last_committed = 20

        def __init__(self) -> None:
            self.rows = [BridgeMessage(10, "t/0", b"a", qos=1),
                         BridgeMessage(11, "t/0", b"b", qos=0)]

        async def read_after(self, cursor: int, limit: int) -> list[BridgeMessage]:
            return [m for m in self.rows if m.offset > cursor][:limit]

        async def wait_after(self, cursor: int) -> None:
            await asyncio.sleep(3600)

        async def commit_cursor(self, cursor: int) -> None:
            pass

    async def run() -> None:
        path = str(tmp_path / "lane")
        older = LaneFile(path, "s1")
        _append(older, [_batch(0, 2)], mark=5)  # an earlier run's lane rows (log up to 5)
        lane = LaneReader(_view(older), mark=15, send=lambda message: None)  # log up to 15
        gate = LogGate(FakeLog(), lane, mark=15)
        # The QoS 1 row goes; the QoS 0 row 11 (published while no process ran, after the
        # lane's rows) waits for them.
        assert [m.offset for m in await gate.read_after(0, 10)] == [10]
        await gate.commit_cursor(10)
        assert list(await gate.read_after(10, 10)) == []
        if drained_first:  # the lane's rows acknowledged before the log forwarder waits
            assert gate.done_to >= 5  # so the lane's rows may go
            assert [m.offset for m in await lane.read_after(0, 10)] == [1, 2]
            await lane.commit_cursor(2)
            await asyncio.wait_for(gate.wait_after(10), 5)
        else:
            waiting = asyncio.ensure_future(gate.wait_after(10))
            await asyncio.sleep(0)
            assert not waiting.done()
            assert gate.done_to >= 5  # so the lane's rows may go
            assert [m.offset for m in await lane.read_after(0, 10)] == [1, 2]
            await lane.commit_cursor(2)
            await asyncio.wait_for(waiting, 5)
        assert [m.offset for m in await gate.read_after(10, 10)] == [11]
        lane.close()
        older.close(5)

    asyncio.run(run())


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("a lane blob ran code",))


def test_a_blob_naming_a_global_is_refused_not_run(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The lane file is data on disk: a blob that would call a function when unpickled (here
    # print) is a damaged row, reported with file, table and key, and nothing runs.
    path = str(tmp_path / "lane")
    # The message names what was refused (the compiled build does not keep __cause__).
    with pytest.raises(StoreError, match=r"lane.*table lane, row first=7: damaged.*"
                                         r"names builtins\.print"):
        load_blob(path, 7, pickle.dumps([_Boom()]))
    assert "ran code" not in capsys.readouterr().out
    with pytest.raises(StoreError, match="row first=8"):
        load_blob(path, 8, b"\x80\x05 not a pickle")
    with pytest.raises(StoreError, match="6-item records"):
        load_blob(path, 9, pickle.dumps([("t", b"p")]))
    assert load_blob(path, 1, _batch(0, 2)[3]) == decode_records(_batch(0, 2)[3])


def test_a_failed_write_at_the_end_does_not_stop_the_process_reading(tmp_path: Path) -> None:
    """The broker's writer thread failed the last row's write (disk full; here another
    writer holds the lock) after the process had read everything: the "lane" frame then
    covers offsets without a row. The process must ask again ("lane_wait") and read the
    rows written after it, not wait for ever (nor spin on an empty read)."""
    async def run() -> None:
        path = str(tmp_path / "lane")
        writer = LaneFile(path, "s1")
        sent: list[tuple[object, ...]] = []
        reader = LaneReader(_view(writer), mark=0, send=sent.append)
        _append(writer, [_batch(0, 2)], mark=0)
        reader.appended(writer.next_offset - 1, writer.cursor)
        assert [m.offset for m in await reader.read_after(0, 100)] == [1, 2]
        await reader.commit_cursor(2)
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")
        writer._conn.execute("PRAGMA busy_timeout = 0")  # (the writer thread is idle)
        _append(writer, [_batch(2, 3)], mark=0)
        assert writer.wait_written()
        assert writer.collect()[0] == 3
        reader.appended(writer.next_offset - 1, writer.cursor)  # offsets 3-5, no row
        assert not reader._ready_after(2)
        waiting = asyncio.ensure_future(reader.wait_after(2))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done() and ("lane_wait", 5) in sent
        other.execute("ROLLBACK")
        other.close()
        _append(writer, [_batch(5, 2)], mark=0)
        assert writer.wait_written()
        reader.appended(writer.next_offset - 1, writer.cursor)  # the broker's answer
        await asyncio.wait_for(waiting, 5)
        assert [m.offset for m in await reader.read_after(2, 100)] == [6, 7]
        reader.close()
        writer.close(5)

    asyncio.run(run())
