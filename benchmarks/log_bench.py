"""Micro benchmark of the append-only log alone (edge_broker.store.log), not a test.

    python -m benchmarks.log_bench                        # 1,000,000 messages, groups 64/256/512
    python -m benchmarks.log_bench --messages 200000 --groups 256 --layouts

Ingest: 100-byte messages on `--topics` topics (sensors/<i>/temp), appended in groups of
`--groups` messages per transaction (as the group commit makes them) with
`synchronous=FULL` in WAL mode (durability "fsync": one fsync per group), into a log with
`--readers` offline readers subscribed to `sensors/#` (persistent sessions as cursors) and
one `sensors/#` stream. Reports messages/s and bytes on disk per message (pages in use after
a checkpoint, divided by the rows).

The CPU time per message (this process, user + system) is given beside the rate: on a
shared machine the rate is noisy, the CPU cost much less so.

Read: replay of the whole log by one reader, in pages of 256 rows decoded to LogRow, with a
narrow filter (one topic of `--topics`) and with `#`. Retention: a stream bound that releases
half the log, deleted in steps of 2,000 rows, one transaction each. Start-up: `Log.load`
on a file with 1,000 readers of 2 filters each over 1,000 topics.

`--layouts` also compares table layouts with plain SQL (multi-row inserts of the same rows):
the log's (rowid + index on (topic_id, offset)), rowid without the index, and WITHOUT ROWID
clustered on (topic_id, offset) with a unique index on offset.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_broker.store.log import (
    Log,
    LogMessage,
    StreamConfig,
    cursors,
    retention_step,
    transaction,
)

PAYLOAD = bytes(range(100))
PRAGMAS = ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL",
           "PRAGMA cache_size = -8192", "PRAGMA wal_autocheckpoint = 512",
           "PRAGMA temp_store = MEMORY")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def used_bytes(conn: sqlite3.Connection) -> int:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages, free, size = conn.execute(
        "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
    ).fetchone()
    return int((pages - free) * size)


def ingest(path: Path, messages: int, group: int, topics: int, readers: int,
           stream_bytes: int) -> tuple[float, float, float, Log, sqlite3.Connection]:
    conn = connect(path)
    log = Log([StreamConfig("telemetry", "sensors/#", None, stream_bytes)])
    with transaction(conn):
        log.load(conn)
        for k in range(readers):
            cursors.add_reader(log, conn, f"session-{k}")
            cursors.subscribe(log, conn, f"session-{k}", "sensors/#")
    names = [f"sensors/{i}/temp" for i in range(topics)]
    batches = [[LogMessage(names[(start + i) % topics], PAYLOAD, 1, origin="publisher-1")
                for i in range(min(group, messages - start))]
               for start in range(0, messages, group)]
    now = time.time()
    started = time.perf_counter()
    cpu = time.process_time()
    for batch in batches:
        with transaction(conn):
            log.append(conn, batch, now)
    elapsed = time.perf_counter() - started
    cpu_us = (time.process_time() - cpu) * 1e6 / messages
    return messages / elapsed, used_bytes(conn) / messages, cpu_us, log, conn


def replay(log: Log, conn: sqlite3.Connection, filters: dict[str, int]) -> tuple[int, float]:
    selection = log.selection(filters)
    started = time.perf_counter()
    count, after = 0, 0
    while True:
        page = log.read_page(conn, after, selection, 256)
        count += len(page.rows)
        if page.end == after:
            break
        after = page.end
    return count, count / (time.perf_counter() - started)


def retention(log: Log, conn: sqlite3.Connection) -> tuple[int, float]:
    state = log.streams["telemetry"]
    log.stream_configs = (StreamConfig("telemetry", "sensors/#", None, state.bytes // 2),)
    with transaction(conn):
        log.load(conn)
        for name in list(log.readers):
            cursors.remove_reader(log, conn, name)
    started = time.perf_counter()
    deleted = 0
    while True:
        with transaction(conn):
            report = retention_step(log, conn, time.time())
        deleted += report.rows_deleted
        if report.done:
            break
    return deleted, deleted / (time.perf_counter() - started)


def startup(path: Path, readers: int, topics: int) -> float:
    """Seconds for Log.load on a file with `readers` readers of 2 filters each and `topics`
    topics (what start-up reads instead of the queued messages)."""
    conn = connect(path)
    log = Log([StreamConfig("telemetry", "site/#")])
    with transaction(conn):
        log.load(conn)
        log.append(conn, [LogMessage(f"site/gw/{i}/temp", PAYLOAD) for i in range(topics)],
                   time.time())
        for k in range(readers):
            cursors.add_reader(log, conn, f"session-{k}")
            cursors.subscribe(log, conn, f"session-{k}", f"site/gw/{k}/+")
            cursors.subscribe(log, conn, f"session-{k}", f"cmd/{k}/#")
    conn.close()
    conn = connect(path)
    started = time.perf_counter()
    with transaction(conn):
        Log(log.stream_configs).load(conn)
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


LAYOUTS = {
    "rowid + index (topic_id, offset) [the log's]": (
        "CREATE TABLE log (offset INTEGER PRIMARY KEY, at REAL NOT NULL, topic_id INTEGER "
        "NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, payload BLOB NOT NULL, "
        "properties BLOB, origin TEXT NOT NULL, expires_at REAL)",
        "CREATE INDEX log_by_topic ON log (topic_id, offset)"),
    "rowid, no index": (
        "CREATE TABLE log (offset INTEGER PRIMARY KEY, at REAL NOT NULL, topic_id INTEGER "
        "NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, payload BLOB NOT NULL, "
        "properties BLOB, origin TEXT NOT NULL, expires_at REAL)",),
    "WITHOUT ROWID (topic_id, offset) + index (offset)": (
        "CREATE TABLE log (offset INTEGER NOT NULL, at REAL NOT NULL, topic_id INTEGER "
        "NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, payload BLOB NOT NULL, "
        "properties BLOB, origin TEXT NOT NULL, expires_at REAL, "
        "PRIMARY KEY (topic_id, offset)) WITHOUT ROWID",
        "CREATE UNIQUE INDEX log_by_offset ON log (offset)"),
}


def layout(path: Path, ddl: tuple[str, ...], messages: int, group: int,
           topics: int) -> tuple[float, float, float]:
    conn = connect(path)
    for statement in ddl:
        conn.execute(statement)
    head = ("INSERT INTO log (offset, at, topic_id, qos, retain, payload, properties, origin,"
            " expires_at) VALUES ")
    now = time.time()
    rows = [(o, now, o % topics, 1, 0, PAYLOAD, None, "publisher-1", None)
            for o in range(1, messages + 1)]
    started = time.perf_counter()
    for start in range(0, messages, group):
        conn.execute("BEGIN IMMEDIATE")
        end = min(start + group, messages)
        for chunk in range(start, end, 64):
            part = rows[chunk:min(chunk + 64, end)]
            conn.execute(head + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(part)),
                         tuple(chain.from_iterable(part)))
        conn.execute("COMMIT")
    rate = messages / (time.perf_counter() - started)
    per_message = used_bytes(conn) / messages
    # A narrow reader (one topic of `topics`) pages through its rows.
    started = time.perf_counter()
    after, count = 0, 0
    while True:
        page = conn.execute("SELECT offset, payload FROM log WHERE topic_id = 7 AND offset > ?"
                            " ORDER BY offset LIMIT 256", (after,)).fetchall()
        if not page:
            break
        count += len(page)
        after = page[-1][0]
    narrow = count / (time.perf_counter() - started)
    conn.close()
    return rate, per_message, narrow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--groups", default="64,256,512")
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--layouts", action="store_true")
    parser.add_argument("--dir", help="where the files go (default: a temporary directory)")
    args = parser.parse_args(argv)
    groups = [int(g) for g in args.groups.split(",")]
    with tempfile.TemporaryDirectory(prefix="log-bench-", dir=args.dir) as tmp:
        print(f"{args.messages:,} x 100-byte messages, {args.topics} topics, "
              f"{args.readers} offline readers + 1 stream on sensors/#, synchronous=FULL, "
              f"WAL, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
        last: tuple[Log, sqlite3.Connection] | None = None
        for group in groups:
            rate, per_message, cpu_us, log, conn = ingest(
                Path(tmp) / f"ingest-{group}.db", args.messages, group, args.topics,
                args.readers, 1 << 40)
            print(f"ingest, {group:4d} per transaction: {rate:9,.0f} msgs/s, "
                  f"{cpu_us:5.1f} us CPU per message, "
                  f"{per_message:6.1f} bytes on disk per message")
            if last is not None:
                last[1].close()
            last = (log, conn)
        assert last is not None
        log, conn = last
        for label, filters in (("narrow (1 of the topics)", {"sensors/7/temp": 0}),
                               ("# (every topic)", {"#": 0})):
            count, rate = replay(log, conn, filters)
            print(f"replay {label:26s}: {count:9,} rows, {rate:9,.0f} msgs/s read + decoded")
        deleted, rate = retention(log, conn)
        print(f"retention: {deleted:,} rows deleted in steps of 2,000: {rate:9,.0f} rows/s")
        conn.close()
        seconds = startup(Path(tmp) / "startup.db", 1000, 1000)
        print(f"start-up: Log.load, 1,000 readers x 2 filters, 1,000 topics: "
              f"{seconds * 1000:7.1f} ms")
        if args.layouts:
            for name, ddl in LAYOUTS.items():
                rate, per_message, narrow = layout(Path(tmp) / f"layout-{len(name)}.db", ddl,
                                                   args.messages, groups[-1], args.topics)
                print(f"layout {name:50s}: {rate:9,.0f} msgs/s, {per_message:6.1f} B/msg, "
                      f"narrow read {narrow:9,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
