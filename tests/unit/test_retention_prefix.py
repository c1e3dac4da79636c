"""Retention of the rows readers passed, in offset order across topics (store/log/retention.py
`_delete_prefix`), and a step that ends on its budget saying so."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_broker.store.log import (
    Log,
    LogMessage,
    StreamConfig,
    cursors,
    retention_step,
    transaction,
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(str(tmp_path / "log.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    yield conn
    conn.close()


def open_log(conn: sqlite3.Connection, streams: tuple[StreamConfig, ...] = ()) -> Log:
    log = Log(streams)
    with transaction(conn):
        log.load(conn)
        cursors.add_reader(log, conn, "bridge:b")
        cursors.subscribe(log, conn, "bridge:b", "t/#")
    return log


def put_interleaved(log: Log, conn: sqlite3.Connection, rows: int, topics: int = 4) -> None:
    with transaction(conn):
        log.append(conn, [LogMessage(f"t/{n % topics}", b"x" * (10 + n % 7))
                          for n in range(rows)], 1000.0)


def step(log: Log, conn: sqlite3.Connection, budget: int) -> bool:
    with transaction(conn):
        return retention_step(log, conn, 1000.0, budget=budget).done


def offsets(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT offset FROM log ORDER BY offset")]


def check_counters(log: Log, conn: sqlite3.Connection) -> None:
    """The in-memory and stored topic counters match the rows."""
    for stats in log.by_id.values():
        count, size, first = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), min(offset) FROM log"
            " WHERE topic_id = ?", (stats.id,)).fetchone()
        assert (stats.count, stats.bytes - count * stats.name_size, stats.first_offset) == (
            count, size, first)
        assert conn.execute("SELECT count, bytes, first_offset FROM log_topics WHERE id = ?",
                            (stats.id,)).fetchone() == (stats.count, stats.bytes,
                                                        stats.first_offset)
    assert log.total_count == sum(s.count for s in log.by_id.values())
    assert log.total_bytes == sum(s.bytes for s in log.by_id.values())


def test_passed_rows_of_interleaved_topics_go_oldest_first(db: sqlite3.Connection) -> None:
    log = open_log(db)
    put_interleaved(log, db, 40)
    with transaction(db):
        cursors.advance(log, db, "bridge:b", [], end=30)
    # One step of 10 deletes offsets 1..10 of all four topics (before: the first topic's
    # ten oldest, 1, 5, 9, ..., 37, the same pages rewritten once per topic).
    assert not step(log, db, 10)
    assert offsets(db) == list(range(11, 41))
    check_counters(log, db)
    while not step(log, db, 10):
        pass
    assert offsets(db) == list(range(31, 41))
    check_counters(log, db)


def test_the_prefix_stops_below_a_row_in_flight_and_a_last_value_floor(
        db: sqlite3.Connection) -> None:
    log = open_log(db)
    put_interleaved(log, db, 8)  # before the stream: t/3's 4 and 8 are not in it
    log = Log((StreamConfig("lv", "t/3", None, 10**6, last_value=True),))
    with transaction(db):
        log.load(db)  # a stream new in the configuration starts at the next offset
    lv_first = log.streams["lv"].first_offset
    put_interleaved(log, db, 8)  # t/3 at 12 and 16: the stream holds them, keeps 16
    with transaction(db):
        # A session that unsubscribed with t/1's offset 6 still in flight.
        cursors.add_reader(log, db, "s:x")
        cursors.subscribe(log, db, "s:x", "t/1", since=0)
        cursors.set_inflight(log, db, "s:x", 1, 6, 0)
        cursors.unsubscribe(log, db, "s:x", "t/1")
        cursors.advance(log, db, "bridge:b", [], end=16)
    assert lv_first == 9
    assert (log.streams["lv"].count, log.streams["lv"].bytes) == (2, 3 + 13 + 3 + 10)
    while not step(log, db, 3):
        pass
    # t/1's rows stop below 6; the others go, t/3 down to its newest (16, in the stream).
    assert offsets(db) == [6, 10, 14, 16]
    assert (log.streams["lv"].count, log.streams["lv"].bytes) == (1, 3 + 10)
    check_counters(log, db)
    with transaction(db):
        cursors.clear_inflight(log, db, "s:x", 1)
    while not step(log, db, 3):
        pass
    assert offsets(db) == [16]
    check_counters(log, db)


def test_a_step_whose_budget_ends_on_the_last_topic_is_not_done(
        db: sqlite3.Connection) -> None:
    log = open_log(db, (StreamConfig("keep", "t/0", None, 10**6),))
    put_interleaved(log, db, 8, topics=2)  # t/0 held by the stream, t/1 passed
    with transaction(db):
        cursors.advance(log, db, "bridge:b", [], end=8)
    # The prefix cannot go past t/0's held rows; t/1's 4 rows go topic by topic, two per
    # step: the first step spends its budget on them and must ask for another.
    assert not step(log, db, 2)
    assert offsets(db) == [1, 3, 5, 6, 7, 8]
    while not step(log, db, 2):
        pass
    assert offsets(db) == [1, 3, 5, 7]
    check_counters(log, db)
