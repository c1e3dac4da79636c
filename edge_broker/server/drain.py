"""Packets a client sent before closing its connection: functions on a `ClientHandler`.

A client may send a burst and close at once while the broker has paused reading it (the
per-turn budget of BATCH_PACKETS, a pending commit, its publish quota): the complete packets
already received are then still in its `Connection`. They are handled as if the connection
were open, in order, in turns of at most BATCH_PACKETS (the fairness bound holds), up to and
including a DISCONNECT and nothing after it, but no reply is sent: the transport is gone.
So a DISCONNECT among them discards the will [MQTT-3.14.4-3] (3.1.1), [MQTT-3.14.4-3] (5.0)
and a v5 DISCONNECT's session expiry applies (3.14.2.2.2 (5.0)); routed messages are
committed as usual. An incomplete packet is discarded; a malformed one ends the draining
(nothing is sent). The session is detached after the last turn. A takeover of the client id,
a kick (memory bound, CRL, failed commit) or the broker stopping ends it at once
(`stop_draining`). While a turn is scheduled the handler is `_draining` (closed, with a
`_turn_handle`), stays in `app.connections` and its buffered bytes stay counted.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..mqtt.errors import RemoteProtocolError
from ..mqtt.packets import Packet, Publish
from .client_guard import MAX_THROTTLE_S

if TYPE_CHECKING:
    from .client import ClientHandler

log = logging.getLogger("edge_broker.client")


def drain_turn(handler: ClientHandler) -> None:
    """One turn of the packets a closed connection had sent; the next is scheduled (right
    after the others' turns, or when its quota allows) or the draining ends."""
    from .client import BATCH_PACKETS

    handler._turn_handle = None
    app = handler.app
    loop = app.loop
    conn = handler._conn
    throttle = handler._throttle
    replies: list[Packet | int] = []  # nobody to send them to
    now = time.time()
    handled = spent = 0  # packets, and their work (the budget of open connections)
    delay = -1.0  # >= 0: packets remain, the next turn is in `delay` s
    try:
        while not handler._close_after_write:  # set by a DISCONNECT: nothing after it
            if throttle is not None and throttle.delay(loop.time()) > 0:
                delay = min(throttle.delay(loop.time()), MAX_THROTTLE_S)
                break
            if spent >= BATCH_PACKETS:
                delay = 0.0
                break
            packet = conn.next_event()
            if packet is None:
                break
            handled += 1
            spent += handler._handle_costed(packet, replies, now)
            replies.clear()
            if throttle is not None and isinstance(packet, Publish):
                throttle.charge(len(packet.payload) + len(packet.topic), loop.time())
    except RemoteProtocolError as error:
        log.info("%s (%s) closed; its last packets end in: %s [%s]", handler.client_id,
                 handler.peer, error.message, error.reason_code.name)
        app.metrics.protocol_errors += 1
    except Exception:
        log.exception("internal error handling a packet from %s (%s) after it closed",
                      handler.client_id, handler.peer)
    app.metrics.packets_received += handled
    if delay == 0.0:
        handler._turn_handle = loop.call_soon(drain_turn, handler)
    elif delay > 0:
        handler._turn_handle = loop.call_later(delay, drain_turn, handler)
    else:
        stop_draining(handler)
    if handled or delay < 0:
        app.finish_batch(None, [])
    handler._account_buffered()


def stop_draining(handler: ClientHandler) -> None:
    """The draining is over (or cut short): the rest is discarded and the session detached.
    The caller commits (`finish_batch`)."""
    if handler._turn_handle is not None:
        handler._turn_handle.cancel()
        handler._turn_handle = None
    handler._account_buffered()
    app = handler.app
    app.connection_closed(handler)
    app.detach(handler, reason_code=handler._disconnect_reason,
               session_expiry_interval=handler._session_expiry_on_disconnect)
