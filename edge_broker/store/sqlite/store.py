"""SqliteStore: the session store in one SQLite file (WAL, one writer task, group commit).

Theory of operation
-------------------
*Schema* (as mosquitto's persistence): a message body is stored once in `messages`; each
client that must receive it has a row in `deliveries` referring to it; `sessions`,
`subscriptions`, `retained` (topic -> message id) and `incoming_qos2` (client, packet id) hold
the rest. A body no delivery and no retained entry refers to is deleted in the same
transaction that dropped its last reference: temporary triggers (per connection, never in the
file) note the message id of every deleted or re-pointed delivery/retained row in the
in-memory table `temp.prune_candidates`, and a prune statement deletes those candidates that
nothing refers to. So the file holds no orphan bodies after any commit, `open()` returns none,
and steady traffic reuses the same pages instead of growing the file.

*Group commit.* `apply(changes)` appends the batch and an asyncio future to a queue and
returns the future; nothing is written on the caller's stack. One writer task takes every
queued batch (up to `MAX_GROUP_CHANGES` changes), coalesces them per key (later records win;
`SessionDeleted` drops what the group saved earlier for that client and becomes a cascading
delete), and writes the result in ONE transaction: deletions first, then the prune of the
bodies they freed (so the inserts reuse those pages; bodies the group refers to again are
exempt), then inserts/updates, then a last prune for rows the updates re-pointed; COMMIT; then
the futures resolve in submission order. While it commits, new batches queue up and form the
next group, so N concurrent publishers cost one commit (one fsync) per group, not per
message. Coalescing skips writes that cannot matter: a delivery saved and deleted inside the
group is never written (a delete is only issued for delivery ids at or below the highest id
this store ever wrote or found at open), and a body saved in the group that nothing refers
to is not inserted. An empty batch resolves with the batches queued before it (or is `DONE`
when nothing is pending).

*Threads.* The one sqlite3 connection lives in the single thread of a private executor; each
operation (a whole group transaction, a query, a vacuum step) is ONE hop to that thread, and
the hot inserts/deletes run as multi-row statements (`_MultiRow`). Python's sqlite3 releases
the GIL around every statement step and the writer must win it back from a busy event loop
each time, so hops and steps, not rows, are what a loaded broker pays for. (aiosqlite costs a
hop per statement, about ten per commit: measured 10x fewer commits/s than one hop with a
busy loop and small groups, so it is not used here.)

*Rule for the core* (what makes pruning safe): a body is kept only while something refers to
it, checked at the end of each transaction. A `DeliverySaved`/`RetainedSaved` must therefore
refer to a message saved in the same batch, or to one that was referenced at the end of the
previous batch. Should a core break it anyway, `open()` moves the deliveries and retained
entries whose body is missing to the quarantine table (with a warning): those messages are
lost, the restart is not.

*Durability* (`durability=`), all in WAL mode, which never corrupts the file on a crash:
- "fsync" (`synchronous=FULL`, the default): the WAL is fsynced at every commit, so a batch
  whose future resolved survives a power cut. `fsyncs` counts these commits.
- "os" (`synchronous=NORMAL`): a commit is written to the OS but not fsynced (the WAL is
  synced only at checkpoints). A resolved batch survives a crash of the process, not a power
  cut: the last commits before the cut may be lost (whole transactions, in order; the file
  stays consistent). `fsyncs` stays 0.
- "none" (`synchronous=OFF`): `apply` returns `DONE` at once, so acknowledgements do not wait
  for any commit; the writer still commits in groups in the background. A crash of the
  process loses the batches not yet committed (the moments before it); a power cut may lose
  more, and, because SQLite no longer orders its writes, could even damage the file (then
  `--recover`). To bound memory, when more than `NONE_MAX_BACKLOG` changes wait for the
  writer, `apply` returns a future again (back-pressure instead of unbounded growth).

*Migrations*: `MIGRATIONS[i]` takes the schema from version i to i+1 (`PRAGMA user_version`),
each in its own transaction with the version bump. Before a file written by an earlier
release is upgraded, a consistent copy of it is kept beside it as `<name>.pre-v<N>` (SQLite's
backup API), so a failed upgrade can be rolled back. A file with a higher version than the
code knows is refused with a `StoreError`.

*The log of named streams* (version 3; store/log/, docs/log.md): `LogAppended` records are
appended, in order, by `LogKeeper` inside the group transaction, after the other puts, at the
offsets the core assigned; a rolled-back group reloads the log's in-memory state. Retention
and last-value compaction run as bounded steps (their own short transactions) between groups,
when idle and under steady load alike. `read_stream` (history pages for `$stream/`
subscriptions), `stream_stats`, `delete_stream` and `replay_stream` are one hop each to the
writer thread. `stream_cursors` holds where stored sessions' `$stream/` subscriptions resume
(`StreamCursorSaved`), deleted with the subscription or the session.

*Recovery*: `open()` runs `PRAGMA quick_check`; a file that is not a database or is damaged
raises `StoreError` naming the file and pointing at `--recover`, which calls `move_aside()`
(rename the file and its -wal/-shm to `<name>.corrupt-<UTC timestamp>`) and starts empty. A
commit torn by a crash is simply absent after restart (WAL frames without a commit record are
ignored). For the power-loss tests, `SqliteStore.before_commit` (None in production; only
tests install it, see tests/faults.py) is called with the group commit's number after its
statements ran and before COMMIT, where a test kills the process to tear that transaction.
A sound file with invalid rows (bit rot, a buggy version) does not stop the start: every row
is checked as it is read (sqlite_validate.py); invalid ones, and the rows that cannot stand
without them, are moved to the `quarantine` table (schema version 2) in the open's
transaction, logged, and counted in `stats().quarantined`.

*Interference* (sqlite_guard.py): the store holds an exclusive flock on the file itself, so a
second broker cannot open it even after the data directory's lock file was removed
(`StoreInUseError`). After every commit (before its futures resolve) and every second while
idle, it checks that the path still names the file (and -wal) it opened. Once it does not,
`full` is set (the server refuses new QoS 1/2 PUBLISH), one error is logged, and the futures
of that commit and of every batch queued are failed (no acknowledgement after detection: the
server closes those connections, and their publishers send again and are refused). Later
batches, which can no longer accept a QoS 1/2 message, are committed into the unlinked file
and resolved as usual, so acknowledgements from subscribers and deliveries of what the broker
holds in memory go on until the operator restores the file and restarts.

*Full storage*. `full` (the server refuses new QoS>0 work while it is set) is True when
1. the data in the file (pages in use, `used_bytes`) is at or over `max_store_bytes`. The
   measure is logical because SQLite reuses free pages: the file would stay big after the
   queues drained. The file follows it: idle-time `incremental_vacuum` steps give free pages
   back (`auto_vacuum=INCREMENTAL`), checkpoints truncate the WAL (`journal_size_limit`);
2. the disk has less than `disk_reserve_bytes` (8 MiB) free, until twice that is free again:
   full is reported while there is still room to commit the acks that drain the queues, and
   meanwhile the WAL is checkpointed and truncated after each commit and free pages are
   vacuumed eagerly (in WAL mode committed data waits in the WAL and needs room again in
   the file to be checkpointed);
3. the disk reported SQLITE_FULL anyway (filled faster than the checks after each commit).
   The transaction is rolled back, nothing is lost or half-applied; the store makes room,
   cheapest first, retrying at once after each step: checkpoint and truncate the WAL, then
   delete its ballast file (`<db>.ballast`, 2 MiB of reserved blocks; the WAL is
   checkpointed at ~2 MiB so the ballast covers what waits there). Then it retries every
   <= 1 s, each time with the batches that arrived meanwhile (mostly acks; their deletions
   go first, and the bodies they free are reused by the inserts of the same transaction).
   This clears once a commit succeeded and the ballast could be recreated (twice its size
   free). A group that cannot fit even then waits, retried, until space is freed on the
   disk; it is never dropped. A store closed while commits keep failing fails its pending
   batches with `StoreFullError` (none of them was acknowledged). `open()` on a disk too
   full to open the file at all (WAL mode needs room for the -shm file even to read) deletes
   the ballast and tries once more; the store then starts `full`.
4. the file was deleted or replaced under the running store (see *Interference*).
`full` is updated after each commit, before that commit's futures resolve, and every second
while idle and full. Any other SQLite error fails the group's futures and every later
`apply` with `StoreError`.

`stats()` counts the queue with a scan of `deliveries`: call it seconds apart, not per batch.

`sqlite3.Error` becomes `StoreError` here and nowhere else; this is the only module that
imports sqlite3 (sqlite_validate.py is handed rows; sqlite_guard.py uses os and fcntl). The
read-only helpers (`read_sessions`, `read_session`, `read_stats`) open the file with
`mode=ro` from another process (the admin CLI) while the broker runs; WAL makes those reads
consistent and non-blocking (the flock does not stop them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar
from urllib.parse import quote

from ...core.changes import (
    Change,
    DeliveryDeleted,
    DeliveryRecord,
    DeliverySaved,
    LogAppended,
    Message,
    MessageSaved,
    Qos2Received,
    Qos2Released,
    RetainedDeleted,
    RetainedSaved,
    SessionDeleted,
    SessionRecord,
    SessionSaved,
    Snapshot,
    StreamCursorSaved,
    SubscriptionDeleted,
    SubscriptionRecord,
    SubscriptionSaved,
)
from ...errors import StoreDamagedError, StoreError, StoreFullError
from ...mqtt.properties import NO_PROPERTIES, PROPERTY_TABLE, Properties, PropertyType
from ..base import DONE
from ..log.keeper import LogKeeper
from ..log.log import LogRow
from ..log.replay import Position, StreamStats
from ..log.schema import MIGRATION as LOG_MIGRATION
from ..log.streams import StreamConfig
from . import validate
from .guard import FileGuard

__all__ = [
    "MIGRATIONS",
    "QueuedDelivery",
    "SessionDetail",
    "SessionInfo",
    "SqliteStore",
    "StoreStats",
    "read_session",
    "read_sessions",
    "read_stats",
]

log = logging.getLogger("edge_broker.store")
_T = TypeVar("_T")

Durability = Literal["fsync", "os", "none"]
_SYNCHRONOUS: Final[dict[str, str]] = {"fsync": "FULL", "os": "NORMAL", "none": "OFF"}

MAX_GROUP_CHANGES: Final = 50_000  # one transaction takes at most about this many changes
NONE_MAX_BACKLOG: Final = 200_000  # durability "none": changes queued before apply() waits
BALLAST_BYTES: Final = 2 * 1024 * 1024
DISK_RESERVE_BYTES: Final = 8 * 1024 * 1024  # `full` when less is free on the disk
RETRY_MAX_S: Final = 1.0  # longest backoff between retries of a group on a full disk
FULL_RECHECK_S: Final = 1.0  # while full and idle, re-check sizes and the ballast this often
FILE_CHECK_S: Final = 1.0  # while idle, check this often that the file is still there
SIZE_CHECK_S: Final = 5.0  # otherwise, check the free-page count this often (for vacuum)
VACUUM_MIN_FREE_BYTES: Final = 8 * 1024 * 1024  # vacuum when free pages exceed this ...
VACUUM_MIN_FREE_RATIO: Final = 0.25  # ... and this share of the file
VACUUM_STEP_PAGES: Final = 512
VACUUM_INTERVAL_S: Final = 0.5  # at most one vacuum step per interval, only when idle
WAL_SIZE_LIMIT: Final = 4 * 1024 * 1024  # journal_size_limit: WAL truncated to this at reset
# Checkpoint when the WAL holds this many pages (~2 MiB, SQLite's default is 1000): committed
# data waiting in the WAL needs about as much room again in the file to be checkpointed, and
# on a full disk the ballast must cover that. No measurable cost in store_bench.
WAL_AUTOCHECKPOINT_PAGES: Final = 512
BUSY_TIMEOUT_MS: Final = 5000

# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_NOTADB: Final = 26
_RETRYABLE: Final = frozenset({_SQLITE_BUSY, _SQLITE_LOCKED})


# Binding speed. For every parameter that is not an exact int, float, str or bytearray,
# Python's sqlite3 looks for an adapter; a miss (None, bool, bytes: most of our columns) costs
# about a microsecond each on a small machine, as much as SQLite's own work for the row. These
# registrations bind exactly as before (bool as integer, bytes as blob, None as NULL); they
# only turn the slow miss into a dictionary hit, which halves the cost of a row. The registry
# is process-wide; this module is the only user of sqlite3 in edge-broker.
def _same(value: None) -> None:
    return value


sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(bytes, bytes)
sqlite3.register_adapter(type(None), _same)


# --------------------------------------------------------------------------- schema

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 0 -> 1: the initial schema.
    (
        """CREATE TABLE sessions (
            client_id TEXT PRIMARY KEY,
            protocol_level INTEGER NOT NULL,
            expiry_interval INTEGER NOT NULL,
            disconnected_at REAL,
            will_topic TEXT,           -- NULL: no will
            will_payload BLOB,
            will_qos INTEGER,
            will_retain INTEGER,
            will_properties TEXT       -- see _encode_properties
        )""",
        """CREATE TABLE subscriptions (
            client_id TEXT NOT NULL,
            topic_filter TEXT NOT NULL,
            qos INTEGER NOT NULL,
            no_local INTEGER NOT NULL,
            retain_as_published INTEGER NOT NULL,
            retain_handling INTEGER NOT NULL,
            subscription_id INTEGER,
            PRIMARY KEY (client_id, topic_filter)
        ) WITHOUT ROWID""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            properties TEXT,
            received_at REAL NOT NULL,
            expires_at REAL,
            origin TEXT NOT NULL
        )""",
        """CREATE TABLE deliveries (
            client_id TEXT NOT NULL,
            delivery_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            subscription_ids TEXT,     -- "1,7" or NULL
            packet_id INTEGER,
            state INTEGER NOT NULL,
            dup INTEGER NOT NULL,
            PRIMARY KEY (client_id, delivery_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX deliveries_by_message ON deliveries (message_id)",
        """CREATE TABLE retained (
            topic TEXT PRIMARY KEY,
            message_id INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX retained_by_message ON retained (message_id)",
        """CREATE TABLE incoming_qos2 (
            client_id TEXT NOT NULL,
            packet_id INTEGER NOT NULL,
            PRIMARY KEY (client_id, packet_id)
        ) WITHOUT ROWID""",
    ),
    # version 1 -> 2: rows found invalid at open are moved here (sqlite_validate.py).
    (
        """CREATE TABLE quarantine (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,          -- when it was quarantined (wall clock)
            table_name TEXT NOT NULL,  -- where it was
            row_key TEXT NOT NULL,     -- its primary key there, "client_id=a, delivery_id=7"
            client_id TEXT,
            reason TEXT NOT NULL,
            row_json TEXT NOT NULL     -- the whole row; BLOBs as {"blob_base64": ...}
        )""",
    ),
    # version 2 -> 3: the append-only log of named streams (store/log/schema.py), and where
    # stored sessions' $stream/ subscriptions resume (core/streams.py).
    (
        *LOG_MIGRATION,
        """CREATE TABLE stream_cursors (
            client_id TEXT NOT NULL,
            topic_filter TEXT NOT NULL,
            position TEXT NOT NULL,    -- "earliest", an offset to start at, an ISO time
            PRIMARY KEY (client_id, topic_filter)
        ) WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# Per connection, never stored in the file: collect the ids of bodies that may have lost
# their last reference during the current transaction.
_TEMP_SCHEMA: Final = (
    # No UNIQUE constraint: an upsert's conflict handling overrides the OR IGNORE of the
    # triggers it fires, so a duplicate id would abort it. Duplicates are harmless here.
    "CREATE TEMP TABLE IF NOT EXISTS prune_candidates (id INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS temp.prune_candidates_id ON prune_candidates (id)",
    """CREATE TEMP TRIGGER IF NOT EXISTS deliveries_deleted AFTER DELETE ON main.deliveries
       BEGIN INSERT INTO prune_candidates (id) VALUES (OLD.message_id); END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS deliveries_moved
       AFTER UPDATE OF message_id ON main.deliveries WHEN OLD.message_id <> NEW.message_id
       BEGIN INSERT INTO prune_candidates (id) VALUES (OLD.message_id); END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS retained_deleted AFTER DELETE ON main.retained
       BEGIN INSERT INTO prune_candidates (id) VALUES (OLD.message_id); END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS retained_moved
       AFTER UPDATE OF message_id ON main.retained WHEN OLD.message_id <> NEW.message_id
       BEGIN INSERT INTO prune_candidates (id) VALUES (OLD.message_id); END""",
)

_UNREFERENCED: Final = (
    "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = messages.id)"
    " AND NOT EXISTS (SELECT 1 FROM retained r WHERE r.message_id = messages.id)"
)
_PRUNE_CANDIDATES: Final = (
    f"DELETE FROM messages WHERE id IN (SELECT id FROM temp.prune_candidates) AND {_UNREFERENCED}"
)
_CLEAR_CANDIDATES: Final = "DELETE FROM temp.prune_candidates"
_UNCANDIDATE: Final = "DELETE FROM temp.prune_candidates WHERE id = ?"
_PRUNE_ALL: Final = f"DELETE FROM messages WHERE {_UNREFERENCED}"

_CASCADE: Final = (
    "DELETE FROM deliveries WHERE client_id = ?",
    "DELETE FROM subscriptions WHERE client_id = ?",
    "DELETE FROM incoming_qos2 WHERE client_id = ?",
    "DELETE FROM stream_cursors WHERE client_id = ?",
    "DELETE FROM sessions WHERE client_id = ?",
)
_CURSOR_PUT: Final = ("INSERT OR REPLACE INTO stream_cursors (client_id, topic_filter, position)"
                      " VALUES (?, ?, ?)")
_CURSOR_DELETE: Final = "DELETE FROM stream_cursors WHERE client_id = ? AND topic_filter = ?"
_SUBSCRIPTION_DELETE: Final = "DELETE FROM subscriptions WHERE client_id = ? AND topic_filter = ?"
_QOS2_DELETE: Final = "DELETE FROM incoming_qos2 WHERE client_id = ? AND packet_id = ?"
_RETAINED_DELETE: Final = "DELETE FROM retained WHERE topic = ?"
_SESSION_PUT: Final = (
    "INSERT OR REPLACE INTO sessions (client_id, protocol_level, expiry_interval,"
    " disconnected_at, will_topic, will_payload, will_qos, will_retain, will_properties)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SUBSCRIPTION_PUT: Final = (
    "INSERT OR REPLACE INTO subscriptions (client_id, topic_filter, qos, no_local,"
    " retain_as_published, retain_handling, subscription_id) VALUES (?, ?, ?, ?, ?, ?, ?)"
)

_Statement = tuple[str, list[tuple[Any, ...]]]  # SQL and the parameters of each execution


class _MultiRow:
    """A statement with a repeated list of `?` groups, run as a few multi-row statements.

    Hot statements (bodies, deliveries) take up to `CHUNK_SIZES[0]` rows per execution
    instead of one: less per-row overhead in Python's sqlite3, and far fewer GIL hand-offs
    between the writer thread and the event loop (sqlite3 releases the GIL around every
    statement step). The sizes are few and fixed so the prepared statements stay cached.
    """

    def __init__(self, head: str, width: int, tail: str = "") -> None:
        self.head = head
        self.group = "(" + ", ".join("?" * width) + ")"
        self.tail = tail
        self._sql: dict[int, str] = {}

    def sql(self, rows: int) -> str:
        text = self._sql.get(rows)
        if text is None:
            text = self._sql[rows] = (self.head + ", ".join([self.group] * rows) + self.tail)
        return text

    def statements(self, rows: Sequence[tuple[Any, ...]]) -> list[_Statement]:
        out: list[_Statement] = []
        start, total = 0, len(rows)
        for size in CHUNK_SIZES:
            count = (total - start) // size
            if count:
                out.append((self.sql(size), [
                    tuple(chain.from_iterable(rows[i:i + size]))
                    for i in range(start, start + count * size, size)]))
                start += count * size
        if start < total:
            out.append((self.sql(1), list(rows[start:])))
        return out


CHUNK_SIZES: Final = (256, 64, 16, 4)

_MESSAGE_PUT: Final = _MultiRow(
    "INSERT OR REPLACE INTO messages (id, topic, payload, qos, retain, properties,"
    " received_at, expires_at, origin) VALUES ", 9)
_MESSAGE_UPDATE: Final = (
    "UPDATE messages SET topic = ?, payload = ?, qos = ?, retain = ?, properties = ?,"
    " received_at = ?, expires_at = ?, origin = ? WHERE id = ?"
)
_DELIVERY_PUT: Final = _MultiRow(
    "INSERT INTO deliveries (client_id, delivery_id, message_id, qos, retain,"
    " subscription_ids, packet_id, state, dup) VALUES ", 9,
    " ON CONFLICT (client_id, delivery_id) DO UPDATE SET message_id = excluded.message_id,"
    " qos = excluded.qos, retain = excluded.retain,"
    " subscription_ids = excluded.subscription_ids, packet_id = excluded.packet_id,"
    " state = excluded.state, dup = excluded.dup")
# Per client: "(client_id, delivery_id) IN (VALUES ...)" would scan the table.
_DELIVERY_DELETE: Final = _MultiRow(
    "DELETE FROM deliveries WHERE client_id = ? AND delivery_id IN (", 1, ")")
_QOS2_PUT: Final = "INSERT OR IGNORE INTO incoming_qos2 (client_id, packet_id) VALUES (?, ?)"
_RETAINED_PUT: Final = (
    "INSERT INTO retained (topic, message_id) VALUES (?, ?)"
    " ON CONFLICT (topic) DO UPDATE SET message_id = excluded.message_id"
)

_SELECT_SESSIONS: Final = (
    "SELECT client_id, protocol_level, expiry_interval, disconnected_at, will_topic,"
    " will_payload, will_qos, will_retain, will_properties FROM sessions"
)
_SELECT_SUBSCRIPTIONS: Final = (
    "SELECT client_id, topic_filter, qos, no_local, retain_as_published, retain_handling,"
    " subscription_id FROM subscriptions"
)
_SELECT_MESSAGES: Final = (
    "SELECT id, topic, payload, qos, retain, properties, received_at, expires_at, origin"
    " FROM messages"
)
_SELECT_DELIVERIES: Final = (
    "SELECT client_id, delivery_id, message_id, qos, retain, subscription_ids, packet_id,"
    " state, dup FROM deliveries"
)
_SELECT_QUARANTINED: Final = "SELECT count(*) FROM quarantine"
_SELECT_SIZE: Final = (
    "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
)
_SELECT_COUNTS: Final = (
    "SELECT (SELECT count(*) FROM sessions),"
    " (SELECT count(*) FROM deliveries),"
    " (SELECT coalesce(sum(length(m.payload)), 0) FROM deliveries d"
    "  JOIN messages m ON m.id = d.message_id),"
    " (SELECT min(m.received_at) FROM deliveries d JOIN messages m ON m.id = d.message_id)"
)


# --------------------------------------------------------------------------- value codecs
#
# Properties are stored as compact JSON keyed by the MQTT property identifier (stable across
# versions of this code, unlike attribute names): {"3":"text/plain","9":{"b":"AAE="},
# "38":[["k","v"]],"11":[1,2]}. Binary data is {"b": base64}; absent properties are left out;
# NO_PROPERTIES is NULL.

_ATTRIBUTE_ID: Final = tuple((spec.attribute, int(pid), spec.type)
                             for pid, spec in PROPERTY_TABLE.items())


def _encode_properties(properties: Properties) -> str | None:
    if properties is NO_PROPERTIES:
        return None
    out: dict[str, Any] = {}
    for attribute, pid, ptype in _ATTRIBUTE_ID:
        value = getattr(properties, attribute)
        if value is None or value == ():
            continue
        if ptype is PropertyType.BINARY_DATA:
            value = {"b": base64.b64encode(value).decode("ascii")}
        out[str(pid)] = value
    if not out:
        return None
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _encode_ids(ids: tuple[int, ...]) -> str | None:
    return ",".join(map(str, ids)) if ids else None


def _session_row(r: SessionRecord) -> tuple[Any, ...]:
    will = r.will
    if will is None:
        return (r.client_id, r.protocol_level, r.expiry_interval, r.disconnected_at,
                None, None, None, None, None)
    return (r.client_id, r.protocol_level, r.expiry_interval, r.disconnected_at,
            will.topic, will.payload, will.qos, will.retain,
            _encode_properties(will.properties))


def _subscription_row(r: SubscriptionRecord) -> tuple[Any, ...]:
    return (r.client_id, r.topic_filter, r.qos, r.no_local, r.retain_as_published,
            r.retain_handling, r.subscription_id)


def _message_row(m: Message) -> tuple[Any, ...]:
    return (m.id, m.topic, m.payload, m.qos, m.retain, _encode_properties(m.properties),
            m.received_at, m.expires_at, m.origin)


def _message_update_row(m: Message) -> tuple[Any, ...]:
    return (m.topic, m.payload, m.qos, m.retain, _encode_properties(m.properties),
            m.received_at, m.expires_at, m.origin, m.id)


def _delivery_row(r: DeliveryRecord) -> tuple[Any, ...]:
    return (r.client_id, r.delivery_id, r.message_id, r.qos, r.retain,
            _encode_ids(r.subscription_ids) if r.subscription_ids else None,
            r.packet_id, r.state, r.dup)


# --------------------------------------------------------------------------- stats / admin


@dataclass(frozen=True, slots=True)
class StoreStats:
    sessions: int
    queued_messages: int  # delivery rows (a body shared by two clients counts twice)
    queued_bytes: int  # payload bytes over the deliveries
    oldest_message_at: float | None  # received_at of the oldest queued message
    file_bytes: int  # database file + WAL on disk
    used_bytes: int  # pages in use (page_count - freelist_count) * page_size; `full` uses it
    free_bytes: int  # free pages inside the file (reused first; given back by vacuum)
    # Counters of this store object (0 from read_stats, which runs in another process).
    commits: int = 0  # group commits
    batches: int = 0  # non-empty batches committed
    fsyncs: int = 0  # commits that waited for an fsync (durability "fsync")
    changes_written: int = 0  # change records committed (before coalescing)
    rows_written: int = 0  # row operations issued (after coalescing)
    vacuum_steps: int = 0
    full: bool = False
    quarantined: int = 0  # rows in the quarantine table (invalid rows found at open)
    file_lost: bool = False  # the file was deleted or replaced under the running store


@dataclass(frozen=True, slots=True)
class SessionInfo:
    client_id: str
    protocol_level: int
    expiry_interval: int
    disconnected_at: float | None  # None: connected when last written
    has_will: bool
    subscriptions: int
    queued_messages: int
    queued_bytes: int


@dataclass(frozen=True, slots=True)
class QueuedDelivery:
    delivery: DeliveryRecord
    topic: str
    payload_bytes: int
    received_at: float


@dataclass(frozen=True, slots=True)
class SessionDetail:
    info: SessionInfo
    record: SessionRecord
    subscriptions: list[SubscriptionRecord]
    deliveries: list[QueuedDelivery]  # in delivery id order
    incoming_qos2: list[int]  # packet ids


# --------------------------------------------------------------------------- errors


def _code(error: sqlite3.Error) -> int:
    return int(getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_damage(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return (_code(error) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
            or "not a database" in text or "malformed" in text)


def _damaged(path: Path, detail: str) -> StoreError:
    return StoreDamagedError(
        f"{path}: the store is damaged ({detail}); start with --recover to move it aside "
        f"(to {path.name}.corrupt-<time>) and start with an empty store")


def _store_error(path: Path, doing: str, error: sqlite3.Error) -> StoreError:
    if _is_damage(error):
        return _damaged(path, str(error))
    if _code(error) == _SQLITE_FULL:
        return StoreFullError(f"{path}: {doing}: the disk is full ({error})")
    return StoreError(f"{path}: {doing}: {error}")


# --------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class _Plan:
    """One group of batches, coalesced into the statements of one transaction."""

    deletes: list[tuple[str, list[tuple[Any, ...]]]]
    protect: list[tuple[int]]  # bodies the puts refer to: not pruned after the deletes
    puts: list[tuple[str, list[tuple[Any, ...]]]]
    prune_after_deletes: bool
    prune_after_puts: bool
    max_delivery_id: int
    max_message_id: int
    changes: int
    batches: int
    rows: int
    log: list[Message]  # LogAppended messages, in order

    @property
    def empty(self) -> bool:
        return not self.deletes and not self.puts and not self.log


_Pending = tuple[Sequence[Change], "asyncio.Future[None] | None"]


class SqliteStore:
    # Called on the writer thread with each group commit's number, after its statements ran
    # and before COMMIT. Only tests set it (tests/faults.py kills the process there).
    before_commit: ClassVar[Callable[[int], None] | None] = None
    """The SQLite session store; see the module docstring."""

    def __init__(self, path: str | Path, *, durability: str = "fsync",
                 max_store_bytes: int = 0, ballast_bytes: int = BALLAST_BYTES,
                 disk_reserve_bytes: int = DISK_RESERVE_BYTES,
                 streams: Sequence[StreamConfig] = ()) -> None:
        if durability not in _SYNCHRONOUS:
            raise ValueError(f"durability must be one of {sorted(_SYNCHRONOUS)}, "
                             f"not {durability!r}")
        if min(max_store_bytes, ballast_bytes, disk_reserve_bytes) < 0:
            raise ValueError("max_store_bytes, ballast_bytes and disk_reserve_bytes must be >= 0")
        self.path = Path(path)
        self.durability = durability
        self.max_store_bytes = max_store_bytes
        self.ballast_bytes = ballast_bytes
        self.disk_reserve_bytes = disk_reserve_bytes
        self.ballast_path = self.path.with_name(self.path.name + ".ballast")
        # The connection lives in (and is only touched from) the one thread of the executor.
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._queue: deque[_Pending] = deque()
        self._queued_changes = 0
        self._busy = False  # the writer holds a group whose futures are not resolved yet
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._failed: StoreError | None = None
        self._delivery_hwm = 0  # no delivery with a higher id is in the file
        self._message_hwm = 0  # no message with a higher id is in the file
        self._disk_full = False  # SQLITE_FULL seen, and the ballast not back yet
        self._disk_tight = False  # free disk space under disk_reserve_bytes
        self._used_bytes = 0
        self._free_bytes = 0
        self._size_checked_at = 0.0
        self._vacuumed_at = 0.0
        self._auto_vacuum = False
        self.commits = 0
        self.batches = 0
        self.fsyncs = 0
        self.changes_written = 0
        self.rows_written = 0
        self.vacuum_steps = 0
        self._commit_attempts = 0
        self._guard = FileGuard(self.path)  # the file's lock, and whether it is still there
        self._log = LogKeeper(streams)  # the append-only log of named streams (store/log/)
        self.quarantined_at_open = 0  # rows moved to the quarantine table by open()

    # -- public API ---------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """New QoS>0 work should be refused: over `max_store_bytes`, the disk nearly full
        (under `disk_reserve_bytes` free), full (SQLITE_FULL), or the file deleted or
        replaced under the running store (sqlite_guard.py)."""
        return self._disk_full or self._disk_tight or self._guard.lost or (
            self.max_store_bytes > 0 and self._used_bytes >= self.max_store_bytes)

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages in use, as of the last check (after commits)."""
        return self._used_bytes

    async def open(self) -> Snapshot:
        if self._executor is not None:
            raise StoreError(f"{self.path}: the store is already open")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a database file")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edge-broker-store")
        try:
            try:
                await self._call(self._guard.lock)
            except OSError as error:
                raise StoreError(f"{self.path}: cannot open: {error.strerror}") from None
            try:
                snapshot = await self._call(self._open_sync)
            except StoreError as error:
                # A disk too full to open the store at all (in WAL mode even reading needs
                # room for the -shm/-wal files): give the ballast back and try once more; the
                # store then reports `full` until space returns, as after SQLITE_FULL.
                free = _free_disk_bytes(self.path.parent)
                if (isinstance(error, StoreDamagedError) or free is None
                        or free >= self.disk_reserve_bytes):
                    raise
                if not self._drop_ballast():
                    raise StoreFullError(f"{error} (the disk is full: {free} bytes free in "
                                         f"{self.path.parent})") from None
                await self._call(self._close_connection)
                self._disk_full = True
                snapshot = await self._call(self._open_sync)
        except BaseException:
            await self._call(self._close_connection)
            self._guard.close()
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._guard.watch()
        if self.ballast_bytes and not self.ballast_path.exists():
            await asyncio.to_thread(_make_ballast, self.ballast_path, self.ballast_bytes)
        self._check_disk()
        self._writer = asyncio.get_running_loop().create_task(
            self._run_writer(), name=f"store-writer {self.path.name}")
        return snapshot

    def apply(self, changes: Sequence[Change]) -> Awaitable[None]:
        """Queue one batch; the awaitable resolves when it and all earlier batches committed.

        The store keeps `changes` until then: do not mutate it.
        """
        if self._failed is not None or self._writer is None or self._closing:
            return self._failed_future()
        if not changes:
            if (not self._queue and not self._busy) or self.durability == "none":
                return DONE
        elif self.durability == "none" and self._queued_changes < NONE_MAX_BACKLOG:
            self._queue.append((changes, None))
            self._queued_changes += len(changes)
            self._wakeup.set()
            return DONE
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((changes, future))
        self._queued_changes += len(changes)
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Commit what is pending, checkpoint the WAL into the file (and truncate it), close."""
        if self._executor is None or self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        try:
            await self._call(self._close_sync)
        finally:
            self._guard.close()  # after SQLite closed the file
            self._executor.shutdown(wait=False)
            self._executor = None
            self._writer = None

    async def ping(self) -> None:
        """Returns once the writer thread is free to answer: health checks and the systemd
        watchdog use it to tell a store that is slow from one that is stuck."""
        if self._executor is None:
            return
        await self._call(_same, None)

    async def stats(self) -> StoreStats:
        if self._executor is None or self._conn is None:
            raise StoreError(f"{self.path}: the store is not open")
        try:
            counts = await self._call(self._stats_sync)
        except sqlite3.Error as error:
            raise _store_error(self.path, "stats", error) from None
        self._check_disk()
        self._check_file()
        return StoreStats(
            sessions=counts[0], queued_messages=counts[1], queued_bytes=counts[2],
            oldest_message_at=counts[3], file_bytes=_file_bytes(self.path),
            used_bytes=self._used_bytes, free_bytes=self._free_bytes, commits=self.commits,
            batches=self.batches, fsyncs=self.fsyncs, changes_written=self.changes_written,
            rows_written=self.rows_written, vacuum_steps=self.vacuum_steps, full=self.full,
            quarantined=counts[4], file_lost=self._guard.lost)

    # -- streams (store/log/keeper.py) ---------------------------------------------------

    @property
    def stream_names(self) -> list[str]:
        return sorted(c.name for c in self._log.log.stream_configs)

    async def read_stream(self, name: str, topic_filter: str | None,
                          position: Position | None, after: int, until: int,
                          limit: int) -> tuple[list[LogRow], int]:
        """A page of a stream's history for replay (see LogKeeper.page)."""
        try:
            return await self._call(self._read_sync, self._log.page, name, topic_filter,
                                    position, after, until, limit)
        except sqlite3.Error as error:
            raise _store_error(self.path, "read a stream", error) from None

    async def stream_stats(self) -> list[StreamStats]:
        try:
            return await self._call(self._read_sync, self._log.stats)
        except sqlite3.Error as error:
            raise _store_error(self.path, "stream statistics", error) from None

    async def delete_stream(self, name: str) -> bool:
        try:
            return await self._call(self._read_sync, self._log.delete, name)
        except sqlite3.Error as error:
            raise _store_error(self.path, "delete a stream", error) from None

    async def replay_stream(self, name: str, position: Position, topic_filter: str | None,
                            limit: int | None) -> list[LogRow]:
        try:
            return await self._call(self._read_sync, self._log.replay_rows, name, position,
                                    topic_filter, limit)
        except sqlite3.Error as error:
            raise _store_error(self.path, "replay a stream", error) from None

    def _read_sync(self, fn: Callable[..., _T], *args: Any) -> _T:
        return fn(self._db(), *args)

    @staticmethod
    def move_aside(path: str | Path) -> Path:
        """Rename a damaged store (and its -wal/-shm) to `<name>.corrupt-<UTC time>`.

        Returns the new path of the main file. The -wal and -shm files keep their suffixes
        after the new name, so the moved set can still be opened for forensics.
        """
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: cannot move aside: no such file")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        try:
            for suffix in ("-wal", "-shm"):
                side = Path(str(path) + suffix)
                if side.exists():
                    side.rename(str(target) + suffix)
            path.rename(target)
        except OSError as error:
            raise StoreError(f"{path}: cannot move aside: {error}") from None
        return target

    # -- the database thread ------------------------------------------------------------
    #
    # Every method ending in _sync runs in the executor's single thread, one whole operation
    # (a transaction, a query) per hop: a busy event loop costs the writer one hand-off per
    # commit, not one per statement.

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: the store is not open")
        return self._conn

    def _open_sync(self) -> Snapshot:
        path = self.path
        try:
            conn = sqlite3.connect(str(path), isolation_level=None)
        except sqlite3.Error as error:
            raise _store_error(path, "cannot open", error) from None
        self._conn = conn
        try:
            report = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        except sqlite3.Error as error:
            raise _store_error(path, "quick_check", error) from None
        if report != ["ok"]:
            raise _damaged(path, "quick_check: " + "; ".join(report[:3]))
        try:
            version = _scalar(conn, "PRAGMA user_version")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: the store has schema version {version}, newer than the "
                    f"{SCHEMA_VERSION} this edge-broker knows; run the newer edge-broker "
                    f"or move the file aside")
            if version == 0 and _scalar(conn, "PRAGMA page_count") == 0:
                # Only possible on a new file, before journal_mode writes its header.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = _scalar(conn, "PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL mode (journal_mode={mode})")
            for pragma in (f"PRAGMA synchronous = {_SYNCHRONOUS[self.durability]}",
                           f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
                           "PRAGMA temp_store = MEMORY",
                           f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}",
                           "PRAGMA cache_size = -8192",
                           "PRAGMA foreign_keys = OFF",
                           f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}"):
                conn.execute(pragma)
            if 0 < version < SCHEMA_VERSION:
                self._keep_copy_sync(conn, version)
            for number in range(version, SCHEMA_VERSION):
                with _transaction(conn):
                    for statement in MIGRATIONS[number]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
                log.info("%s: store schema migrated to version %d", path, number + 1)
            self._auto_vacuum = _scalar(conn, "PRAGMA auto_vacuum") == 2
            for statement in _TEMP_SCHEMA:
                conn.execute(statement)
            # Every row is checked as it is read; invalid ones (bit rot, a buggy version, a
            # core that broke the rule for bodies) go to the quarantine table, in the same
            # transaction that deletes them and prunes the bodies they freed.
            with _transaction(conn):
                snapshot, quarantined = _load_checked(conn, path)
                conn.execute(_PRUNE_ALL)
            with _transaction(conn):
                self._log.load(conn)  # counters and cursors, never the rows
            snapshot.log_last_offset = self._log.last_offset
            snapshot.stream_cursors = {
                (client_id, topic_filter): position for client_id, topic_filter, position
                in conn.execute("SELECT client_id, topic_filter, position FROM stream_cursors")}
            self.quarantined_at_open = quarantined
            self._check_size_sync()
        except sqlite3.Error as error:
            raise _store_error(path, "open", error) from None
        self._delivery_hwm = max((d.delivery_id for d in snapshot.deliveries), default=0)
        self._message_hwm = max(snapshot.messages, default=0)
        return snapshot

    def _keep_copy_sync(self, conn: sqlite3.Connection, version: int) -> None:
        """Before upgrading a file written by an earlier release: a consistent copy of it
        beside it, `<name>.pre-v<version>`, so a failed upgrade can be rolled back (stop the
        broker, put the copy back under the store's name, run the earlier release)."""
        target = self.path.with_name(f"{self.path.name}.pre-v{version}")
        if target.exists():
            return  # an earlier attempt made it: keep the first copy
        partial = target.with_name(target.name + ".partial")
        copy = sqlite3.connect(str(partial))
        try:
            conn.backup(copy)
        finally:
            copy.close()
        os.replace(partial, target)
        log.info("%s: kept a copy of the schema version %d store as %s before upgrading",
                 self.path, version, target)

    def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _close_sync(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if self._failed is None:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            log.warning("%s: checkpoint at close failed: %s", self.path, error)
        self._conn = None
        try:
            conn.close()
        except sqlite3.Error as error:
            raise _store_error(self.path, "close", error) from None

    def _write_sync(self, plan: _Plan) -> None:
        """One group, one transaction. On an error it is rolled back and the error raised."""
        conn = self._db()
        self._commit_attempts += 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in plan.deletes:
                conn.executemany(sql, rows)
            if plan.prune_after_deletes:  # free the bodies now: the puts reuse their pages
                if plan.protect:
                    conn.executemany(_UNCANDIDATE, plan.protect)
                conn.execute(_PRUNE_CANDIDATES)
                conn.execute(_CLEAR_CANDIDATES)
            for sql, rows in plan.puts:
                conn.executemany(sql, rows)
            if plan.log:
                self._log.append(conn, plan.log, [m.offset for m in plan.log])
            if plan.prune_after_puts:
                conn.execute(_PRUNE_CANDIDATES)
                conn.execute(_CLEAR_CANDIDATES)
            hook = SqliteStore.before_commit  # a test's fault injection; None in production
            if hook is not None:
                hook(self._commit_attempts)
            conn.commit()
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            if plan.log:  # the log's memory is ahead of the file: read it again
                with contextlib.suppress(sqlite3.Error):
                    self._log.load(conn)
            raise

    def _checkpoint_sync(self) -> bool:
        """Copy the WAL into the file and truncate it, giving its disk space back (the WAL
        keeps its largest size otherwise). True if the WAL file got smaller."""
        wal = Path(f"{self.path}-wal")
        before = wal.stat().st_size if wal.exists() else 0
        try:
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as error:
            log.warning("%s: checkpoint failed: %s", self.path, error)
        after = wal.stat().st_size if wal.exists() else 0
        return after < before

    def _check_size_sync(self) -> None:
        pages, free, page_size = self._db().execute(_SELECT_SIZE).fetchone()
        self._used_bytes = (pages - free) * page_size
        self._free_bytes = free * page_size
        self._size_checked_at = time.monotonic()

    def _stats_sync(self) -> tuple[int, int, int, float | None, int]:
        counts = _query_counts(self._db())
        quarantined = int(_scalar(self._db(), _SELECT_QUARANTINED))
        self._check_size_sync()
        return (*counts, quarantined)

    def _retention_sync(self) -> None:
        self._log.retention(self._db())

    def _vacuum_sync(self) -> None:
        conn = self._db()
        self._vacuumed_at = time.monotonic()
        # Not execute(): the pragma returns an empty row per page, and Python's sqlite3 stops
        # after the first (one page freed); executescript() steps it to the end.
        conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
        self.vacuum_steps += 1
        self._check_size_sync()

    async def _query(self, sql: str) -> list[Any]:
        """Run one statement in the database thread (maintenance and tests)."""
        return await self._call(lambda: self._db().execute(sql).fetchall())

    # -- the writer ---------------------------------------------------------------------

    async def _run_writer(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                try:
                    await self._idle()
                except Exception:  # a bug in maintenance must not stop the commits
                    log.exception("%s: store maintenance failed", self.path)
                    self._wakeup.clear()
                    if not self._queue and not self._closing:
                        await self._wakeup.wait()
                continue
            group = self._take()
            self._busy = True
            try:
                await self._commit_group(group)
            except Exception as error:  # a bug: fail the group, keep the writer alive
                log.exception("%s: store writer failed", self.path)
                _fail(group, StoreError(f"{self.path}: store writer failed: {error!r}"))
            finally:
                self._busy = False
            if self._log.retention_wanted(time.monotonic()) and not self._closing:
                # Under steady load the writer is never idle: retention steps (bounded,
                # short) then run between groups, so streams never lag their bounds.
                try:
                    await self._maintain(self._retention_sync)
                except Exception:
                    log.exception("%s: stream retention failed", self.path)

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        count = 0
        queue = self._queue
        while queue and (not group or count < MAX_GROUP_CHANGES):
            item = queue.popleft()
            group.append(item)
            count += len(item[0])
        self._queued_changes -= count
        return group

    async def _idle(self) -> None:
        """Wait for work; between batches, do maintenance (size checks, vacuum, ballast)."""
        self._wakeup.clear()
        if self._queue or self._closing:
            return
        self._check_file()
        now = time.monotonic()
        timeout = FILE_CHECK_S
        if self.full:
            if now - self._size_checked_at >= FULL_RECHECK_S:
                await self._maintain(self._check_size_sync)
            timeout = min(timeout, FULL_RECHECK_S)
        elif now - self._size_checked_at >= SIZE_CHECK_S:
            await self._maintain(self._check_size_sync)
        if self._vacuum_wanted():
            if now - self._vacuumed_at >= VACUUM_INTERVAL_S:
                await self._maintain(self._vacuum_sync)
            timeout = min(timeout, VACUUM_INTERVAL_S)
        if self._log.retention_wanted(now):
            # Streams' retention and compaction, one bounded step between groups.
            await self._maintain(self._retention_sync)
            if self._log.retention_more:
                timeout = 0.0
        if self._queue or self._closing:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _check_file(self, group: list[_Pending] | None = None) -> None:
        """Is the file still under its name (sqlite_guard.py)? When it stops being, fail
        `group` (just committed) and every batch queued: they may accept QoS 1/2 messages,
        and no acknowledgement may follow once the file is known to be gone. Batches handed
        in later are committed and resolved as usual: the server refuses new QoS 1/2
        messages meanwhile (`full`), and the acks and deliveries of what is queued in memory
        go on."""
        was_lost = self._guard.lost
        if not self._guard.check() or was_lost:
            return
        failure = StoreError(f"{self.path}: the store file was deleted or replaced; "
                             f"not acknowledged")
        if group is not None:
            _fail(group, failure)
        for _, future in self._queue:
            if future is not None and not future.done():
                future.set_exception(failure)

    def _vacuum_wanted(self) -> bool:
        if not self._auto_vacuum:
            return False
        if self._disk_full or self._disk_tight:  # every page given back counts now
            return self._free_bytes >= VACUUM_STEP_PAGES * 1024
        if self._free_bytes < VACUUM_MIN_FREE_BYTES:
            return False
        total = self._used_bytes + self._free_bytes
        return self._free_bytes >= VACUUM_MIN_FREE_RATIO * total

    async def _maintain(self, work: Callable[[], None]) -> None:
        try:
            await self._call(work)
        except sqlite3.Error as error:
            log.warning("%s: store maintenance failed: %s", self.path, error)
        self._check_disk()
        if self._disk_full or self._disk_tight:
            await self._recover_space()

    def _check_disk(self) -> None:
        """Report the disk full early, while there is still room to commit the acks that
        drain the queues: under `disk_reserve_bytes` free, until twice that is free."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return
        free = stat.f_bavail * stat.f_frsize
        if free < self.disk_reserve_bytes and not self._disk_tight:
            self._disk_tight = True
            log.warning("%s: only %d bytes free on the disk (reserve %d): new work refused",
                        self.path, free, self.disk_reserve_bytes)
        elif free >= 2 * self.disk_reserve_bytes and self._disk_tight:
            self._disk_tight = False
            log.info("%s: %d bytes free on the disk again", self.path, free)

    async def _recover_space(self) -> None:
        """While space is short: keep the WAL truncated (in WAL mode committed data waits
        there, and copying it into the file needs room); after SQLITE_FULL, `full` clears
        once the ballast could be recreated."""
        await self._call(self._checkpoint_sync)
        if not self._disk_full:
            return
        if self.ballast_bytes and not self.ballast_path.exists():
            made = await asyncio.to_thread(_make_ballast, self.ballast_path, self.ballast_bytes)
            if not made:
                return
            log.info("%s: disk space is back; ballast recreated", self.path)
        self._disk_full = False
        self._check_disk()

    async def _commit_group(self, group: list[_Pending]) -> None:
        delay = 0.05
        quick_retries = 0  # disk full: retries made at once after making room
        while True:
            try:
                plan = self._plan(group)
            except Exception as error:
                _fail(group, StoreError(f"{self.path}: cannot store a batch: {error!r}"))
                return
            if plan.empty:  # empty batches, or everything coalesced away
                _resolve(group)
                self.batches += plan.batches
                self.changes_written += plan.changes
                return
            try:
                await self._call(self._write_sync, plan)
            except sqlite3.Error as error:
                code = _code(error)
                if code == _SQLITE_FULL:
                    if not self._disk_full:
                        log.warning("%s: the disk is full; the store keeps %d batch(es) and "
                                    "retries", self.path, len(group))
                    self._disk_full = True
                    # Make room, cheapest first, each followed by one immediate retry: give
                    # the WAL's disk space back (checkpoint + truncate), then the ballast.
                    if quick_retries == 0 and await self._call(self._checkpoint_sync):
                        quick_retries = 1
                        continue
                    if quick_retries < 2 and self._drop_ballast():
                        quick_retries = 2
                        await self._call(self._checkpoint_sync)
                        continue
                    quick_retries = 2
                    await self._call(self._checkpoint_sync)  # before each later retry
                elif code not in _RETRYABLE:
                    failure = _store_error(self.path, "commit", error)
                    self._failed = failure
                    log.error("%s", failure)
                    _fail(group, failure)
                    self._fail_queue(failure)
                    return
                if self._closing:
                    kind = StoreFullError if code == _SQLITE_FULL else StoreError
                    failure = kind(
                        f"{self.path}: closing while commits keep failing; {len(group)} "
                        f"batch(es) not stored (and not acknowledged): {error}")
                    _fail(group, failure)
                    self._fail_queue(failure)
                    return
                await self._backoff(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                group.extend(self._take())  # retry together with what queued meanwhile
                continue
            break
        # Committed.
        self.commits += 1
        if self.durability == "fsync":
            self.fsyncs += 1
        self.batches += plan.batches
        self.changes_written += plan.changes
        self.rows_written += plan.rows
        self._delivery_hwm = max(self._delivery_hwm, plan.max_delivery_id)
        self._message_hwm = max(self._message_hwm, plan.max_message_id)
        self._check_file(group)  # two stat calls
        # Before the acks go out, so `full` already reflects this commit then.
        if self.max_store_bytes or self._disk_full or self._disk_tight:
            await self._maintain(self._check_size_sync)
        else:
            self._check_disk()  # one statvfs: cheap
            if self._disk_tight:
                await self._recover_space()
        _resolve(group)

    async def _backoff(self, delay: float) -> None:
        """Wait before a retry; only close() cuts the wait short (new batches join the
        retry, they do not hasten it: no storm of failing transactions)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _drop_ballast(self) -> bool:
        try:
            self.ballast_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            log.warning("%s: cannot delete the ballast file: %s", self.path, error)
            return False
        log.warning("%s: deleted the ballast file to make room", self.path)
        return True

    def _fail_queue(self, failure: StoreError) -> None:
        while self._queue:
            _, future = self._queue.popleft()
            if future is not None and not future.done():
                future.set_exception(failure)
        self._queued_changes = 0

    def _failed_future(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            future.set_exception(self._failed)
        else:
            future.set_exception(StoreError(f"{self.path}: the store is not open (or closing)"))
        return future

    def _plan(self, group: list[_Pending]) -> _Plan:
        """Coalesce a group of batches: the final state of every key the group touched."""
        sessions: dict[str, SessionRecord | None] = {}
        subscriptions: dict[str, dict[str, SubscriptionRecord | None]] = {}
        deliveries: dict[str, dict[int, DeliveryRecord | None]] = {}
        qos2: dict[str, dict[int, bool]] = {}
        messages: dict[int, Message] = {}
        retained: dict[str, int | None] = {}
        cascade: dict[str, None] = {}
        appended: list[Message] = []
        cursors: dict[tuple[str, str], str | None] = {}
        changes = batches = 0
        for batch, _ in group:
            if not batch:
                continue
            batches += 1
            changes += len(batch)
            for change in batch:
                if isinstance(change, DeliverySaved):
                    saved = change.record
                    per_client = deliveries.get(saved.client_id)
                    if per_client is None:
                        per_client = deliveries[saved.client_id] = {}
                    per_client[saved.delivery_id] = saved
                elif isinstance(change, MessageSaved):
                    messages[change.message.id] = change.message
                elif isinstance(change, DeliveryDeleted):
                    per_client = deliveries.get(change.client_id)
                    if per_client is None:
                        per_client = deliveries[change.client_id] = {}
                    per_client[change.delivery_id] = None
                elif isinstance(change, Qos2Received | Qos2Released):
                    packets = qos2.get(change.client_id)
                    if packets is None:
                        packets = qos2[change.client_id] = {}
                    packets[change.packet_id] = isinstance(change, Qos2Received)
                elif isinstance(change, LogAppended):
                    appended.append(change.message)
                elif isinstance(change, StreamCursorSaved):
                    cursors[change.client_id, change.topic_filter] = change.position
                elif isinstance(change, RetainedSaved):
                    retained[change.topic] = change.message_id
                elif isinstance(change, RetainedDeleted):
                    retained[change.topic] = None
                elif isinstance(change, SessionSaved):
                    sessions[change.record.client_id] = change.record
                elif isinstance(change, SessionDeleted):
                    cid = change.client_id
                    sessions[cid] = None
                    subscriptions.pop(cid, None)
                    deliveries.pop(cid, None)
                    qos2.pop(cid, None)
                    cascade[cid] = None
                    for key in [k for k in cursors if k[0] == cid]:
                        del cursors[key]
                elif isinstance(change, SubscriptionSaved):
                    sub = change.record
                    filters = subscriptions.get(sub.client_id)
                    if filters is None:
                        filters = subscriptions[sub.client_id] = {}
                    filters[sub.topic_filter] = sub
                elif isinstance(change, SubscriptionDeleted):
                    filters = subscriptions.get(change.client_id)
                    if filters is None:
                        filters = subscriptions[change.client_id] = {}
                    filters[change.topic_filter] = None
                    if change.topic_filter.startswith("$stream/"):
                        cursors[change.client_id, change.topic_filter] = None
                else:
                    raise TypeError(f"not a change record: {change!r}")

        deletes: list[tuple[str, list[tuple[Any, ...]]]] = []
        puts: list[tuple[str, list[tuple[Any, ...]]]] = []
        if cascade:
            keys = [(cid,) for cid in cascade]
            deletes.extend((sql, keys) for sql in _CASCADE)

        sub_del = [(cid, f) for cid, filters in subscriptions.items()
                   for f, sub in filters.items() if sub is None]
        sub_put = [_subscription_row(sub) for filters in subscriptions.values()
                   for sub in filters.values() if sub is not None]

        hwm = self._delivery_hwm
        max_delivery_id = 0
        referenced: set[int] = set()
        repointable = False  # a put may re-point an existing row to another body
        del_del: list[tuple[str, list[int]]] = []  # per client
        del_put: list[tuple[Any, ...]] = []
        for cid, per_client in deliveries.items():
            gone: list[int] = []
            for did, record in per_client.items():
                if record is None:
                    if did <= hwm:  # otherwise it was never written: nothing to delete
                        gone.append(did)
                else:
                    del_put.append(_delivery_row(record))
                    referenced.add(record.message_id)
                    if did > max_delivery_id:
                        max_delivery_id = did
                    if did <= hwm:
                        repointable = True
            if gone:
                del_del.append((cid, gone))

        q2_del = [(cid, p) for cid, packets in qos2.items() for p, on in packets.items() if not on]
        q2_put = [(cid, p) for cid, packets in qos2.items() for p, on in packets.items() if on]
        ret_del = [(topic,) for topic, mid in retained.items() if mid is None]
        ret_put = [(topic, mid) for topic, mid in retained.items() if mid is not None]
        referenced.update(mid for _, mid in ret_put)

        msg_put: list[tuple[Any, ...]] = []
        msg_update: list[tuple[Any, ...]] = []
        max_message_id = 0
        message_hwm = self._message_hwm
        for mid, message in messages.items():
            if mid in referenced:
                msg_put.append(_message_row(message))
                if mid > max_message_id:
                    max_message_id = mid
            elif mid <= message_hwm:  # may be in the file, referenced from earlier groups
                msg_update.append(_message_update_row(message))
            # else: a body nothing refers to and never written: skip it.

        # Deletions first, and the bodies they freed pruned right after them, so the puts can
        # reuse those pages (progress on a full disk: acks make room). Bodies the puts refer
        # to are protected from that early prune; the final state decides at the end.
        if sub_del:
            deletes.append((_SUBSCRIPTION_DELETE, sub_del))
        for cid, gone in del_del:
            for sql, rows in _DELIVERY_DELETE.statements([(did,) for did in gone]):
                deletes.append((sql, [(cid, *row) for row in rows]))
        for sql, rows in ((_QOS2_DELETE, q2_del), (_RETAINED_DELETE, ret_del)):
            if rows:
                deletes.append((sql, rows))
        prune_after_deletes = bool(cascade or del_del or ret_del)
        protect = ([(mid,) for mid in referenced if mid <= message_hwm]
                   if prune_after_deletes else [])
        session_put = [_session_row(s) for s in sessions.values() if s is not None]
        cursor_del = [key for key, position in cursors.items() if position is None]
        cursor_put = [(*key, position) for key, position in cursors.items()
                      if position is not None]
        if cursor_del:
            deletes.append((_CURSOR_DELETE, cursor_del))
        for sql, rows in ((_SESSION_PUT, session_put), (_SUBSCRIPTION_PUT, sub_put),
                          (_CURSOR_PUT, cursor_put)):
            if rows:
                puts.append((sql, rows))
        if msg_put:
            puts.extend(_MESSAGE_PUT.statements(msg_put))
        if msg_update:
            puts.append((_MESSAGE_UPDATE, msg_update))
        if del_put:
            puts.extend(_DELIVERY_PUT.statements(del_put))
        for sql, rows in ((_QOS2_PUT, q2_put), (_RETAINED_PUT, ret_put)):
            if rows:
                puts.append((sql, rows))
        row_count = (len(sub_del) + sum(len(g) for _, g in del_del) + len(q2_del) + len(ret_del)
                     + len(session_put) + len(sub_put) + len(msg_put) + len(msg_update)
                     + len(del_put) + len(q2_put) + len(ret_put))
        return _Plan(deletes, protect, puts, prune_after_deletes,
                     prune_after_puts=repointable or bool(ret_put),
                     max_delivery_id=max_delivery_id, max_message_id=max_message_id,
                     changes=changes, batches=batches,
                     rows=row_count + len(appended) + len(cursors),
                     log=appended)


def _resolve(group: list[_Pending]) -> None:
    for _, future in group:
        if future is not None and not future.done():
            future.set_result(None)


def _fail(group: list[_Pending], error: BaseException) -> None:
    for _, future in group:
        if future is not None and not future.done():
            future.set_exception(error)


def _make_ballast(path: Path, size: int) -> bool:
    """Reserve `size` bytes of real disk blocks in `path`. False (and no file) if no room."""
    try:
        stat = os.statvfs(path.parent)
        if stat.f_bavail * stat.f_frsize < 2 * size:
            return False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return False
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # pragma: no cover - platforms without fallocate
            chunk = b"\0" * 65536
            for _ in range(0, size, len(chunk)):
                os.write(fd, chunk)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    os.close(fd)
    return True


def _free_disk_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _file_bytes(path: Path) -> int:
    total = 0
    for name in (str(path), str(path) + "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(name).st_size
    return total


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
        raise
    conn.commit()


def _scalar(conn: sqlite3.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return row[0] if row else None


def _query_counts(conn: sqlite3.Connection) -> tuple[int, int, int, float | None]:
    sessions, queued, queued_bytes, oldest = conn.execute(_SELECT_COUNTS).fetchone()
    return int(sessions), int(queued), int(queued_bytes), oldest


def _read_rows(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    """All rows of a query; text that is not UTF-8 (bit rot) comes back as
    `validate.Undecodable` instead of failing the whole query."""
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as error:
        if "decode" not in str(error):
            raise
    conn.text_factory = validate.tolerant_text
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.text_factory = str


_ORDER: Final = {"sessions": "client_id", "subscriptions": "client_id, topic_filter",
                 "messages": "id", "deliveries": "delivery_id, client_id",
                 "retained": "topic", "incoming_qos2": "client_id, packet_id"}


def _load_checked(conn: sqlite3.Connection, path: Path) -> tuple[Snapshot, int]:
    """Read and check every row (sqlite_validate.py); move the invalid ones to the
    quarantine table and delete them. Runs inside the open's transaction."""
    rows = {table: _read_rows(conn, f"SELECT {', '.join(columns)} FROM {table}"
                                    f" ORDER BY {_ORDER[table]}")
            for table, columns in validate.COLUMNS.items()}
    snapshot, quarantined = validate.check_rows(rows)
    if not quarantined:
        return snapshot, 0
    now = time.time()
    per_table: dict[str, int] = {}
    for number, entry in enumerate(quarantined):
        key = entry.key
        where = " AND ".join(
            f"CAST({name} AS BLOB) = ?" if isinstance(value, validate.Undecodable)
            else f"{name} = ?" for name, value in key.items())
        params = [bytes(v) if isinstance(v, validate.Undecodable) else v for v in key.values()]
        conn.execute("INSERT INTO quarantine (at, table_name, row_key, client_id, reason,"
                     " row_json) VALUES (?, ?, ?, ?, ?, ?)",
                     (now, entry.table, entry.describe_key(), entry.client_id, entry.reason,
                      validate.row_json(entry)))
        if entry.will_only:
            conn.execute("UPDATE sessions SET will_topic = NULL, will_payload = NULL,"
                         " will_qos = NULL, will_retain = NULL, will_properties = NULL"
                         f" WHERE {where}", params)
        else:
            conn.execute(f"DELETE FROM {entry.table} WHERE {where}", params)
        per_table[entry.table] = per_table.get(entry.table, 0) + 1
        if number < validate.LOG_DETAIL_LIMIT:
            log.warning("%s: quarantined %s row (%s%s): %s", path,
                        entry.table + (" will" if entry.will_only else ""),
                        f"client {entry.client_id}" if entry.client_id is not None else "",
                        (", " if entry.client_id is not None and len(entry.key) > 1 else "")
                        + entry.describe_key(client=False), entry.reason)
    dependent = sum(1 for e in quarantined if e.dependent)
    log.warning("%s: %d invalid stored row(s) moved to the table 'quarantine' (%s; %d of them "
                "because a row they need was quarantined or missing)%s; everything else is "
                "served", path, len(quarantined),
                ", ".join(f"{t}: {n}" for t, n in sorted(per_table.items())), dependent,
                f"; only the first {validate.LOG_DETAIL_LIMIT} are logged one by one"
                if len(quarantined) > validate.LOG_DETAIL_LIMIT else "")
    return snapshot, len(quarantined)


# --------------------------------------------------------------------------- read-only helpers
#
# For the admin CLI, in another process while the broker runs: each call opens the file with
# mode=ro (WAL: a consistent snapshot that neither blocks nor is blocked by the writer), in a
# worker thread, and closes it again.

_SESSION_INFO: Final = (
    "SELECT s.client_id, s.protocol_level, s.expiry_interval, s.disconnected_at,"
    " s.will_topic IS NOT NULL,"
    " (SELECT count(*) FROM subscriptions u WHERE u.client_id = s.client_id),"
    " (SELECT count(*) FROM deliveries d WHERE d.client_id = s.client_id),"
    " (SELECT coalesce(sum(length(m.payload)), 0) FROM deliveries d"
    "  JOIN messages m ON m.id = d.message_id WHERE d.client_id = s.client_id)"
    " FROM sessions s"
)


def _session_info(row: Sequence[Any]) -> SessionInfo:
    return SessionInfo(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])


def _read_only(path: Path, read: Callable[[sqlite3.Connection, int], _T], doing: str) -> _T:
    if not path.is_file():
        raise StoreError(f"{path}: no such store file")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as error:
        raise _store_error(path, "cannot open read-only", error) from None
    try:
        version = _scalar(conn, "PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path}: the store has schema version {version}, newer than the "
                             f"{SCHEMA_VERSION} this edge-broker knows")
        conn.execute("BEGIN")  # one consistent view over the queries
        return read(conn, version)
    except sqlite3.Error as error:
        raise _store_error(path, doing, error) from None
    except validate.BadRow as error:  # quarantined at the broker's next start
        raise StoreError(f"{path}: {doing}: a stored row is invalid ({error}); the broker "
                         f"moves it to the quarantine table when it starts") from None
    finally:
        conn.close()


def _read_sessions(conn: sqlite3.Connection, version: int) -> list[SessionInfo]:
    if version == 0:
        return []
    return [_session_info(r) for r in conn.execute(_SESSION_INFO + " ORDER BY s.client_id")]


def _read_session(client_id: str, conn: sqlite3.Connection,
                  version: int) -> SessionDetail | None:
    if version == 0:
        return None
    info = conn.execute(_SESSION_INFO + " WHERE s.client_id = ?", (client_id,)).fetchone()
    if info is None:
        return None
    record, _ = validate.session_record(conn.execute(
        _SELECT_SESSIONS + " WHERE client_id = ?", (client_id,)).fetchone())
    subscriptions = [validate.subscription_record(r) for r in conn.execute(
        _SELECT_SUBSCRIPTIONS + " WHERE client_id = ? ORDER BY topic_filter", (client_id,))]
    deliveries = [
        QueuedDelivery(validate.delivery_record(r[:9]), r[9], r[10], r[11])
        for r in conn.execute(
            "SELECT d.client_id, d.delivery_id, d.message_id, d.qos, d.retain,"
            " d.subscription_ids, d.packet_id, d.state, d.dup, m.topic,"
            " length(m.payload), m.received_at FROM deliveries d"
            " JOIN messages m ON m.id = d.message_id WHERE d.client_id = ?"
            " ORDER BY d.delivery_id", (client_id,))]
    incoming = [int(r[0]) for r in conn.execute(
        "SELECT packet_id FROM incoming_qos2 WHERE client_id = ? ORDER BY packet_id",
        (client_id,))]
    return SessionDetail(_session_info(info), record, subscriptions, deliveries, incoming)


def _read_stats(path: Path, conn: sqlite3.Connection, version: int) -> StoreStats:
    pages, free, page_size = conn.execute(_SELECT_SIZE).fetchone()
    counts = (0, 0, 0, None) if version == 0 else _query_counts(conn)
    quarantined = _scalar(conn, _SELECT_QUARANTINED) if version >= 2 else 0
    return StoreStats(sessions=counts[0], queued_messages=counts[1], queued_bytes=counts[2],
                      oldest_message_at=counts[3], file_bytes=_file_bytes(path),
                      used_bytes=(pages - free) * page_size, free_bytes=free * page_size,
                      quarantined=int(quarantined))


async def read_sessions(path: str | Path) -> list[SessionInfo]:
    """Every stored session, by client id (read-only; safe while the broker runs)."""
    return await asyncio.to_thread(_read_only, Path(path), _read_sessions, "read sessions")


async def read_session(path: str | Path, client_id: str) -> SessionDetail | None:
    """One session with its subscriptions and queue, or None (read-only)."""
    return await asyncio.to_thread(_read_only, Path(path),
                                   functools.partial(_read_session, client_id), "read session")


async def read_stats(path: str | Path) -> StoreStats:
    """Sizes and queue totals of a store file (read-only); the counters are 0."""
    return await asyncio.to_thread(_read_only, Path(path),
                                   functools.partial(_read_stats, Path(path)), "read stats")
