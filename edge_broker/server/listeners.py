"""Open every configured listener: MQTT over TCP or TLS, MQTT over WebSocket plain or TLS.

`open_listeners(app)` binds one server per `[[listeners]]` entry, in file order, appending
to `app.servers` and `app.addresses` as it goes (so a failure part way closes what was
opened), and returns a `Listeners` registry. Each listener has its own settings:

- TLS when `certfile`/`keyfile` are set (`tls.ServerTls`), with a handshake timeout.
- `use_identity_as_username`: the gate (server/gate.py) takes the username from the client
  certificate's CN, and answers a CONNECT whose certificate has none with CONNACK 0x87 / 5.
- `protocol = "websockets"`: `websocket.py` (imported only then) wraps the MQTT protocol.

Per connection, the auth code asks `Listeners.listener_of(transport)` which listener it came
through (matched by the connection's local address against the bound sockets; works for the
WebSocket transport too) and `identity_of(transport)` for the client certificate's CN.
No attribute is added to `ClientHandler`: both come from the transport.

`Listeners.reload_tls()` re-reads every TLS listener's certificate, key, CA and CRL files for
new connections (SIGHUP); a file that does not load keeps that listener's previous files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..config import ListenerConfig
from ..errors import ConfigError, EdgeBrokerError
from .client import ClientHandler
from .tls import HANDSHAKE_TIMEOUT_S, ServerTls, peer_common_name

if TYPE_CHECKING:
    from .app import BrokerApp

log = logging.getLogger("edge_broker")


def listener_label(index: int) -> str:
    return f"[[listeners]] #{index + 1}"


def identity_of(transport: Any) -> str | None:
    """The subject CN of the client certificate verified on this connection, or None."""
    return peer_common_name(transport)


@dataclass(slots=True)
class Listener:
    """One opened listener."""

    config: ListenerConfig
    label: str
    server: asyncio.Server
    tls: ServerTls | None
    addresses: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        kind = "MQTT over WebSocket" if self.config.protocol == "websockets" else "MQTT"
        if self.tls is None:
            return f"{kind}, plain"
        if self.config.certificate_authentication:
            return f"{kind} over TLS, client certificate required, CN is the username"
        if self.config.require_certificate:
            return f"{kind} over TLS, client certificate required"
        return f"{kind} over TLS"


class Listeners:
    """The listeners of a running broker, for per-connection look-ups and TLS reloads."""

    def __init__(self) -> None:
        self.opened: list[Listener] = []
        # (is IPv6, port) -> [(bound address, listener)]
        self._by_port: dict[tuple[bool, int], list[tuple[str, Listener]]] = {}

    def add(self, listener: Listener) -> None:
        self.opened.append(listener)
        for sock in listener.server.sockets:
            host, port = sock.getsockname()[:2]
            listener.addresses.append((host, port))
            self._by_port.setdefault((":" in host, port), []).append((host, listener))

    def _find(self, transport: Any) -> Listener | None:
        sockname = transport.get_extra_info("sockname")
        if not isinstance(sockname, tuple) or len(sockname) < 2:
            return None
        host, port = str(sockname[0]), int(sockname[1])
        candidates = self._by_port.get((":" in host, port), [])
        wildcard = None
        for bound, listener in candidates:
            if bound == host:
                return listener
            if ipaddress.ip_address(bound).is_unspecified:
                wildcard = listener
        return wildcard

    def listener_of(self, transport: Any) -> ListenerConfig | None:
        """The settings of the listener this connection came through; None if unknown, e.g.
        once the transport is closed (uvloop then no longer knows the local address)."""
        found = self._find(transport)
        return None if found is None else found.config

    def tls_of(self, transport: Any) -> ServerTls | None:
        """The TLS state of the listener this connection came through (for revocations)."""
        found = self._find(transport)
        return None if found is None else found.tls

    def reload_tls(self) -> bool:
        """SIGHUP: read every TLS listener's files again, for new connections. Returns False
        (and logs why) when one did not load; that listener keeps what it had."""
        ok = True
        for listener in self.opened:
            if listener.tls is None:
                continue
            try:
                listener.tls.reload()
            except ConfigError as error:
                ok = False
                log.error("reload: %s; %s keeps its previous certificates", error,
                          listener.label)
            else:
                log.info("reload: %s: certificates%s read again", listener.label,
                         " and CRL" if listener.config.crlfile is not None else "")
        return ok


def websocket_module(label: str, file: str | None) -> ModuleType:
    """server/websocket.py, which needs the `websockets` package; ConfigError naming the
    listener and the pip install when it is missing (also `check-config`'s check)."""
    try:
        from . import websocket
    except ImportError:
        error = ConfigError(
            f'{label} protocol: "websockets" needs the websockets package: '
            "pip install 'edge-broker[websocket]'", file=file)
        error.table, error.key = label, "protocol"
        raise error from None
    return websocket


def _protocol_factory(app: BrokerApp, listener: ListenerConfig,
                      label: str) -> Callable[[], asyncio.Protocol]:
    factory: Callable[[], asyncio.Protocol] = partial(ClientHandler, app)
    if listener.protocol == "websockets":
        websocket_module(label, app.config.source)  # the package is there, or the error
        from .websocket import websocket_factory

        # One message may hold a whole packet plus the start of the next.
        size = 2 * app.config.mqtt.max_packet_size + 16
        return websocket_factory(factory, max_message_size=size)
    return factory


async def open_listeners(app: BrokerApp) -> Listeners:
    """Bind every configured listener; see the module docstring."""
    loop = asyncio.get_running_loop()
    registry = Listeners()
    for index, listener in enumerate(app.config.listeners):
        label = listener_label(index)
        tls = ServerTls(listener, label, app.config.source) if listener.tls else None
        factory = _protocol_factory(app, listener, label)
        try:
            server = await loop.create_server(
                factory, listener.host or None, listener.port, backlog=4096,
                reuse_address=True, ssl=None if tls is None else tls.context,
                ssl_handshake_timeout=None if tls is None else HANDSHAKE_TIMEOUT_S)
        except OSError as error:
            raise EdgeBrokerError(
                f"cannot listen on {listener.host}:{listener.port} ({label}): "
                f"{error.strerror}") from None
        app.servers.append(server)
        opened = Listener(listener, label, server, tls)
        registry.add(opened)
        for host, port in opened.addresses:
            app.addresses.append((host, port))
            log.info("listening on %s:%d (%s; MQTT 3.1, 3.1.1, 5.0)", host, port,
                     opened.describe())
    return registry
