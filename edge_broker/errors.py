"""Errors of the application layers (configuration, storage, bridges)."""

from __future__ import annotations


class EdgeBrokerError(Exception):
    """Base of every error edge-broker raises on purpose."""


class ConfigError(EdgeBrokerError):
    """A configuration file or flag is wrong. The message names file, table and key."""

    def __init__(self, message: str, *, file: str | None = None, table: str | None = None,
                 key: str | None = None) -> None:
        where = []
        if file is not None:
            where.append(file)
        if table is not None or key is not None:
            dotted = ".".join(p for p in (table, key) if p)
            where.append(f"[{table}] {key}" if table and key else dotted)
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file = file
        self.table = table
        self.key = key


class StoreError(EdgeBrokerError):
    """The session store failed. Raised only by store implementations."""


class StoreDamagedError(StoreError):
    """The store file is not a database or is damaged: only this is moved aside by --recover
    (not a store that cannot be opened for another reason: disk full, I/O, permissions)."""


class StoreFullError(StoreError):
    """The store reached `max_store_bytes` or the disk is full; new QoS>0 work is refused."""


class StoreInUseError(StoreError):
    """Another process (another broker) holds the store file: restarting cannot help."""


class BridgeError(EdgeBrokerError):
    """A bridge could not be configured or started."""
