"""The store's side of bridges: the store id, bridge readers, downlink positions.

Everything here is synchronous and runs on the store's writer thread with its connection,
like the rest of store/log/. The tables are created at open with `CREATE TABLE IF NOT
EXISTS` (no schema version of their own: an older edge-broker ignores them):

    store_meta (key PRIMARY KEY, value)            -- "store_id": random, made with the file
    bridge_downlink (bridge, source, position,     -- a bridge's remote position per source,
                     PRIMARY KEY (bridge, source)) --   written with the downlink message

*Store id.* 16 random hex digits created the first time a file is opened and never changed:
bridge message ids are `<gateway_id>-<store_id>-<offset>`, so a store rebuilt from scratch
(offsets again from 1) never reuses an id.

*Bridge readers.* A bridge `<name>` is the log reader `bridge:<name>` whose filters are the
bridge's uplink filters (cursors.py): retention keeps every row after its cursor, and its
backlog (rows, bytes) is counted at append. A filter new in the configuration selects rows
appended after it was added; a filter removed from it is unsubscribed. `commit` moves the
cursor past rows the remote side acknowledged; `drop` moves it over the oldest rows while the
backlog is above `max_backlog_bytes` (counted in `Reader.dropped`).
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import cursors
from .log import Log, LogRow, Page, Reader

__all__ = ["READER_PREFIX", "ensure_tables", "reader_name", "setup_reader", "store_id"]

READER_PREFIX = "bridge:"

TABLES = (
    "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bridge_downlink (bridge TEXT NOT NULL, source TEXT NOT NULL,"
    " position INTEGER NOT NULL, PRIMARY KEY (bridge, source))",
)


def reader_name(bridge: str) -> str:
    return READER_PREFIX + bridge


def ensure_tables(conn: sqlite3.Connection) -> None:
    """Create the tables if missing (in the caller's transaction)."""
    for statement in TABLES:
        conn.execute(statement)


def store_id(conn: sqlite3.Connection) -> str:
    """The file's id, made now if it has none (in the caller's transaction)."""
    row = conn.execute("SELECT value FROM store_meta WHERE key = 'store_id'").fetchone()
    if row is not None:
        return str(row[0])
    value = f"{random.SystemRandom().getrandbits(64):016x}"
    conn.execute("INSERT INTO store_meta (key, value) VALUES ('store_id', ?)", (value,))
    return value


def setup_reader(log: Log, conn: sqlite3.Connection, bridge: str,
                 filters: Sequence[str]) -> Reader:
    """The bridge's reader, made if new, with exactly `filters` (in a transaction)."""
    name = reader_name(bridge)
    reader = cursors.add_reader(log, conn, name)
    for topic_filter in [f for f in reader.filters if f not in filters]:
        cursors.unsubscribe(log, conn, name, topic_filter)
    for topic_filter in filters:
        cursors.subscribe(log, conn, name, topic_filter)
    return reader


def page(log: Log, conn: sqlite3.Connection, bridge: str, after: int, limit: int) -> Page:
    """Up to `limit` of the bridge's rows after max(after, its cursor), in order."""
    name = reader_name(bridge)
    reader = log.readers[name]
    return cursors.read(log, conn, name, limit, after=max(after, reader.offset))


def commit(log: Log, conn: sqlite3.Connection, bridge: str, offset: int,
           consumed: Sequence[LogRow | cursors.Passed]) -> None:
    """Move the cursor to `offset`; `consumed` are the bridge's rows up to it (in a
    transaction). Rows among them that a drop skipped meanwhile were in flight then (read,
    sent, their acknowledgement not back yet): the remote side has them, so they are taken
    out of `Reader.dropped` again (the broker did not show them as dropped: server/bridges.py
    `Bridge._settle`)."""
    name = reader_name(bridge)
    late = cursors.advance(log, conn, name, consumed, end=offset)
    if late:
        reader = log.readers[name]
        reader.dropped = max(0, reader.dropped - late)
        log.save_reader(conn, reader)


@dataclass(frozen=True, slots=True)
class Skipped:
    """What `drop` skipped: `count` rows of `bytes`, those of the bridge in (after, through]."""

    count: int
    bytes: int
    after: int
    through: int


def drop(log: Log, conn: sqlite3.Connection, bridge: str, max_bytes: int) -> Skipped:
    """Skip the oldest rows while the backlog is above `max_bytes` (in a transaction)."""
    name = reader_name(bridge)
    after = log.readers[name].offset
    skipped = cursors.drop_to_bound(log, conn, name, max_bytes=max_bytes)
    return Skipped(skipped.count, skipped.bytes, after, log.readers[name].offset)


def forget_readers(log: Log, conn: sqlite3.Connection, keep: Iterable[str]) -> list[str]:
    """Remove the readers of bridges no longer configured (their rows may then go)."""
    wanted = {reader_name(b) for b in keep}
    gone = [n for n in log.readers if n.startswith(READER_PREFIX) and n not in wanted]
    for name in gone:
        cursors.remove_reader(log, conn, name)
    return gone


def positions(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(str(b), str(s)): int(p) for b, s, p in
            conn.execute("SELECT bridge, source, position FROM bridge_downlink")}


DOWNLINK_PUT = ("INSERT OR REPLACE INTO bridge_downlink (bridge, source, position)"
                " VALUES (?, ?, ?)")
DOWNLINK_DELETE = "DELETE FROM bridge_downlink WHERE bridge = ? AND source = ?"


def downlink_statements(changes: dict[tuple[str, str], int]
                        ) -> tuple[list[tuple[str, list[tuple[Any, ...]]]],
                                   list[tuple[str, list[tuple[Any, ...]]]]]:
    """(deletes, puts) of a group's final position per (bridge, source); < 0 deletes. For
    the store's plan: they run in the group's transaction, with the messages."""
    puts: list[tuple[Any, ...]] = [(b, s, p) for (b, s), p in changes.items() if p >= 0]
    gone: list[tuple[Any, ...]] = [(b, s) for (b, s), p in changes.items() if p < 0]
    return ([(DOWNLINK_DELETE, gone)] if gone else []), ([(DOWNLINK_PUT, puts)] if puts else [])
