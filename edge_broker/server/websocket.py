"""MQTT over WebSocket (MQTT 5.0 section 6, MQTT 3.1.1 section 6) with the `websockets`
library's Sans-I/O layer, for listeners with `protocol = "websockets"`.

Theory of operation. `WebSocketServer` is the asyncio Protocol of the TCP (or TLS)
connection. It runs the HTTP upgrade with `websockets.server.ServerProtocol`, any path, and
then hands the MQTT protocol (a `ClientHandler`, unchanged) a `WebSocketTransport`: an
object with the asyncio Transport methods, which frames each `write` as one binary WebSocket
message and forwards flow control (pause/resume reading and writing, buffer limits) to the
connection underneath. Received binary frames are passed on as they come: the MQTT parser
reassembles packets, so one packet may span frames and one frame may carry several. No task
runs per connection, as for plain TCP.

Subprotocol: `mqtt` [MQTT-6.0.0-4] (5.0), or `mqttv3.1` for old clients; a client offering
neither is refused with HTTP 400; a client offering none is accepted (lenient, as some
clients omit it). A text frame is a protocol violation: the connection closes
[MQTT-6.0.0-1] (5.0). A malformed frame closes the connection with the WebSocket close code
the library chooses (1002, 1009...), logged as one line. An upgrade not finished within
HANDSHAKE_TIMEOUT_S is closed. A connection whose first byte cannot start an HTTP request (a
method is letters: an MQTT client speaking plain MQTT to this port sends 0x10, a TLS client
0x16) gets HTTP 400 and is closed at once, not after that timeout.

This module is imported only when a websockets listener is configured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from websockets.exceptions import NegotiationError
from websockets.frames import OP_BINARY, OP_CONT, OP_TEXT, CloseCode, Frame
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

log = logging.getLogger("edge_broker.websocket")
# The library logs every connection opened and closed at INFO; the broker logs the MQTT
# connection itself. Its warnings still show.
_library_log = logging.getLogger("edge_broker.websocket.library")
_library_log.setLevel(logging.WARNING)

SUBPROTOCOLS = (Subprotocol("mqtt"), Subprotocol("mqttv3.1"))
HANDSHAKE_TIMEOUT_S = 10.0


def _select_subprotocol(protocol: ServerProtocol,
                        offered: Sequence[Subprotocol]) -> Subprotocol | None:
    for name in SUBPROTOCOLS:
        if name in offered:
            return name
    if not offered:
        return None
    raise NegotiationError("the MQTT subprotocol is mqtt; offered: " + ", ".join(offered))


class WebSocketTransport(asyncio.Transport):
    """What `ClientHandler` writes to: one binary message per write (asyncio Transport)."""

    def __init__(self, server: WebSocketServer, request: Request,
                 subprotocol: str | None) -> None:
        super().__init__()
        self._own_extra: dict[str, Any] = {"websocket_path": request.path,
                                           "subprotocol": subprotocol}
        self._server = server
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._own_extra:
            return self._own_extra[name]
        raw = self._server.raw
        return default if raw is None else raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._server.inner = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._server.inner is not None
        return self._server.inner

    def is_closing(self) -> bool:
        raw = self._server.raw
        return self._closing or raw is None or raw.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self.is_closing():
            return
        ws = self._server.ws
        if ws.state is not OPEN:
            return
        ws.send_binary(bytes(data))
        self._server.flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("MQTT over WebSocket does not half-close")

    def close(self) -> None:
        """Send a WebSocket close (1000) after what is buffered, then close the socket."""
        if self._closing:
            return
        self._closing = True
        self._server.close(CloseCode.NORMAL_CLOSURE)

    def abort(self) -> None:
        self._closing = True
        raw = self._server.raw
        if raw is not None:
            raw.abort()

    def pause_reading(self) -> None:
        raw = self._server.raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()

    def resume_reading(self) -> None:
        raw = self._server.raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._server.raw
        return raw is not None and raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._server.raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._server.raw
        return 0 if raw is None else raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._server.raw
        return (0, 0) if raw is None else raw.get_write_buffer_limits()


class WebSocketServer(asyncio.Protocol):
    """One TCP/TLS connection of a websockets listener: the upgrade, then MQTT frames."""

    def __init__(self, inner_factory: Callable[[], asyncio.Protocol], *,
                 max_message_size: int) -> None:
        self._inner_factory = inner_factory
        self.ws = ServerProtocol(subprotocols=list(SUBPROTOCOLS),
                                 select_subprotocol=_select_subprotocol,
                                 max_size=max_message_size, logger=_library_log)
        self.raw: asyncio.Transport | None = None
        self.inner: asyncio.BaseProtocol | None = None
        self.transport: WebSocketTransport | None = None
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._text_seen = False
        self._error_logged = False
        self._started = False  # a first byte was received

    # -- the connection underneath --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S,
                                                            self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if not self._started and data:
            self._started = True
            if not data[:1].isalpha():
                self._not_http(data[0])
                return
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._upgrade(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self.flush()
        error = ws.parser_exc if self.inner is not None else ws.handshake_exc
        if error is not None and not self._error_logged:
            self._error_logged = True
            log.info("closing the WebSocket connection from %s: %s", self.peer, error)
        if ws.close_expected() and self.raw is not None and not self.raw.is_closing():
            self.raw.close()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.flush()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        inner = self.inner
        if inner is not None:
            self.inner = None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.inner is not None:
            self.inner.resume_writing()

    # -- the WebSocket ---------------------------------------------------------------------

    def flush(self) -> None:
        raw = self.raw
        if raw is None:
            return
        for data in self.ws.data_to_send():
            if data:
                if not raw.is_closing():
                    raw.write(data)
            elif not raw.is_closing():
                raw.close()  # SEND_EOF: TLS cannot half-close, so close after the buffer

    def _upgrade(self, request: Request) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        response = self.ws.accept(request)
        self.ws.send_response(response)
        self.flush()
        if response.status_code != 101:
            self._error_logged = True
            log.info("refused a WebSocket upgrade from %s (HTTP %d): %s", self.peer,
                     response.status_code, self.ws.handshake_exc)
            return
        subprotocol = response.headers.get("Sec-WebSocket-Protocol")
        self.transport = WebSocketTransport(self, request, subprotocol)
        inner = self._inner_factory()
        self.inner = inner
        inner.connection_made(self.transport)
        if self._writing_paused and self.inner is not None:
            self.inner.pause_writing()

    def _frame(self, frame: Frame) -> None:
        if frame.opcode is OP_TEXT or (frame.opcode is OP_CONT and self._text_seen):
            if not self._text_seen:
                # [MQTT-6.0.0-1] (5.0): MQTT goes in binary frames; anything else closes.
                log.info("closing the WebSocket connection from %s: a text frame "
                         "(MQTT is sent in binary frames)", self.peer)
                self._text_seen = True
                self.close(CloseCode.UNSUPPORTED_DATA)
            return
        if frame.opcode is OP_BINARY or frame.opcode is OP_CONT:
            inner = self.inner
            if inner is not None and frame.data and self.ws.state is OPEN:
                inner.data_received(bytes(frame.data))  # type: ignore[attr-defined]

    def close(self, code: int) -> None:
        ws = self.ws
        if ws.state is OPEN:
            ws.send_close(code)
            self.flush()
        raw = self.raw
        if raw is not None and not raw.is_closing():
            raw.close()  # after the buffered data, including the close frame

    def _not_http(self, first: int) -> None:
        log.info("closing %s: not an HTTP request on a WebSocket listener (first byte "
                 "0x%02X%s)", self.peer, first,
                 ": plain MQTT? use an mqtt listener" if first >> 4 == 1 else "")
        raw = self.raw
        if raw is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        body = b"This port takes MQTT over WebSocket: an HTTP upgrade request.\n"
        raw.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        raw.close()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.inner is None and self.raw is not None:
            log.info("closing %s: no WebSocket upgrade within %.0f s", self.peer,
                     HANDSHAKE_TIMEOUT_S)
            self.raw.abort()


def websocket_factory(inner_factory: Callable[[], asyncio.Protocol], *,
                      max_message_size: int) -> Callable[[], WebSocketServer]:
    """The protocol factory of a websockets listener around the MQTT protocol's factory."""
    def make() -> WebSocketServer:
        return WebSocketServer(inner_factory, max_message_size=max_message_size)

    return make
