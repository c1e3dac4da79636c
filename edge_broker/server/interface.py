"""What the connection handlers and the admin server need of the broker, as protocols.

`BrokerApp` (app.py) builds a `ClientHandler` (client.py) for every connection and an
`AdminServer` (admin.py) for the admin socket, and both call back into it. They depend on the
protocols here, which `BrokerApp` implements (structurally: app.py need not import this
module), not on app.py itself. Nothing they import leads back to app.py, not even imports for
type checking (tests/unit/test_layering.py checks it), so there is no import cycle through
the app, and each can be read, and tested, without it.

`ClientHost` is generic in the handler type: client.py and gate.py use
`ClientHost[ClientHandler]`, so this module need not import client.py either. streams.py (the
replay of `$stream/` history and the admin's `streams.*` commands) uses `AdminHost`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..config import Config
from ..core.broker import BrokerCore, ConnectResult
from ..mqtt.packets import Connect, Packet, Publish
from ..mqtt.types import ReasonCode
from ..store.base import SessionStore
from .metrics import Metrics

if TYPE_CHECKING:
    from .gate import Gate

_H = TypeVar("_H")


class ClientHost(Protocol[_H]):
    """The broker as a connection handler (`_H`: client.py, client_guard.py) and its gate
    (gate.py) see it."""

    config: Config
    core: BrokerCore
    store: SessionStore
    metrics: Metrics
    gate: Gate
    connections: set[_H]  # every open connection
    incomplete_bytes: int  # buffered in all connections for packets not handled yet
    qos0_encodings: dict[int, dict[int, tuple[Publish, bytes]]]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def new_client_id(self) -> str: ...

    def attach(self, handler: _H, packet: Connect, client_id: str, receive_maximum: int,
               now: float, username: str | None = None) -> ConnectResult: ...

    def note_buffered(self, delta: int) -> None: ...

    def note_refused_for_full_store(self, client_id: str) -> None: ...

    def connection_closed(self, handler: _H) -> None: ...

    def detach(self, handler: _H, *, reason_code: int | None,
               session_expiry_interval: int | None) -> None: ...

    def finish_batch(self, handler: _H | None, replies: list[Packet | int], *,
                     close: bool = False) -> None: ...

    def commit_now_or_later(self, then: Callable[[], None]) -> bool: ...


class ConnectedClient(Protocol):
    """A connected client as the admin server and the stream replay see it."""

    def kick(self, reason: ReasonCode, *, linger: bool = True) -> None: ...

    def pump(self) -> None: ...


class StatusSource(Protocol):
    """The broker's observer as the admin server sees it (observe.py)."""

    def status(self) -> dict[str, Any]: ...

    async def full_status(self) -> dict[str, Any]: ...

    def flat_metrics(self) -> dict[str, float]: ...


class BridgesSource(Protocol):
    """The bridges as the admin server sees them (bridges.py: the `bridges` command)."""

    def to_dict(self) -> dict[str, Any]: ...

    def backlogs_giving_way(self) -> list[tuple[str, int]]: ...

    def store_acked(self) -> None: ...

    def backlog_gave_way(self, reader: str, offset: int, count: int, after: int) -> bool: ...


class AdminHost(Protocol):
    """The broker as the admin server and the streams' replay (streams.py) see it."""

    @property
    def config(self) -> Config: ...

    @property
    def core(self) -> BrokerCore: ...

    @property
    def store(self) -> SessionStore: ...

    @property
    def clients(self) -> Mapping[str, ConnectedClient]: ...  # connected client id -> its connection

    @property
    def observer(self) -> StatusSource: ...

    @property
    def bridges(self) -> BridgesSource: ...

    async def commit(self) -> None: ...

    async def store_stats(self) -> dict[str, object]: ...
