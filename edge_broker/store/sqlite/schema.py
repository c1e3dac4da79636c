"""The schema, its migrations, and the triggers and statements that prune unreferenced bodies.

*Schema* (as mosquitto's persistence): a message body is stored once in `messages`; each
client that must receive it has a row in `deliveries` referring to it; `sessions`,
`subscriptions`, `retained` (topic -> message id) and `incoming_qos2` (client, packet id) hold
the rest; `quarantine` (version 2) the rows found invalid at open (opening.py); the log of
named streams and `stream_cursors` (version 3) the streams (store/log/, docs/log.md);
`sessions.username` (version 5) who a session's last connection authenticated as;
`log_reader_ranges` (version 6) what an UNSUBSCRIBE left to read in a session's backlog.

*Pruning.* A body no delivery and no retained entry refers to is deleted in the same
transaction that dropped its last reference: temporary triggers (`_TEMP_SCHEMA`, per
connection, never in the file) note the message id of every deleted or re-pointed
delivery/retained row in the in-memory table `temp.prune_candidates`, and a prune statement
deletes those candidates that nothing refers to (plan.py decides when, writer.py runs it). So
the file holds no orphan bodies after any commit, `open()` returns none, and steady traffic
reuses the same pages instead of growing the file.

*Rule for the core* (what makes pruning safe): a body is kept only while something refers to
it, checked at the end of each transaction. A `DeliverySaved`/`RetainedSaved` must therefore
refer to a message saved in the same batch, or to one that was referenced at the end of the
previous batch. Should a core break it anyway, `open()` moves the deliveries and retained
entries whose body is missing to the quarantine table (with a warning): those messages are
lost, the restart is not.

*Migrations*: `MIGRATIONS[i]` takes the schema from version i to i+1 (`PRAGMA user_version`);
opening.py runs them.
"""

from __future__ import annotations

from typing import Final

from ..log.schema import MIGRATION as LOG_MIGRATION
from ..log.schema import RANGES_MIGRATION, READERS_MIGRATION

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
    # version 1 -> 2: rows found invalid at open are moved here (validate.py).
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
    # version 3 -> 4: persistent sessions' backlogs are readers of the log (core/backlog.py,
    # store/log/backlogs.py): an in-flight entry keeps its QoS, retain, ids and DUP. Queued
    # delivery rows of an earlier version stay as they are, and are sent first.
    READERS_MIGRATION,
    # version 4 -> 5: the username a session's last connection authenticated as (NULL:
    # anonymous, and every session of an earlier version), so that a will published after
    # a restart is authorised as its user, not as an anonymous client.
    ("ALTER TABLE sessions ADD COLUMN username TEXT",),
    # version 5 -> 6: the ranges an UNSUBSCRIBE (or a SUBSCRIBE replacing a subscription)
    # left to read in a session's backlog (store/log/schema.py), so that a restart delivers
    # them. A file of an earlier version has none stored (they were lost at a restart).
    RANGES_MIGRATION,
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
