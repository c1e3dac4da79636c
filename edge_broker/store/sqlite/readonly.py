"""Statistics and the admin CLI's read-only views of a store file.

`StoreStats` is what `SqliteStore.stats()` and `read_stats` report; `stats()` counts the queue
with a scan of `deliveries`: call it seconds apart, not per batch. `read_sessions`,
`read_session` and `read_stats` are for the admin CLI, in another process while the broker
runs: each call opens the file with `mode=ro` in a worker thread (WAL: a consistent snapshot
that neither blocks nor is blocked by the writer; the store's flock does not stop it) and
closes it again. A row that fails validation is reported, not served: the broker quarantines
it at its next start (opening.py).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

from ...core.changes import DeliveryRecord, SessionRecord, SubscriptionRecord
from ...errors import StoreError
from ..log.backlogs import session_backlogs, session_preview
from . import validate
from .schema import SCHEMA_VERSION
from .sql import (
    _SELECT_QUARANTINED,
    _SELECT_SESSIONS,
    _SELECT_SESSIONS_V4,
    _SELECT_SIZE,
    _SELECT_SUBSCRIPTIONS,
    _file_bytes,
    _query_counts,
    _scalar,
    _store_error,
)

_T = TypeVar("_T")

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


def _session_info(row: Sequence[Any],
                  backlogs: dict[str, tuple[int, int, float | None]] | None = None
                  ) -> SessionInfo:
    """Version 4 on, an offline session's queue is also its backlog in the log."""
    queued, size, _ = (backlogs or {}).get(row[0], (0, 0, None))
    return SessionInfo(row[0], row[1], row[2], row[3], bool(row[4]), row[5],
                       row[6] + queued, row[7] + size)


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
    backlogs = session_backlogs(conn) if version >= 4 else None
    return [_session_info(r, backlogs)
            for r in conn.execute(_SESSION_INFO + " ORDER BY s.client_id")]


def _read_session(client_id: str, conn: sqlite3.Connection,
                  version: int) -> SessionDetail | None:
    if version == 0:
        return None
    info = conn.execute(_SESSION_INFO + " WHERE s.client_id = ?", (client_id,)).fetchone()
    if info is None:
        return None
    select = _SELECT_SESSIONS if version >= 5 else _SELECT_SESSIONS_V4
    record, _ = validate.session_record(conn.execute(
        select + " WHERE client_id = ?", (client_id,)).fetchone())
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
    backlogs = session_backlogs(conn) if version >= 4 else None
    if version >= 4:  # and the first of its backlog in the log (store/log/backlogs.py)
        deliveries += [QueuedDelivery(DeliveryRecord(client_id, 0, 0, qos, retain), topic, size,
                                      at)
                       for topic, qos, retain, size, at in session_preview(conn, client_id, 20)]
    return SessionDetail(_session_info(info, backlogs), record, subscriptions, deliveries,
                         incoming)


def _read_stats(path: Path, conn: sqlite3.Connection, version: int) -> StoreStats:
    pages, free, page_size = conn.execute(_SELECT_SIZE).fetchone()
    counts = (0, 0, 0, None) if version == 0 else _query_counts(conn, readers=version >= 4)
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
