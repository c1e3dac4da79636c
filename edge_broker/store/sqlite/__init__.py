"""The SQLite session store (see store.py for the theory of operation)."""

from .store import (
    DISK_RESERVE_BYTES,
    MIGRATIONS,
    SCHEMA_VERSION,
    QueuedDelivery,
    SessionDetail,
    SessionInfo,
    SqliteStore,
    StoreStats,
    read_session,
    read_sessions,
    read_stats,
)

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
