"""A bridge's acknowledgements as the broker stores them (`separate_process = true`): the
uplink process sends the rows a cursor passes as their count, their bytes and one array of
their offsets and sizes (server/bridge_wire.py "ack"),
the broker counts them out of the backlog with `store.log.cursors.Passed` - exactly, also
when a drop (max_backlog_bytes) or the store budget moved the cursor over some of them
between the process's read and its acknowledgement."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from edge_broker.server.bridge_child_log import ChildLogReader
from edge_broker.server.bridge_wire import frame
from edge_broker.store.log import Log, LogMessage, bridges, cursors, transaction
from edge_broker.store.log.cursors import Passed
from edge_broker.store.log.log import LogRow

from .test_bridge_child_log import Pages, raw


def a_log(conn: sqlite3.Connection) -> Log:
    """A log with reader "r" on s/#, and 12 rows of varied sizes, every third one on a topic
    the reader does not select."""
    log = Log(())
    with transaction(conn):
        log.load(conn)
        cursors.add_reader(log, conn, "r")
        cursors.subscribe(log, conn, "r", "s/#")
    messages = [LogMessage("x/other" if i % 3 == 2 else f"s/{i % 2}", b"p" * (10 + 7 * i))
                for i in range(12)]
    with transaction(conn):
        log.append(conn, messages, 1000.0)
    return log


def passed(rows: list[LogRow]) -> Passed:
    return Passed(len(rows), sum(row.size for row in rows),
                  [x for row in rows for x in (row.offset, row.size)])


def exact(log: Log, conn: sqlite3.Connection) -> tuple[int, int]:
    """The reader's backlog by reading it all (what the counters must equal)."""
    page = cursors.read(log, conn, "r", 1000)
    return len(page.rows), sum(row.size for row in page.rows)


def test_passed_rows_leave_the_backlog_exact(db: sqlite3.Connection) -> None:
    log = a_log(db)
    rows = list(cursors.read(log, db, "r", 1000).rows)
    assert len(rows) == 8
    with transaction(db):  # two acknowledgements stored by one commit
        cursors.advance(log, db, "r", [passed(rows[:3]), passed(rows[3:5])],
                        end=rows[4].offset)
    backlog = cursors.backlog(log, "r")
    assert (backlog.count, backlog.bytes) == exact(log, db) == (
        3, sum(row.size for row in rows[5:]))


def test_rows_a_drop_skipped_meanwhile_are_not_counted_out_twice(
        db: sqlite3.Connection) -> None:
    log = a_log(db)
    rows = list(cursors.read(log, db, "r", 1000).rows)  # the process read them all
    total = sum(row.size for row in rows)
    with transaction(db):  # then the backlog bound skipped the oldest three
        dropped = cursors.drop_to_bound(log, db, "r", max_bytes=total - sum(
            row.size for row in rows[:3]))
    assert dropped.count == 3
    # The remote side acknowledges the first five: two of them were still in the backlog;
    # three were in flight when the drop skipped them (`advance` says so).
    with transaction(db):
        assert cursors.advance(log, db, "r", [passed(rows[:5])], end=rows[4].offset) == 3
    backlog = cursors.backlog(log, "r")
    assert (backlog.count, backlog.bytes) == exact(log, db) == (
        3, sum(row.size for row in rows[5:]))
    # Then one acknowledgement wholly below the cursor, of rows passed already (handed
    # again), moves nothing, and none of them is late again.
    with transaction(db):
        assert cursors.advance(log, db, "r", [passed(rows[:2])], end=rows[1].offset) == 0
    assert cursors.backlog(log, "r") == cursors.Backlog(3, sum(row.size for row in rows[5:]))


@pytest.mark.parametrize("cursor", range(0, 17))
def test_counting_out_a_batch_after_any_cursor(cursor: int) -> None:
    offsets = [2, 3, 5, 8, 9, 11, 14, 15]
    sizes = [11, 4, 9, 30, 2, 7, 5, 13]
    batch = Passed(len(offsets), sum(sizes), [x for pair in zip(offsets, sizes, strict=True)
                                              for x in pair])
    above = [size for offset, size in zip(offsets, sizes, strict=True) if offset > cursor]
    assert batch.after(cursor) == (len(above), sum(above))
    assert Passed(0, 0, []).after(cursor) == (0, 0)


async def test_the_ack_frame_carries_arrays_not_a_tuple_per_row() -> None:
    sent: list[tuple[Any, ...]] = []
    pages: Any = Pages([raw(offset) for offset in range(1, 2001)])
    reader = ChildLogReader(pages, "bridge-central", sent.append, 2000, 0)
    try:
        messages = await reader.read_after(0, 2000)
        await reader.commit_cursor(1500)
        kind, cursor, count, size, rows, held = sent[-1]
        sizes = [m.size for m in messages[:1500]]
        assert (kind, cursor, count, size, held) == ("ack", 1500, 1500, sum(sizes), 0)
        assert list(rows[0::2]) == list(range(1, 1501)) and list(rows[1::2]) == sizes
        # One array: the frame is 16 bytes a row, whatever the row count.
        assert len(frame(sent[-1])) < 16 * 1500 + 200
        await reader.commit_cursor(2000)
        assert list(sent[-1][4][0::2]) == list(range(1501, 2001))
        await reader.commit_cursor(2000)  # nothing new: nothing sent
        assert len(sent) == 2
    finally:
        reader.close()


def test_a_commit_takes_rows_in_flight_at_a_drop_out_of_dropped(
        db: sqlite3.Connection) -> None:
    """store/log/bridges.py `commit`: rows a drop skipped while they were in flight, passed
    by a cursor write afterwards, were forwarded: `Reader.dropped` (what a restart shows)
    leaves them out again; a write passing none of them changes nothing."""
    log = Log(())
    with transaction(db):
        log.load(db)
        bridges.setup_reader(log, db, "b", ["s/#"])
        log.append(db, [LogMessage(f"s/{i}", b"p" * 10) for i in range(8)], 1000.0)
    rows = list(cursors.read(log, db, "bridge:b", 1000).rows)  # all read, all sent
    with transaction(db):  # the bound skips the oldest five, three of them acknowledged later
        skipped = bridges.drop(log, db, "b", max_bytes=3 * rows[0].size)
    assert (skipped.count, skipped.after, skipped.through) == (5, 0, rows[4].offset)
    assert log.readers["bridge:b"].dropped == 5
    with transaction(db):
        bridges.commit(log, db, "b", rows[2].offset, [passed(rows[:3])])
    assert log.readers["bridge:b"].dropped == 2
    with transaction(db):  # past the drop: none of them
        bridges.commit(log, db, "b", rows[6].offset, [passed(rows[5:7])])
    reader = log.readers["bridge:b"]
    assert (reader.dropped, reader.offset, reader.backlog_count) == (2, rows[6].offset, 1)
    reloaded = Log(())
    with transaction(db):
        reloaded.load(db)
    assert reloaded.readers["bridge:b"].dropped == 2


def test_rows_in_flight_at_a_drop_come_out_of_dropped_after_a_reload(
        db: sqlite3.Connection) -> None:
    """A failed transaction reloads the log's state (store/log/bridge_store.py `_submit`):
    rows a drop skipped in flight, acknowledged after that, still come out of the store's
    count. Before (review of round 11): the reload forgot which rows no advance had passed,
    so they stayed counted as dropped (a restart showed 5 for 5 delivered)."""
    log = Log(())
    with transaction(db):
        log.load(db)
        bridges.setup_reader(log, db, "b", ["s/#"])
        log.append(db, [LogMessage(f"s/{i}", b"p" * 10) for i in range(8)], 1000.0)
    rows = list(cursors.read(log, db, "bridge:b", 1000).rows)  # all in flight
    with transaction(db):
        bridges.drop(log, db, "b", max_bytes=3 * rows[0].size)  # skips the oldest five
    with transaction(db):
        log.load(db)  # as after another transaction failed
    with transaction(db):
        bridges.commit(log, db, "b", rows[4].offset, [passed(rows[:5])])
    assert log.readers["bridge:b"].dropped == 0
