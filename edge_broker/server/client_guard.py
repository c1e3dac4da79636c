"""The CONNECT path and the security checks of a connection: functions on a `ClientHandler`.

Split from client.py (which keeps the packet loop, closing and output) to keep both readable.
Everything here runs on the event loop, on the handler's own state; see the "Security"
paragraph of client.py's docstring for how a connection is suspended during a password check
and throttled by its publish quota, and server/gate.py for the decisions themselves.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from ..core.streams import STREAM_PREFIX
from ..mqtt.errors import RemoteProtocolError
from ..mqtt.packets import ConnAck, Connect, Packet, PubAck, Publish, PubRec, Subscribe
from ..mqtt.properties import NO_PROPERTIES, Properties
from ..mqtt.topics import is_valid_topic_filter
from ..mqtt.types import ProtocolLevel, ReasonCode
from .gate import WRITE, Decision, Throttle

if TYPE_CHECKING:
    from .client import ClientHandler

log = logging.getLogger("edge_broker.client")

MAX_THROTTLE_S = 30.0  # longest single quota pause (and at most half the keep alive)
ACL_CACHE_SIZE = 1024  # ACL decisions kept per connection before the cache is emptied


def authenticate(handler: ClientHandler, packet: Connect) -> bool:
    """Ask the gate about this CONNECT. True: decided now, handle it. False: the
    CONNECT is held and this connection suspended until the decision."""
    result = handler.app.gate.start_authentication(handler, packet)
    if isinstance(result, Decision):
        handler._decision = result
        return True
    handler._held = packet
    handler._waiting = result
    if handler._connect_timer is not None:  # the verifier's bound limits the wait
        handler._connect_timer.cancel()
        handler._connect_timer = None
    result.add_done_callback(partial(authenticated, handler))
    return False


def authenticated(handler: ClientHandler, future: asyncio.Future[Decision]) -> None:
    handler._waiting = None
    if handler._closed or future.cancelled():
        return
    decision = future.result()
    gate = handler.app.gate
    packet = handler._held
    if (decision.how == "password" and packet is not None
            and handler._rules_generation != gate.generation):
        # A SIGHUP re-read the files between the check and now (its disconnects skipped
        # this connection, not yet a client): the CONNECT is checked again against them.
        handler._rules_generation = gate.generation
        if not authenticate(handler, packet):
            return  # suspended again; this is called again with the new decision
    else:
        handler._decision = decision
    handler.process_buffered()
    handler._update_reading()
    handler._account_buffered()


def refuse_connect(handler: ClientHandler, reason: ReasonCode) -> None:
    """CONNACK with `reason` (3.1.1: its return code), then close [MQTT-3.2.2-5] (5.0),
    [MQTT-3.2.2-4] (3.1.1): no session is touched."""
    data = handler._conn.error_bytes(RemoteProtocolError(reason, "not authorized"))
    handler._write(data)
    handler._shut(linger=bool(data))


def rules_changed(handler: ClientHandler) -> None:
    """The gate's rules are new (start, reload): forget cached ACL decisions and take
    this user's current quota."""
    app = handler.app
    handler._rules_generation = app.gate.generation
    handler._acl_cache = None  # made again on the first check (allowed)
    if handler.client_id is None:
        return
    msgs, size = app.config.quotas.rates_for(handler.username)
    throttle = handler._throttle
    if not msgs and not size:
        handler._throttle = None
    elif throttle is None:
        handler._throttle = Throttle(msgs, size, app.loop.time())
    else:
        throttle.msgs_rate, throttle.bytes_rate = msgs, float(size)


def throttle_for(handler: ClientHandler, delay: float) -> None:
    """Over its publish quota: read and handle nothing for `delay` seconds, capped below
    the keep alive (whose timer is suspended meanwhile)."""
    cap = MAX_THROTTLE_S
    if handler._keepalive_s:
        cap = min(cap, handler._keepalive_s / 1.5 / 2)
    handler._throttled_since = handler.app.loop.time()
    handler._throttle_handle = handler.app.loop.call_later(min(delay, cap),
                                                           partial(end_throttle, handler))


def end_throttle(handler: ClientHandler) -> None:
    handler._throttle_handle = None
    count_throttled(handler)
    handler._last_rx = max(handler._last_rx, handler.app.loop.time())
    handler.process_buffered()
    handler._account_buffered()


def count_throttled(handler: ClientHandler) -> None:
    elapsed = max(0.0, handler.app.loop.time() - handler._throttled_since)
    handler.throttled_s += elapsed
    handler.app.metrics.throttled_s += elapsed


def allowed(handler: ClientHandler, topic: str, access: int) -> bool:
    """The ACL's verdict for this client (cached per topic until the rules change)."""
    gate = handler.app.gate
    acl = gate.acl
    if acl is None:
        return True
    if handler._rules_generation != gate.generation:
        rules_changed(handler)
    key = (topic, access)
    cache = handler._acl_cache
    if cache is None:  # made on first use: most connections never need one (issue 12, S5)
        cache = handler._acl_cache = {}
    found = cache.get(key)
    if found is not None:
        return found
    client_id = handler.client_id or ""
    if access == WRITE:
        found = acl.can_publish(topic, username=handler.username, client_id=client_id)
    else:
        found = acl.can_read(topic, username=handler.username, client_id=client_id)
    if len(cache) >= ACL_CACHE_SIZE:
        cache.clear()
    cache[key] = found
    return found


def deny_publish(handler: ClientHandler, packet: Publish, replies: list[Packet | int]) -> None:
    """The ACL does not let this client write to the topic: the message goes nowhere.
    MQTT 5 says so for QoS 1/2 (0x87 Not authorized, 3.3.4 (5.0)); 3.1.1 cannot, and
    still acknowledges it as the protocol requires [MQTT-3.3.5-2] (3.1.1)."""
    handler.app.metrics.acl_denied["publish"] += 1
    log.debug("client %s may not publish to %r: dropped", handler.client_id, packet.topic)
    if not packet.qos:
        return
    v5 = handler._conn.protocol_level == ProtocolLevel.MQTT_5
    reason = ReasonCode.NOT_AUTHORIZED if v5 else ReasonCode.SUCCESS
    ack = PubAck if packet.qos == 1 else PubRec
    replies.append(ack(packet.packet_id or 0, reason))


def subscribe_checked(handler: ClientHandler, packet: Subscribe,
                       now: float) -> tuple[int, ...]:
    """SUBSCRIBE under an ACL: a filter no rule lets this client read any part of is
    refused (5.0: 0x87 Not authorized; 3.1.1: 0x80 Failure, [MQTT-3.9.3-1] (3.1.1));
    the others go to the core, and each delivery is checked in pump(). So do filters the
    core refuses whatever the ACL says, for their own code: an invalid filter, a shared
    subscription to a stream (0x9E)."""
    gate = handler.app.gate
    client_id = handler.client_id
    assert client_id is not None
    refused = (ReasonCode.NOT_AUTHORIZED if handler._conn.protocol_level == ProtocolLevel.MQTT_5
               else ReasonCode.UNSPECIFIED_ERROR)
    granted = [_refused_by_the_core(sub.topic_filter)
               or gate.can_subscribe(handler, sub.topic_filter)
               for sub in packet.subscriptions]
    if all(granted):
        return handler.app.core.subscribe(client_id, packet, now=now)
    allowed = tuple(sub for sub, ok in zip(packet.subscriptions, granted, strict=True)
                    if ok)
    codes = iter(handler.app.core.subscribe(client_id, replace(packet, subscriptions=allowed),
                                         now=now) if allowed else ())
    return tuple(next(codes) if ok else refused for ok in granted)


def _refused_by_the_core(topic_filter: str) -> bool:
    shared = topic_filter.startswith("$share/")
    inner = topic_filter.split("/", 2)[-1] if shared else topic_filter
    return not is_valid_topic_filter(inner) or (shared and inner.startswith(STREAM_PREFIX))


def handle_connect(handler: ClientHandler, packet: Connect, replies: list[Packet | int],
                    now: float) -> None:
    app = handler.app
    settings = app.config.mqtt
    v5 = packet.protocol_level == ProtocolLevel.MQTT_5
    if handler._connect_timer is not None:
        handler._connect_timer.cancel()
        handler._connect_timer = None
    if packet.properties.authentication_method is not None:
        raise RemoteProtocolError(ReasonCode.BAD_AUTHENTICATION_METHOD,
                                  "enhanced authentication is not supported")
    decision = handler._decision
    handler._decision = None  # not needed after this CONNECT: not kept per connection
    if decision is None:  # pragma: no cover - process_buffered asks the gate first
        decision = Decision(None, ReasonCode.NOT_AUTHORIZED)
    if decision.reason is not None:
        refuse_connect(handler, decision.reason)
        return
    will = packet.will
    if v5 and will is not None:
        # [MQTT-3.2.2-12], [MQTT-3.2.2-13] (5.0): a will the server could not publish as
        # asked is refused (0x9B, 0x9A), not changed behind the client's back. (3.1.1 has no
        # such return code; a 3.1.1 will is accepted as before.)
        if will.qos > settings.max_qos:
            raise RemoteProtocolError(ReasonCode.QOS_NOT_SUPPORTED,
                                      f"will QoS {will.qos} above max_qos {settings.max_qos}")
        if will.retain and not settings.retain_available:
            raise RemoteProtocolError(ReasonCode.RETAIN_NOT_SUPPORTED,
                                      "will retain while retain_available is false")
    client_id = packet.client_id
    assigned = None
    if not client_id:
        if not settings.allow_zero_length_clientid:
            raise RemoteProtocolError(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                      "zero-length client ids are not allowed")
        client_id = assigned = app.new_client_id()
    keepalive = packet.keep_alive
    server_keepalive = None
    if v5 and (keepalive > settings.max_keepalive_s or keepalive == 0):
        server_keepalive = keepalive = settings.max_keepalive_s
    elif keepalive > settings.max_keepalive_s:
        # 3.1.1 cannot be told another value: refuse, as mosquitto does.
        raise RemoteProtocolError(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                  f"keep alive {keepalive} s above max_keepalive")
    receive_maximum = (packet.properties.receive_maximum or 65535) if v5 else 65535
    # Kept by the connection and its session: one string per user name, not one per
    # connection (issue 12, S5; interned strings go when the last reference does).
    username = decision.username if decision.username is None else sys.intern(decision.username)
    result = app.attach(handler, packet, client_id, receive_maximum, now, username)
    handler.client_id = client_id
    handler.epoch = result.epoch
    handler.username = username
    handler.auth_how = decision.how
    app.metrics.connects += 1
    rules_changed(handler)  # the ACL cache and the quota of this user
    properties = NO_PROPERTIES
    if v5:
        requested = packet.properties.session_expiry_interval or 0
        properties = Properties(
            session_expiry_interval=(result.session_expiry_interval
                                     if result.session_expiry_interval != requested
                                     else None),
            receive_maximum=settings.receive_maximum,
            maximum_qos=settings.max_qos if settings.max_qos < 2 else None,
            retain_available=None if settings.retain_available else 0,
            maximum_packet_size=settings.max_packet_size,
            assigned_client_identifier=assigned,
            topic_alias_maximum=settings.topic_alias_maximum or None,
            server_keep_alive=server_keepalive,
        )
    replies.append(ConnAck(result.session_present, ReasonCode.SUCCESS, properties))
    handler._connack_pending = True  # [MQTT-3.2.0-1] (3.1.1, 5.0): CONNACK goes first
    handler._keepalive_s = keepalive * 1.5  # [MQTT-3.1.2-22] (5.0), [MQTT-3.1.2-24] (3.1.1)
    if keepalive:
        handler._keepalive_handle = app.loop.call_at(handler._last_rx + handler._keepalive_s,
                                                  handler._keepalive_check)
    log.info("client %s connected from %s (v%d, clean=%d, keepalive=%d%s%s)", client_id,
             handler.peer, packet.protocol_level, packet.clean_start, keepalive,
             ", session resumed" if result.session_present else "",
             f", user {decision.username!r} ({decision.how})"
             if decision.username is not None else "")
