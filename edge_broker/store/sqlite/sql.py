"""The statements the store runs, the codecs of its values, and its sqlite3 error mapping.

The statements are module constants, so sqlite3's statement cache keeps them prepared; the
hot inserts and deletes (bodies, deliveries) are `_MultiRow` statements that take up to a few
hundred rows per execution. Properties are stored as compact JSON keyed by the MQTT property
identifier (see the codecs below).

`sqlite3.Error` becomes `StoreError` (`_store_error`) in this package and nowhere else; the
package is the only part of edge-broker that imports sqlite3, with store/log/ (run by the
store on the same connection): validate.py is handed rows, guard.py uses os and fcntl.
Importing this module registers the sqlite3 adapters that make binding fast (process-wide).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Final

from ...core.changes import DeliveryRecord, Message, SessionRecord, SubscriptionRecord
from ...errors import StoreDamagedError, StoreError, StoreFullError
from ...mqtt.properties import NO_PROPERTIES, PROPERTY_TABLE, Properties, PropertyType
from ..log.backlogs import session_backlogs

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
    " disconnected_at, will_topic, will_payload, will_qos, will_retain, will_properties,"
    " username) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
    " will_payload, will_qos, will_retain, will_properties, username FROM sessions"
)
# The same from a file of schema version 4 or below (read-only access, readonly.py).
_SELECT_SESSIONS_V4: Final = (
    "SELECT client_id, protocol_level, expiry_interval, disconnected_at, will_topic,"
    " will_payload, will_qos, will_retain, will_properties, NULL FROM sessions"
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
                None, None, None, None, None, r.username)
    return (r.client_id, r.protocol_level, r.expiry_interval, r.disconnected_at,
            will.topic, will.payload, will.qos, will.retain,
            _encode_properties(will.properties), r.username)


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


def _query_counts(conn: sqlite3.Connection,
                  readers: bool = True) -> tuple[int, int, int, float | None]:
    """Sessions, queued messages and their bytes (delivery rows, and with `readers` the
    backlogs of sessions' log readers), the oldest queued delivery row's time."""
    sessions, queued, queued_bytes, oldest = conn.execute(_SELECT_COUNTS).fetchone()
    if readers:
        for count, size, at in session_backlogs(conn).values():
            queued += count
            queued_bytes += size
            if at is not None and (oldest is None or at < oldest):
                oldest = at
    return int(sessions), int(queued), int(queued_bytes), oldest
