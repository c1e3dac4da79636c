"""The log's tables in the SQLite file, and the codecs of its columns.

`MIGRATION` is the list of statements that adds the log to a store file; the store appends it
to its `MIGRATIONS` (one transaction with the `user_version` bump). `ensure_schema` runs it on
a file that has no log yet, for the standalone tests and the benchmark.

Layout (measured in benchmarks/log_bench.py, see docs/log.md):

- `log`: one row per message, the rowid is the offset. `at` is the publish time (wall clock
  made non-decreasing at append), `topic_id` an interned topic, `properties` the MQTT 5
  PUBLISH properties in their wire encoding (NULL for none), `origin` the publisher's client
  id (No Local), `expires_at` from the Message Expiry Interval (NULL: never).
- `log_by_topic (topic_id, offset)`: a reader with narrow filters reads index ranges instead
  of everyone's traffic; retention deletes per topic below a floor.
- `log_topics`: the interned names with their counters (rows, bytes, first and last offset),
  updated in every transaction that appends or deletes; start-up reads only this table.
- `log_state`: one row: the last offset ever assigned and the last `at`. Offsets are never
  reused, even when retention deleted the tail: the next is `last_offset + 1`.
- `log_readers`, `log_reader_filters`, `log_inflight`: cursors (see cursors.py).
- `log_reader_ranges` (store version 6): what a session's unsubscribed or replaced
  subscriptions left to read in its backlog (core/backlog.py `Backlog.closing`,
  store/log/backlogs.py).
- `log_streams`: per configured stream, its floor (first offset it still holds) and the rows
  and bytes it holds, so that retention by size needs no scan.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from ...mqtt.properties import NO_PROPERTIES, Properties, decode_properties, encode_properties
from ...mqtt.types import PacketType
from ...mqtt.wire import Reader

__all__ = ["MIGRATION", "RANGES_MIGRATION", "READERS_MIGRATION", "decode_props",
           "encode_props", "ensure_schema", "has_schema"]


# Binding speed, as in store/sqlite/sql.py (which registers the same, process-wide): a parameter
# of a type without an adapter (None, bool, bytes: most columns of a row) costs Python's
# sqlite3 a failed adapter lookup, about a microsecond each. These bind exactly as before;
# measured in log_bench: 62,000 -> 88,000 appends/s in memory. Registering twice is harmless.
def _same(value: None) -> None:
    return value


sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(bytes, bytes)
sqlite3.register_adapter(type(None), _same)

MIGRATION: Final[tuple[str, ...]] = (
    """CREATE TABLE log (
        offset INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        topic_id INTEGER NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        payload BLOB NOT NULL,
        properties BLOB,
        origin TEXT NOT NULL,
        expires_at REAL
    )""",
    "CREATE INDEX log_by_topic ON log (topic_id, offset)",
    """CREATE TABLE log_topics (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        count INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        first_offset INTEGER,
        last_offset INTEGER
    )""",
    """CREATE TABLE log_state (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        last_offset INTEGER NOT NULL,
        last_at REAL NOT NULL
    )""",
    "INSERT INTO log_state (id, last_offset, last_at) VALUES (0, 0, 0.0)",
    """CREATE TABLE log_readers (
        name TEXT PRIMARY KEY,
        offset INTEGER NOT NULL,
        backlog_count INTEGER NOT NULL DEFAULT 0,
        backlog_bytes INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE log_reader_filters (
        reader TEXT NOT NULL,
        filter TEXT NOT NULL,
        since INTEGER NOT NULL,
        PRIMARY KEY (reader, filter)
    ) WITHOUT ROWID""",
    """CREATE TABLE log_inflight (
        reader TEXT NOT NULL,
        packet_id INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        state INTEGER NOT NULL,
        PRIMARY KEY (reader, packet_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE log_streams (
        name TEXT PRIMARY KEY,
        filter TEXT NOT NULL,
        first_offset INTEGER NOT NULL,
        first_at REAL,
        count INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
)


# Store version 3 -> 4: persistent sessions' backlogs are readers (store/log/backlogs.py);
# an in-flight entry keeps what its PUBLISH is sent with again after a restart.
READERS_MIGRATION: Final[tuple[str, ...]] = (
    "ALTER TABLE log_inflight ADD COLUMN qos INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE log_inflight ADD COLUMN retain INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE log_inflight ADD COLUMN subscription_ids TEXT",  # "1,7"; NULL for none
    "ALTER TABLE log_inflight ADD COLUMN dup INTEGER NOT NULL DEFAULT 0",
    # A session's own count of its backlog, which its queue bounds apply to (the counters
    # above count every row its filters select, and topic and property bytes).
    "ALTER TABLE log_readers ADD COLUMN queued_count INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE log_readers ADD COLUMN queued_bytes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE log_readers ADD COLUMN queued_skip INTEGER NOT NULL DEFAULT 0",
)


# Store version 5 -> 6: the ranges an UNSUBSCRIBE (or a SUBSCRIBE replacing a subscription)
# left to read in a session's backlog (core/backlog.py `Backlog.closing`): each selects the
# rows in (since, until] as the old subscription (its options) would have. A row with `until`
# NULL is no range: it holds the since of the filter's subscription made again while older
# ranges of it are left (`log_reader_filters` keeps the lowest since, which the log's
# selection uses). Replaced as a whole per reader (ReaderRangesSaved); deleted with the reader.
RANGES_MIGRATION: Final[tuple[str, ...]] = (
    """CREATE TABLE log_reader_ranges (
        reader TEXT NOT NULL,
        filter TEXT NOT NULL,
        since INTEGER NOT NULL,
        until INTEGER,
        qos INTEGER,
        no_local INTEGER,
        retain_as_published INTEGER,
        subscription_id INTEGER,
        PRIMARY KEY (reader, filter, since)
    ) WITHOUT ROWID""",
)


def has_schema(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'log_state'").fetchone()
    return row is not None


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the log's tables if the file has none (standalone use), in the caller's
    transaction if one is open, else in one of its own."""
    if has_schema(conn):
        return
    if conn.in_transaction:
        for statement in (*MIGRATION, *READERS_MIGRATION, *RANGES_MIGRATION):
            conn.execute(statement)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in (*MIGRATION, *READERS_MIGRATION, *RANGES_MIGRATION):
            conn.execute(statement)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def encode_props(properties: Properties) -> bytes | None:
    """PUBLISH properties in their MQTT 5 wire form (Property Length first); None for none.

    Smaller and faster than JSON, and decoded by the same code that reads packets."""
    if properties is NO_PROPERTIES:
        return None
    encoded = encode_properties(properties, PacketType.PUBLISH)
    return None if encoded == b"\x00" else encoded


def decode_props(blob: bytes | None) -> Properties:
    if not blob:
        return NO_PROPERTIES
    return decode_properties(Reader(blob), PacketType.PUBLISH)
