"""The log's cursors, streams, retention by age and size, compaction, the trusted clock and
replay positions (edge_broker.store.log)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_broker.errors import StoreError
from edge_broker.store.log import (
    Log,
    LogMessage,
    StreamConfig,
    TrustedClock,
    cursors,
    retention_due,
    retention_step,
    transaction,
)
from edge_broker.store.log.replay import (
    StreamStats,
    open_read_only,
    parse_position,
    read_streams,
    replay,
    stream_start,
    stream_stats,
)


def open_log(conn: sqlite3.Connection, streams: Sequence[StreamConfig] = ()) -> Log:
    log = Log(streams)
    with transaction(conn):
        log.load(conn)
    return log


def put(log: Log, conn: sqlite3.Connection, topic: str, count: int = 1, now: float = 1000.0,
        size: int = 97) -> list[int]:
    with transaction(conn):
        return log.append(conn, [LogMessage(topic, b"x" * size) for _ in range(count)], now)


def retain(log: Log, conn: sqlite3.Connection, now: float, budget: int = 2000) -> None:
    while True:
        with transaction(conn):
            if retention_step(log, conn, now, budget=budget).done:
                return


def offsets(conn: sqlite3.Connection, topic: str | None = None) -> list[int]:
    if topic is None:
        return [r[0] for r in conn.execute("SELECT offset FROM log ORDER BY offset")]
    return [r[0] for r in conn.execute(
        "SELECT l.offset FROM log l JOIN log_topics t ON t.id = l.topic_id"
        " WHERE t.name = ? ORDER BY l.offset", (topic,))]


def reader(log: Log, conn: sqlite3.Connection, name: str, *filters: str) -> None:
    with transaction(conn):
        cursors.add_reader(log, conn, name)
        for topic_filter in filters:
            cursors.subscribe(log, conn, name, topic_filter)


# -- streams: age, size, compaction ------------------------------------------------------


def test_retention_by_age_deletes_the_oldest_first(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "a/#", max_age_s=60, max_bytes=None)])
    for minute in range(5):
        put(log, db, "a/1", 2, now=1000.0 + 60 * minute)  # offsets 1-2 at 1000, 3-4 at 1060...
    retain(log, db, now=1000.0 + 60 * 3 + 30)  # keeps rows of the last 60 s: 1150 on
    assert offsets(db) == [7, 8, 9, 10]
    stats = stream_stats(log, db, "s")
    assert (stats.first_offset, stats.last_offset, stats.count, stats.oldest_at) == (
        7, 10, 4, 1180.0)
    assert stats.bytes == 4 * 100


def test_retention_by_size_keeps_at_most_max_bytes(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "#", max_age_s=None, max_bytes=1000)])
    put(log, db, "abc", 25)  # 100 bytes each: 3 of topic + 97 of payload
    assert retention_due(log, 1000.0)
    retain(log, db, now=1000.0, budget=7)  # in several small steps
    assert offsets(db) == list(range(16, 26))
    assert (log.streams["s"].count, log.streams["s"].bytes) == (10, 1000)
    assert not retention_due(log, 1000.0)


def test_a_message_in_two_streams_stays_until_both_let_go(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("short", "a/#", 10, None),
                        StreamConfig("long", "a/1", 1000, None)])
    put(log, db, "a/1", now=100.0)
    put(log, db, "a/2", now=100.0)
    retain(log, db, now=200.0)
    assert offsets(db) == [1]  # a/2 only in "short"; a/1 still in "long"
    assert stream_stats(log, db, "short").count == 0
    assert stream_stats(log, db, "long").first_offset == 1


def test_last_value_keeps_only_the_newest_row_per_topic(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("lv", "dev/+/state", None, 10**6, last_value=True)])
    for _ in range(3):
        put(log, db, "dev/1/state")
        put(log, db, "dev/2/state")
    retain(log, db, now=1000.0)
    assert offsets(db) == [5, 6]
    assert (log.streams["lv"].count, log.streams["lv"].bytes) == (2, 2 * (11 + 97))


def test_last_value_topics_also_in_a_plain_stream_are_not_compacted(
        db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("lv", "dev/#", None, 10**6, last_value=True),
                        StreamConfig("all", "dev/1", None, 10**6)])
    put(log, db, "dev/1", 3)
    put(log, db, "dev/2", 3)
    retain(log, db, now=1000.0)
    assert offsets(db) == [1, 2, 3, 6]


def test_a_stream_that_matches_nothing(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("none", "nothing/#")])
    put(log, db, "other", 3)  # nobody holds these
    retain(log, db, now=1000.0)
    stats = stream_stats(log, db, "none")
    assert (stats.first_offset, stats.last_offset, stats.count, stats.bytes,
            stats.oldest_at) == (None, None, 0, 0, None)
    assert stream_start(log, db, "none", "earliest") == 4
    assert stream_start(log, db, "none", "latest") == 4
    assert offsets(db) == []


def test_a_stream_added_later_starts_at_the_next_offset_and_a_removed_one_lets_go(
        db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("a", "a")])
    put(log, db, "a", 2)
    put(log, db, "b", 2)
    log = open_log(db, [StreamConfig("a", "a"), StreamConfig("b", "b")])
    assert log.streams["b"].first_offset == 5
    put(log, db, "b", 1)
    retain(log, db, now=1000.0)
    assert offsets(db) == [1, 2, 5]
    log = open_log(db, [StreamConfig("b", "b")])  # "a" no longer configured
    retain(log, db, now=1000.0)
    assert offsets(db) == [5]


def test_a_changed_filter_recounts_the_stream(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "#")])
    put(log, db, "a", 2)
    put(log, db, "b", 3)
    log = open_log(db, [StreamConfig("s", "b")])
    assert (log.streams["s"].count, log.streams["s"].bytes) == (3, 3 * 98)


# -- readers and retention -----------------------------------------------------------------


def test_retention_never_deletes_what_a_reader_still_needs(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "#", max_age_s=10, max_bytes=None)])
    reader(log, db, "r", "a")
    put(log, db, "a", 4, now=100.0)
    put(log, db, "b", 4, now=100.0)
    with transaction(db):
        page = cursors.read(log, db, "r", 2)
        cursors.advance(log, db, "r", page.rows)  # done up to offset 2
        cursors.set_inflight(log, db, "r", 1, 2, 1)  # ... but 2 is in flight
    retain(log, db, now=1000.0)
    assert offsets(db) == [2, 3, 4]
    with transaction(db):
        assert cursors.clear_inflight(log, db, "r", 1)
    retain(log, db, now=1000.0)
    assert offsets(db) == [3, 4]
    assert stream_stats(log, db, "s").count == 0  # the stream let go of all of them


def test_backlog_counters_follow_appends_advances_and_filters(db: sqlite3.Connection) -> None:
    log = open_log(db)
    reader(log, db, "r", "a/+")
    put(log, db, "a/1", 3)
    put(log, db, "b/1", 2)
    assert cursors.backlog(log, "r") == cursors.Backlog(3, 3 * 100)
    with transaction(db):
        cursors.subscribe(log, db, "r", "b/#")  # new filter: nothing older
    assert cursors.backlog(log, "r") == cursors.Backlog(3, 300)
    put(log, db, "b/1", 1)
    assert cursors.backlog(log, "r") == cursors.Backlog(4, 400)
    with transaction(db):
        cursors.subscribe(log, db, "r", "b/#", since=0)  # a replay of b/# from the start
    assert cursors.backlog(log, "r") == cursors.Backlog(6, 600)
    with transaction(db):
        page = cursors.read(log, db, "r", 4)
        cursors.advance(log, db, "r", page.rows)
    assert cursors.backlog(log, "r") == cursors.Backlog(2, 200)
    with transaction(db):
        cursors.unsubscribe(log, db, "r", "b/#")
    assert cursors.backlog(log, "r") == cursors.Backlog(0, 0)
    assert [r.offset for r in cursors.read(log, db, "r", 10).rows] == []


def test_drop_to_bound_moves_the_cursor_and_counts(db: sqlite3.Connection) -> None:
    log = open_log(db)
    reader(log, db, "r", "#")
    put(log, db, "abc", 10)
    with transaction(db):
        dropped = cursors.drop_to_bound(log, db, "r", max_count=4)
    assert dropped == cursors.Backlog(6, 600)
    assert (log.readers["r"].offset, log.readers["r"].dropped) == (6, 6)
    assert [r.offset for r in cursors.read(log, db, "r", 10).rows] == [7, 8, 9, 10]
    with transaction(db):
        assert cursors.drop_to_bound(log, db, "r", max_bytes=250) == cursors.Backlog(2, 200)
    retain(log, db, now=1000.0)
    assert offsets(db) == [9, 10]


def test_removing_a_reader_releases_its_rows(db: sqlite3.Connection) -> None:
    log = open_log(db)
    reader(log, db, "r", "#")
    put(log, db, "t", 3)
    with transaction(db):
        assert cursors.remove_reader(log, db, "r")
        assert not cursors.remove_reader(log, db, "r")
    retain(log, db, now=1000.0)
    assert offsets(db) == []
    assert open_log(db).readers == {}


# -- clock ----------------------------------------------------------------------------------


class FakeClocks:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 50.0

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_a_clock_stepped_forward_does_not_age_the_log(db: sqlite3.Connection) -> None:
    clocks = FakeClocks()
    clock = TrustedClock(lambda: clocks.wall, lambda: clocks.mono)
    log = open_log(db, [StreamConfig("s", "#", max_age_s=3600, max_bytes=None)])
    put(log, db, "t", 5, now=clocks.wall)
    clocks.tick(600)
    clocks.wall += 30 * 86400  # NTP: a month forward at once
    assert clock.now() == 1_000_600.0
    retain(log, db, now=clock.now())
    assert offsets(db) == [1, 2, 3, 4, 5]
    put(log, db, "t", 1, now=clocks.wall)  # stamped with the new wall time
    clocks.tick(3600)  # an hour of real time later the old rows are due
    retain(log, db, now=clock.now())
    assert offsets(db) == [6]


def test_a_clock_stepped_back_deletes_nothing_early(db: sqlite3.Connection) -> None:
    clocks = FakeClocks()
    clock = TrustedClock(lambda: clocks.wall, lambda: clocks.mono)
    log = open_log(db, [StreamConfig("s", "#", max_age_s=3600, max_bytes=None)])
    put(log, db, "t", 1, now=clocks.wall)
    clocks.tick(1800)
    clocks.wall -= 7200  # stepped back two hours
    put(log, db, "t", 1, now=clocks.wall)
    assert [r[0] for r in db.execute("SELECT at FROM log")] == [1_000_000.0, 1_000_000.0]
    clocks.tick(3000)  # 4800 s of real time since the first row, but the wall says 2800 s
    retain(log, db, now=clock.now())
    assert offsets(db) == [1, 2]


# -- replay positions ----------------------------------------------------------------------


def test_replay_positions(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "a/#", max_age_s=None, max_bytes=300)])
    for second in range(6):
        put(log, db, "a/1", now=1000.0 + second)  # 1, 3, 5, 7, 9, 11
        put(log, db, "b/1", now=1000.0 + second)
    reader(log, db, "keep-b", "b/#")
    retain(log, db, now=2000.0)  # the stream keeps 3 rows of 100 bytes: 7, 9, 11
    assert stream_stats(log, db, "s").first_offset == 7
    assert stream_start(log, db, "s", "earliest") == 7
    assert stream_start(log, db, "s", "latest") == 13
    assert stream_start(log, db, "s", 2) == 7  # below the first: starts at the first
    assert stream_start(log, db, "s", 8) == 9  # in a gap: the next of the stream
    assert stream_start(log, db, "s", 11) == 11
    assert stream_start(log, db, "s", 12) == 13  # past its last: waits
    assert stream_start(log, db, "s", 50) == 50
    assert stream_start(log, db, "s", 1004.0) == 9  # a time: first at or after it
    assert stream_start(log, db, "s", 999.0) == 7
    assert stream_start(log, db, "s", 1e10) == 13


def test_parse_position() -> None:
    assert parse_position("earliest") == "earliest"
    assert parse_position("latest") == "latest"
    assert parse_position("42") == 42
    assert parse_position("2026-12-01T08:00:00Z") == 1796112000.0
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_position("yesterday")


def test_a_row_in_flight_stays_after_its_reader_unsubscribed(db: sqlite3.Connection) -> None:
    """[MQTT-3.10.4-3] (5.0): what is in flight is completed after an UNSUBSCRIBE."""
    log = open_log(db)
    reader(log, db, "r", "a")
    put(log, db, "a", 2)
    with transaction(db):
        page = cursors.read(log, db, "r", 1)
        cursors.advance(log, db, "r", page.rows)
        cursors.set_inflight(log, db, "r", 9, page.rows[0].offset, 2)
        cursors.unsubscribe(log, db, "r", "a")
    retain(log, db, now=1000.0)
    assert offsets(db) == [1, 2]  # deletion of the topic stops at the row in flight
    with transaction(db):
        cursors.clear_inflight(log, db, "r", 9)
    retain(log, db, now=1000.0)
    assert offsets(db) == []


def test_stream_stats_ignore_rows_other_holders_keep_below_its_floor(
        db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "#", max_age_s=None, max_bytes=100)])
    reader(log, db, "r", "old")
    put(log, db, "old", 1)
    put(log, db, "new", 1, size=96)  # "new" + 96 = 99 bytes; "old" (100) no longer fits
    retain(log, db, now=1000.0)
    assert offsets(db) == [1, 2]  # the reader keeps 1
    stats = stream_stats(log, db, "s")
    assert (stats.first_offset, stats.last_offset, stats.count, stats.bytes) == (2, 2, 1, 99)
    put(log, db, "old", 1, size=0)
    stats = stream_stats(log, db, "s")
    assert (stats.first_offset, stats.last_offset, stats.count) == (2, 3, 2)


def test_load_after_a_rolled_back_group_matches_the_file(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "#")])
    reader(log, db, "r", "#")
    put(log, db, "a", 2)
    db.execute("BEGIN IMMEDIATE")
    log.append(db, [LogMessage("new/topic", b"x")], 1000.0)
    db.rollback()  # e.g. SQLITE_FULL at commit: the caller reloads
    with transaction(db):
        log.load(db)
    assert (log.last_offset, set(log.topics), log.streams["s"].count,
            cursors.backlog(log, "r")) == (2, {"a"}, 2, cursors.Backlog(2, 196))
    assert put(log, db, "b", 1) == [3]


def test_replay_a_stream_with_a_topic_filter_and_a_limit(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "a/#")])
    for _ in range(3):
        put(log, db, "a/1")
        put(log, db, "a/2")
        put(log, db, "b")
    assert [r.offset for r in replay(log, db, "s", 1)] == [1, 2, 4, 5, 7, 8]
    assert [r.offset for r in replay(log, db, "s", 3, "a/2")] == [5, 8]
    assert [r.offset for r in replay(log, db, "s", 2, limit=3, page_size=2)] == [2, 4, 5]
    assert list(replay(log, db, "s", stream_start(log, db, "s", "latest"))) == []


def test_streams_read_only_from_the_file_while_a_writer_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    writer = sqlite3.connect(str(path), isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    log = open_log(writer, [StreamConfig("b", "b/#"), StreamConfig("a", "a/#")])
    put(log, writer, "a/x", 2, now=1000.0)
    writer.execute("BEGIN IMMEDIATE")  # the broker in the middle of a group
    log.append(writer, [LogMessage("a/x", b"uncommitted")], 1001.0)
    assert read_streams(path) == [StreamStats("a", 1, 2, 2, 2 * 100, 1000.0),
                                  StreamStats("b", None, None, 0, 0, None)]
    opened = open_read_only(path)
    assert opened is not None
    ro_log, ro = opened
    assert [r.payload for r in replay(ro_log, ro, "a", 1)] == [b"x" * 97] * 2
    ro.close()
    writer.rollback()
    writer.close()
    empty = tmp_path / "empty.db"
    sqlite3.connect(str(empty)).close()
    assert read_streams(empty) == []
    with pytest.raises(StoreError, match="no such store file"):
        read_streams(tmp_path / "missing.db")

# -- rows readers passed: oldest first across topics (retention.py `_delete_prefix`) -------


def bridge_log(conn: sqlite3.Connection, streams: Sequence[StreamConfig] = ()) -> Log:
    log = open_log(conn, streams)
    reader(log, conn, "bridge:b", "t/#")
    return log


def put_interleaved(log: Log, conn: sqlite3.Connection, rows: int, topics: int = 4) -> None:
    with transaction(conn):
        log.append(conn, [LogMessage(f"t/{n % topics}", b"x" * (10 + n % 7))
                          for n in range(rows)], 1000.0)


def step(log: Log, conn: sqlite3.Connection, budget: int) -> bool:
    with transaction(conn):
        return retention_step(log, conn, 1000.0, budget=budget).done


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
    log = bridge_log(db)
    put_interleaved(log, db, 400)
    with transaction(db):
        cursors.advance(log, db, "bridge:b", [], end=300)
    # One step of 100 deletes offsets 1..100 of all four topics (before: the first topic's
    # 75 rows up to 297, then 25 of the second: the same pages rewritten once per topic).
    assert not step(log, db, 100)
    assert offsets(db) == list(range(101, 401))
    check_counters(log, db)
    while not step(log, db, 100):
        pass
    assert offsets(db) == list(range(301, 401))
    check_counters(log, db)


def test_with_many_topics_per_step_the_rows_go_topic_by_topic(db: sqlite3.Connection) -> None:
    log = bridge_log(db)
    put_interleaved(log, db, 400, topics=8)
    with transaction(db):
        cursors.advance(log, db, "bridge:b", [], end=300)
    # 8 topics share a step of 40 rows: fewer than PREFIX_ROWS_PER_TOPIC (16) each, so
    # topic by topic (two statements per topic and step would cost more than the pages).
    assert not step(log, db, 40)
    assert set(range(1, 401)) - set(offsets(db)) == {1 + 8 * k for k in range(38)} | {2, 10}
    check_counters(log, db)
    while not step(log, db, 40):
        pass
    assert offsets(db) == list(range(301, 401))
    check_counters(log, db)


def test_the_prefix_stops_below_a_row_in_flight_and_a_last_value_floor(
        db: sqlite3.Connection) -> None:
    log = bridge_log(db)
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
    log = bridge_log(db, (StreamConfig("keep", "t/0", None, 10**6),))
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
