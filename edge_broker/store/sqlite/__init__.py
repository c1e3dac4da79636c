"""The SQLite session store: one SQLite file (WAL, one writer task, group commit).

Theory of operation, and where each part lives
-----------------------------------------------
Two shapes hold what sessions are owed. An OFFLINE persistent session's messages (and every
named stream's) are rows of one append-only log, one row per message however many sessions and
streams take it; a session is a reader of it: a cursor, its subscriptions as filters, its in-
flight entries and its counters (store/log/, docs/log.md; the core's side is core/backlog.py).
The log's records (`LogAppended`, then the readers' records) are applied in the group
transaction after the other puts; open() reads the readers, never the rows, and pages are read
for a reconnected session (`read_backlog`) as for a stream's replay. A CONNECTED session's
messages (and shared subscriptions', and those of a store from before version 4) take the
second shape: a message body is stored once; each client that must receive it has a delivery
row referring to it, and a body nothing refers to any more is pruned in the transaction that
dropped its last reference, so the file holds no orphans and steady traffic reuses its pages
(schema.py, with the rule the core must keep for that to be safe). `apply(changes)` only queues
the batch; one writer task takes every queued batch as a group, coalesces it (plan.py) and
commits it in ONE transaction, one hop to the single database thread, then resolves the
batches' futures in order: N concurrent publishers cost one commit (one fsync) per group
(writer.py, state.py). Durability "fsync", "os" or "none" decides what a resolved batch
survives (store.py).

Between groups the writer checks sizes, vacuums free pages back to the file system and runs the
streams' retention in bounded steps (maintenance.py). `full`, which makes the server refuse new
QoS>0 work, covers the size bound, a nearly full disk, SQLITE_FULL (rolled back and retried
after giving the WAL's space and then a ballast file back; never dropped) and the file deleted
or replaced under the running store (space.py, with the flock and the file identity of
guard.py).

`open()` checks the file (`quick_check` of every table but the log's rows: damage points at
`--recover`, which moves it aside), migrates the schema (keeping a copy of the older file), and
moves rows that fail validation (validate.py) to the quarantine table instead of refusing to
start (opening.py). A commit torn by a crash is simply absent after restart; tests tear one
with the `before_commit` hook (writer.py). The admin CLI reads a running broker's file read-
only (readonly.py).

Files: `store.py` SqliteStore and its public API; `state.py` the shared state and the hop to
the database thread; `opening.py` open, migrations, quarantine; `schema.py` the schema,
migrations and pruning; `sql.py` statements, codecs, sqlite3 error mapping; `plan.py`
coalescing a group; `writer.py` the writer task and its transaction; `maintenance.py` idle
work; `space.py` full storage and the file guard's checks; `guard.py` the flock and file
identity; `validate.py` checking rows read back; `readonly.py` stats and admin reads.
"""

from .readonly import (
    QueuedDelivery,
    SessionDetail,
    SessionInfo,
    StoreStats,
    read_session,
    read_sessions,
    read_stats,
)
from .schema import MIGRATIONS, SCHEMA_VERSION
from .space import DISK_RESERVE_BYTES
from .store import SqliteStore

__all__ = [
    "DISK_RESERVE_BYTES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "QueuedDelivery",
    "SessionDetail",
    "SessionInfo",
    "SqliteStore",
    "StoreStats",
    "read_session",
    "read_sessions",
    "read_stats",
]
