"""Opening the file: checks, pragmas, migrations, and the rows found invalid (quarantine).

*Open.* `_open_sync` runs `PRAGMA quick_check` on every table but the log's rows (`log` and
its index, which can hold a million messages: checking them would make start-up read the
whole file; a damaged log page is an error when it is read or written). A file that is not a
database or is damaged raises `StoreError` naming the file and pointing at `--recover`, which
calls `move_aside()` (rename the file and its -wal/-shm to `<name>.corrupt-<UTC timestamp>`)
and starts empty. A commit torn by a crash is simply absent after restart (WAL frames
without a commit record are ignored). A new file gets `auto_vacuum=INCREMENTAL`
(maintenance.py gives free pages back); every file is switched to WAL mode with the
durability's `synchronous` (store.py).

*Migrations* (schema.py): `MIGRATIONS[i]` takes the schema from version i to i+1 (`PRAGMA
user_version`), each in its own transaction with the version bump. Before a file written by an
earlier release is upgraded, a consistent copy of it is kept beside it as `<name>.pre-v<N>`
(SQLite's backup API), so a failed upgrade can be rolled back. A file with a higher version
than the code knows is refused with a `StoreError`.

*Quarantine.* A sound file with invalid rows (bit rot, a buggy version, a core that broke the
rule for bodies, schema.py) does not stop the start: every row is checked as it is read
(validate.py); invalid ones, and the rows that cannot stand without them, are moved to the
`quarantine` table in the open's transaction, logged, and counted in `stats().quarantined`;
the bodies they freed are pruned in the same transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Final

from ...core.changes import Snapshot
from ...errors import StoreError
from . import validate
from .schema import _PRUNE_ALL, _TEMP_SCHEMA, MIGRATIONS, SCHEMA_VERSION
from .sql import _damaged, _scalar, _store_error, _transaction
from .state import _SYNCHRONOUS, StoreState

log = logging.getLogger("edge_broker.store")

WAL_SIZE_LIMIT: Final = 4 * 1024 * 1024  # journal_size_limit: WAL truncated to this at reset
# Checkpoint when the WAL holds this many pages (~2 MiB, SQLite's default is 1000): committed
# data waiting in the WAL needs about as much room again in the file to be checkpointed, and
# on a full disk the ballast must cover that. No measurable cost in store_bench.
WAL_AUTOCHECKPOINT_PAGES: Final = 512
BUSY_TIMEOUT_MS: Final = 5000


class Opening(StoreState):
    """SqliteStore's opening: `_open_sync` (on the database thread) and `move_aside`."""

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

    def _open_sync(self) -> Snapshot:
        path = self.path
        try:
            conn = sqlite3.connect(str(path), isolation_level=None)
        except sqlite3.Error as error:
            raise _store_error(path, "cannot open", error) from None
        self._conn = conn
        try:
            report = _quick_check(conn)
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
                           # Builds of SQLite with SQLITE_SECURE_DELETE (Debian's, Raspberry
                           # Pi OS's) zero every freed page through the WAL: a retention
                           # step deleting N bytes then needs N bytes free on the disk, and
                           # a disk filled by the log could never be emptied (nor an SD card
                           # spared the writes).
                           "PRAGMA secure_delete = OFF",
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
                self.bridges.open_sync(conn)  # store_meta (the store id), bridge_downlink
            snapshot.log_last_offset = self._log.last_offset
            self.bridges.last_committed = self._log.last_offset
            snapshot.readers = self._log.readers(conn)  # sessions' cursors, not their rows
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
    """Read and check every row (validate.py); move the invalid ones to the
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
                         " will_qos = NULL, will_retain = NULL, will_properties = NULL,"
                         f" username = NULL WHERE {where}", params)
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


# Not checked at open (see the module docstring): the log's rows, read in pages as needed.
_UNCHECKED_AT_OPEN: Final = ("log",)


def _quick_check(conn: sqlite3.Connection) -> list[str]:
    """`PRAGMA quick_check` per table (and its indexes), but the log's rows: "ok" alone when
    sound. Start-up then reads no more of the file than the tables it loads."""
    names = [str(r[0]) for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    if not names:
        return [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
    report: list[str] = []
    for name in names:
        if name in _UNCHECKED_AT_OPEN:
            continue
        found = [str(r[0]) for r in conn.execute(f'PRAGMA quick_check("{name}")')]
        if found != ["ok"]:
            report.extend(found)
    return report or ["ok"]
