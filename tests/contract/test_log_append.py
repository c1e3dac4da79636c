"""The log (edge_broker.store.log): append, paged reads with filters and since, counters,
offsets, time lookups, reopening the file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.topics import topic_matches
from edge_broker.store.log import (
    Log,
    LogMessage,
    Page,
    StreamConfig,
    cursors,
    retention_step,
    transaction,
)


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def open_log(conn: sqlite3.Connection, streams: Sequence[StreamConfig] = ()) -> Log:
    log = Log(streams)
    with transaction(conn):
        log.load(conn)
    return log


def append(log: Log, conn: sqlite3.Connection, messages: Sequence[LogMessage],
           now: float = 1000.0) -> list[int]:
    with transaction(conn):
        return log.append(conn, messages, now)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(tmp_path / "log.db")
    yield conn
    conn.close()


def msg(topic: str, n: int = 0, size: int = 100) -> LogMessage:
    return LogMessage(topic, n.to_bytes(4, "big") * (size // 4))


def all_rows(log: Log, conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(o, log.by_id[t].name) for o, t in
            conn.execute("SELECT offset, topic_id FROM log ORDER BY offset")]


def test_offsets_start_at_1_and_rows_read_back_as_appended(db: sqlite3.Connection) -> None:
    log = open_log(db)
    props = Properties(content_type="text/plain", correlation_data=b"\x00\x01",
                       user_properties=(("k", "v"), ("k", "w")), payload_format_indicator=1)
    sent = [LogMessage("a/b", b"one", 1, True, props, 5000.0, "dev-1"),
            LogMessage("a/c", b"", 0, False, origin=""),
            LogMessage("a/b", b"\xff" * 300, 2)]
    assert append(log, db, sent, now=1234.5) == [1, 2, 3]
    page = log.read_page(db, 0, log.selection({"#": 0}), 10)
    assert [(r.offset, r.at, r.topic, r.payload, r.qos, r.retain, r.properties, r.origin,
             r.expires_at) for r in page.rows] == [
        (1, 1234.5, "a/b", b"one", 1, True, props, "dev-1", 5000.0),
        (2, 1234.5, "a/c", b"", 0, False, Properties(), "", None),
        (3, 1234.5, "a/b", b"\xff" * 300, 2, False, Properties(), "", None)]
    assert page.end == 3
    assert append(log, db, [msg("a/b")]) == [4]


def test_at_never_decreases_when_the_clock_steps_back(db: sqlite3.Connection) -> None:
    log = open_log(db)
    append(log, db, [msg("t")], now=100.0)
    append(log, db, [msg("t")], now=50.0)  # NTP stepped the clock back
    append(log, db, [msg("t")], now=200.0)
    assert [r[0] for r in db.execute("SELECT at FROM log ORDER BY offset")] == [100, 100, 200]


@pytest.mark.parametrize("filters", [["t/7"], ["t/1", "t/2"], ["t/+"], ["#"], ["x/#"],
                                     ["t/7", "#"], ["+/+"], ["$SYS/#"]])
@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_pages_return_exactly_the_matching_rows_in_order(
        db: sqlite3.Connection, filters: list[str], limit: int) -> None:
    """Both read plans (index ranges for narrow filters, a scan for broad ones), paged."""
    log = open_log(db)
    topics = [f"t/{i}" for i in range(20)] + ["x/y", "$SYS/load"]
    for batch in range(10):
        append(log, db, [msg(topics[(batch * 7 + i * i) % len(topics)], i)
                         for i in range(60)], now=1000.0 + batch)
    expected = [(o, name) for o, name in all_rows(log, db)
                if any(topic_matches(f, name) for f in filters)]
    selection = log.selection(dict.fromkeys(filters, 0))
    got: list[tuple[int, str]] = []
    after = 0
    while True:
        page = log.read_page(db, after, selection, limit)
        assert len(page.rows) <= limit
        got += [(r.offset, r.topic) for r in page.rows]
        if page.end == after:
            break
        after = page.end
    assert got == expected


def test_since_hides_what_was_appended_before_the_subscription(db: sqlite3.Connection) -> None:
    log = open_log(db)
    with transaction(db):
        cursors.add_reader(log, db, "r")
        cursors.subscribe(log, db, "r", "a/#")
    append(log, db, [msg("a/1"), msg("b/1")])  # 1, 2
    with transaction(db):
        assert cursors.subscribe(log, db, "r", "b/#") == 2  # made after offset 2
        assert cursors.subscribe(log, db, "r", "a/#") == 0  # repeated: keeps its since
    append(log, db, [msg("a/1"), msg("b/1")])  # 3, 4
    page = cursors.read(log, db, "r", 100)
    assert [(r.offset, r.topic) for r in page.rows] == [(1, "a/1"), (3, "a/1"), (4, "b/1")]
    # A topic matched by two filters uses the lower since: "b/#" (2) and "+/1" (4).
    with transaction(db):
        cursors.subscribe(log, db, "r", "+/1")
    append(log, db, [msg("b/1")])  # 5
    assert [r.offset for r in cursors.read(log, db, "r", 100).rows] == [1, 3, 4, 5]


def test_a_new_topic_is_matched_against_existing_filters(db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "new/+")])
    with transaction(db):
        cursors.add_reader(log, db, "r")
        cursors.subscribe(log, db, "r", "new/#")
    append(log, db, [msg("new/topic"), msg("other")])
    assert [r.topic for r in cursors.read(log, db, "r", 10).rows] == ["new/topic"]
    assert log.streams["s"].count == 1
    assert log.streams_of("new/topic") == ["s"] and log.streams_of("new/never") == ["s"]
    assert log.streams_of("other") == []


def brute_counters(log: Log, conn: sqlite3.Connection) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for name, count, size, first, last in conn.execute(
            "SELECT t.name, count(*), sum(length(l.payload) + coalesce(length(l.properties), 0)"
            " + length(CAST(t.name AS BLOB))), min(l.offset), max(l.offset)"
            " FROM log l JOIN log_topics t ON t.id = l.topic_id GROUP BY t.name"):
        out[name] = (count, size, first, last)
    return out


def test_topic_counters_match_the_rows_after_appends_and_deletes(
        db: sqlite3.Connection) -> None:
    log = open_log(db, [StreamConfig("s", "#", None, 5000)])
    props = Properties(user_properties=(("unit", "C"),))
    for i in range(20):
        append(log, db, [LogMessage(f"t/{i % 3}", b"p" * i, properties=props),
                         msg(f"u/{i % 2}", i, 40)], now=float(i))
    with transaction(db):
        retention_step(log, db, 100.0)
    counters = {s.name: (s.count, s.bytes, s.first_offset, s.last_offset)
                for s in log.by_id.values() if s.count}
    assert counters == brute_counters(log, db)
    assert log.total_count == sum(c[0] for c in counters.values())
    assert sum(c[1] for c in counters.values()) == log.total_bytes
    # and the file has the same counters
    assert open_log(db, log.stream_configs).by_id == log.by_id


def test_reopening_the_file_keeps_everything(tmp_path: Path) -> None:
    streams = [StreamConfig("s", "a/#", 3600, None), StreamConfig("lv", "b/+", None, 10**6,
                                                                  True)]
    conn = connect(tmp_path / "x.db")
    log = open_log(conn, streams)
    with transaction(conn):
        cursors.add_reader(log, conn, "r")
        cursors.subscribe(log, conn, "r", "a/+")
    append(log, conn, [msg("a/1", i) for i in range(5)] + [msg("b/1"), msg("b/2")], now=50.0)
    with transaction(conn):
        page = cursors.read(log, conn, "r", 2)
        cursors.advance(log, conn, "r", page.rows)
        cursors.set_inflight(log, conn, "r", 7, 2, 1)
    conn.close()
    conn = connect(tmp_path / "x.db")
    again = open_log(conn, streams)
    assert (again.last_offset, again.last_at) == (7, 50.0)
    assert again.by_id == log.by_id and again.topics == log.topics
    for name in ("s", "lv"):
        a, b = again.streams[name], log.streams[name]
        assert (a.first_offset, a.first_at, a.count, a.bytes, a.topics) == (
            b.first_offset, b.first_at, b.count, b.bytes, b.topics)
    reader = again.readers["r"]
    assert (reader.offset, reader.filters, reader.inflight, reader.topics,
            reader.backlog_count, reader.backlog_bytes) == (
        2, {"a/+": 0}, {7: (2, 1)}, log.readers["r"].topics, 3, 3 * 103)
    assert [r.offset for r in cursors.read(again, conn, "r", 10).rows] == [3, 4, 5]
    assert append(again, conn, [msg("a/1")]) == [8]
    conn.close()


def test_offsets_are_never_reused_after_the_tail_is_deleted(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db")
    log = open_log(conn)
    with transaction(conn):
        cursors.add_reader(log, conn, "r")
        cursors.subscribe(log, conn, "r", "#")
    append(log, conn, [msg("a") for _ in range(5)])
    with transaction(conn):
        cursors.remove_reader(log, conn, "r")  # nobody holds the rows any more
        report = retention_step(log, conn, 2000.0)
    assert report.rows_deleted == 5
    assert conn.execute("SELECT count(*) FROM log").fetchone() == (0,)
    conn.close()
    conn = connect(tmp_path / "x.db")
    log = open_log(conn)
    assert append(log, conn, [msg("a")]) == [6]
    conn.close()


def test_first_offset_at_a_time_skips_gaps(db: sqlite3.Connection) -> None:
    log = open_log(db)
    with transaction(db):
        cursors.add_reader(log, db, "r")
        cursors.subscribe(log, db, "r", "keep")
    for second in range(100):
        append(log, db, [msg("keep"), msg("drop")], now=1000.0 + second)
    with transaction(db):
        retention_step(log, db, 0.0)  # deletes every "drop" row: gaps at even offsets
    assert log.first_offset_at(db, 0.0) == 1
    assert log.first_offset_at(db, 1000.0) == 1
    assert log.first_offset_at(db, 1000.5) == 3
    assert log.first_offset_at(db, 1050.0) == 101
    assert log.first_offset_at(db, 1099.0) == 199
    assert log.first_offset_at(db, 1099.5) == 201  # after the last: the next offset


def test_an_empty_log_reads_nothing(db: sqlite3.Connection) -> None:
    log = open_log(db)
    assert log.read_page(db, 0, log.selection({"#": 0}), 10).rows == []
    assert log.first_offset_at(db, 5.0) == 1
    assert append(log, db, []) == []


def test_a_narrow_reader_reads_index_ranges_and_a_broad_one_scans(
        db: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan that keeps a reader with narrow filters off everyone else's traffic."""
    log = open_log(db)
    append(log, db, [msg(f"t/{i % 50}", i) for i in range(1000)])

    def forbidden(*args: object) -> None:
        raise AssertionError("wrong read plan")

    monkeypatch.setattr(Log, "_scan", forbidden)
    page = log.read_page(db, 0, log.selection({"t/3": 0, "t/4": 0}), 100)
    assert [r.offset for r in page.rows] == [o for o in range(1, 1001) if (o - 1) % 50 in (3, 4)]
    monkeypatch.undo()
    monkeypatch.setattr(Log, "_ranges", forbidden)
    assert len(log.read_page(db, 0, log.selection({"#": 0}), 2000).rows) == 1000
    assert len(log.read_page(db, 0, log.selection({"t/+": 0}), 5).rows) == 5
    plan = " ".join(str(r) for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT offset, payload FROM log WHERE topic_id IN (1, 2)"
        " AND offset > 5 AND offset <= 500 ORDER BY offset"))
    assert "log_by_topic" in plan


def test_a_page_of_nothing_does_not_move_the_reader(db: sqlite3.Connection) -> None:
    log = open_log(db)
    append(log, db, [msg("a"), msg("b")])
    assert log.read_page(db, 0, log.selection({"a": 0}), 0) == Page([], 0)
    assert log.read_page(db, 0, log.selection({"zzz": 0}), 5) == Page([], 2)  # none selected
    assert log.read_page(db, 5, log.selection({"a": 0}), 5) == Page([], 5)
