"""Closing a connection: functions on a `ClientHandler` (server/client.py keeps thin methods
for them). A protocol error becomes the CONNACK or DISCONNECT the spec asks for (or a bare close
on 3.1.1) via `Connection.error_bytes`; after a DISCONNECT or a refusing CONNACK we send, the
connection lingers (`shut` with `linger`) so a client still writing reads it; a takeover sends
the answers still waiting for the store first; timers (CONNECT timeout, keep alive) end here.
See client.py's docstring, "Errors reach the wire here and only here".
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..mqtt.errors import RemoteProtocolError
from ..mqtt.packets import Disconnect, Packet, Will
from ..mqtt.types import ProtocolLevel, ReasonCode
from . import client_guard as guard
from . import drain

if TYPE_CHECKING:
    from .client import ClientHandler

log = logging.getLogger("edge_broker.client")

CONNECT_TIMEOUT_S = 10.0  # a connection that sends no CONNECT within this is closed
LINGER_S = 1.0  # after a DISCONNECT/refusal we send: input discarded this long, then close


def protocol_error(handler: ClientHandler, error: RemoteProtocolError,
                   replies: list[Packet | int]) -> None:
    log.info("closing %s (%s): %s [%s]", handler.client_id or "client", handler.peer,
             error.message, error.reason_code.name)
    handler.app.metrics.protocol_errors += 1
    # Whatever was already answered goes first, then the error, then the close. The
    # answers acknowledge this batch's changes: they go only if the batch is durable
    # now and nothing earlier of this client waits, else they are dropped (no ack
    # before its commit; the client resends).
    data = b""
    try:
        if (replies and not handler._pending_commits
                and handler.app.commit_now_or_later(_no_op)):
            data = handler._encode_all(replies)
        replies.clear()
        data += handler._conn.error_bytes(error)
    except Exception as encode_error:  # e.g. a Maximum Packet Size below our CONNACK
        replies.clear()
        log.info("closing %s (%s) without a reply: cannot encode it: %s",
                 handler.client_id or "client", handler.peer, encode_error)
        shut(handler)
        return
    handler._write(data)
    shut(handler, linger=bool(data))


def kick(handler: ClientHandler, reason: ReasonCode, *, linger: bool = True) -> None:
    """The server ends this connection (takeover, shutdown, keep-alive timeout, memory).
    `linger=False` closes right after the DISCONNECT (the broker stopping)."""
    if handler._closed:
        if handler._draining:  # what it sent before closing is not handled any further
            drain.stop_draining(handler)
            handler.app.finish_batch(None, [])
        return
    data = b""
    if handler._conn.protocol_level == ProtocolLevel.MQTT_5 and handler.client_id is not None:
        try:
            data = handler._conn.send(Disconnect(reason))
        except Exception as error:  # the connection may be in a state that cannot send it
            log.info("closing %s (%s) without DISCONNECT: cannot encode it: %s",
                     handler.client_id, handler.peer, error)
    handler._write(data)
    shut(handler, linger=linger and bool(data))


def taken_over(handler: ClientHandler) -> None:
    """Another connection took this one's session over [MQTT-3.1.4-3] (5.0). Answers
    still waiting for the store (this connection's CONNACK, say) are sent first, so a
    storm of takeovers keeps completing handshakes; nothing more is read or delivered
    here, and the connection closes (v5: DISCONNECT 0x8E) once they are out."""
    if handler._closed:
        if handler._draining:  # the new connection wins: the old one's packets are dropped
            drain.stop_draining(handler)  # committed with the new connection's batch
        return
    kick_when_answered(handler, ReasonCode.SESSION_TAKEN_OVER)


def kick_when_answered(handler: ClientHandler, reason: ReasonCode) -> None:
    """`kick`, once the answers still waiting for the store are out: a client whose
    CONNECT is being committed gets its CONNACK before the DISCONNECT [MQTT-3.2.0-1]
    (5.0). Nothing more is read meanwhile."""
    if handler._closed:
        return
    if not handler._pending_commits:
        kick(handler, reason)
        return
    handler._kick_after = reason
    handler._close_after_write = True  # read nothing more
    if handler._turn_handle is not None:
        handler._turn_handle.cancel()
        handler._turn_handle = None


def shut(handler: ClientHandler, *, linger: bool = False) -> None:
    """Close the transport after what is buffered; detach from the session now.

    With `linger` (we just sent a DISCONNECT or a refusing CONNACK), the write side is
    half-closed and input is read and discarded for up to LINGER_S before the close: a
    client still writing would otherwise get a TCP reset and might never read the
    reason code (the kernel resets a socket closed with unread input).
    """
    if handler._closed:
        return
    handler._closed = True
    cancel_timers(handler)
    transport = handler.transport
    if transport is not None:
        if linger and not transport.is_closing() and transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                transport.close()
            else:
                if handler._paused_reading:
                    handler._paused_reading = False
                    transport.resume_reading()
                handler._linger_handle = handler.app.loop.call_later(LINGER_S, end_linger,
                                                                   handler)
        else:
            transport.close()
    handler._account_buffered()
    if handler.client_id is not None:
        handler.app.detach(handler, reason_code=handler._disconnect_reason,
                        session_expiry_interval=handler._session_expiry_on_disconnect)


def end_linger(handler: ClientHandler) -> None:
    handler._linger_handle = None
    if handler.transport is not None:
        handler.transport.close()


def connect_timeout(handler: ClientHandler) -> None:
    handler._connect_timer = None
    if handler.client_id is None and not handler._closed:
        log.info("closing %s: no CONNECT within %.0f s", handler.peer, CONNECT_TIMEOUT_S)
        shut(handler)


def keepalive_check(handler: ClientHandler) -> None:
    handler._keepalive_handle = None
    if handler._closed:
        return
    loop = handler.app.loop
    if handler._throttle_handle is not None or handler._paused_reading:
        # Suspended while we hold the client back (its quota, the store's commits): what it
        # sends waits in the socket, unread, and proves nothing either way.
        handler._last_rx = max(handler._last_rx, loop.time())
    deadline = handler._last_rx + handler._keepalive_s
    if loop.time() < deadline:
        handler._keepalive_handle = loop.call_at(deadline, handler._keepalive_check)
        return
    log.info("client %s (%s): keep alive timeout", handler.client_id, handler.peer)
    kick(handler, ReasonCode.KEEP_ALIVE_TIMEOUT)
    handler.app.finish_batch(None, [])


def cancel_timers(handler: ClientHandler) -> None:
    if handler._throttle_handle is not None:
        guard.count_throttled(handler)
    for handle in (handler._keepalive_handle, handler._connect_timer, handler._turn_handle,
                   handler._throttle_handle):
        if handle is not None:
            handle.cancel()
    handler._keepalive_handle = handler._connect_timer = handler._turn_handle = None
    handler._throttle_handle = None
    if handler._waiting is not None:
        handler._waiting.cancel()
        handler._waiting = None


def _no_op() -> None:
    return None


def how_it_ended(client_id: str, reason_code: int | None, will: Will | None) -> str:
    """The log line for the end of a connection (as mosquitto's log tells a DISCONNECT from
    a connection closed without one): `reason_code` is its DISCONNECT's, None if none;
    `will` the session's will then (published unless the DISCONNECT said 0x00)."""
    if reason_code == ReasonCode.NORMAL_DISCONNECTION:
        return f"client {client_id} disconnected"
    how = (f"client {client_id}: connection closed without DISCONNECT" if reason_code is None
           else f"client {client_id} disconnected with reason 0x{reason_code:02X}")
    if will is None:
        return how
    delay = will.properties.will_delay_interval or 0
    if delay:
        return f"{how}; its will goes out within {delay} s unless it reconnects"
    return f"{how}; its will is published"
