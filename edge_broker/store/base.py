"""The store interface: what the server needs from a persistence backend.

A store applies batches of change records (core/changes.py) in order and rebuilds a
`Snapshot` at start-up. `apply` returns an awaitable that resolves once that batch AND every
batch handed in before it are durable (as durable as the store promises); the server sends
acknowledgements only after that. An empty batch therefore waits for the batches before it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator, Sequence
from typing import Any, Protocol

from ..core.changes import Change, Snapshot

__all__ = ["DONE", "SessionStore", "Snapshot"]


class SessionStore(Protocol):
    @property
    def full(self) -> bool:
        """True while the store cannot take new work (size cap or disk full); the server
        refuses new QoS 1/2 messages meanwhile. Clears by itself when space returns."""
        ...

    async def open(self) -> Snapshot:
        """Open (creating or migrating as needed) and return everything stored."""
        ...

    def apply(self, changes: Sequence[Change]) -> Awaitable[None]:
        """Persist one batch; the awaitable resolves when it and all earlier ones committed."""
        ...

    async def close(self) -> None:
        """Flush what is pending and release the backend."""
        ...


class _Done:
    """An awaitable that is already complete (no event-loop round trip)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


DONE: Awaitable[None] = _Done()
