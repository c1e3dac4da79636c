"""One network connection: transport <-> mqtt.Connection <-> core <-> store.

Theory of operation. `ClientHandler` is an asyncio Protocol, so no task or coroutine runs per
connection or per message. `data_received` feeds the bytes to the sans-IO `Connection`, hands
each complete packet to the broker core, and collects the replies (CONNACK, PUBACK, SUBACK...)
it owes the client. The app then commits the core's change batch to the store and, only once
that batch is durable, writes the replies and pumps deliveries (`BrokerApp.finish_batch`).
Packets are handled in order and a client's batches complete in order; a batch that needs no
storage is answered at once unless this client's own earlier batch still waits (it never waits
for other clients' commits). A client's batches that wait for the store are pipelined, so the
store can commit them in one transaction, up to MAX_PENDING_COMMITS; beyond that reading
pauses, and a fast publisher is paced by the store. A connection's turns in one event-loop
iteration (uvloop may deliver several reads of one socket in one iteration) handle at most
BATCH_PACKETS units of work (`packet_cost`): a packet is one, a SUBSCRIBE or UNSUBSCRIBE one
per filter (a SUBSCRIBE one more per 64 retained messages it lists to send), a PUBLISH one
more per 8 user properties and per 64 subscriptions its topic matched; the next turn is
scheduled behind everyone else's (`process_buffered`). A closed connection's last packets
are handled on the same budget (server/drain.py).

Deliveries leave through `pump()`: it pulls what the session may send now (inflight window,
commit watermark) while the socket's write buffer is below its high-water mark, and resumes
from `resume_writing()` when the kernel has drained it. A slow subscriber therefore holds at
most one socket buffer plus its bounded session queue.

Errors reach the wire here and only here (the closing functions: server/client_close.py): a
`RemoteProtocolError` becomes the CONNACK or DISCONNECT the spec asks for (or a bare close on
3.1.1) via `Connection.error_bytes`; any other exception is a bug, logged with its traceback,
and closes this connection only. A reply that cannot be encoded closes the connection quietly.
After sending a DISCONNECT or a refusing CONNACK the connection lingers (`_shut`), so a client
still writing reads it. A client that closes with complete packets still buffered here (reading
paused) has them handled all the same, in later turns, with no reply, up to its DISCONNECT;
then the session is detached (server/drain.py).

Security (server/gate.py). A connection over a connection limit is closed at once. At CONNECT
the gate decides who the client is; a password check runs off the loop, and meanwhile this
connection is suspended: the CONNECT is held, reading pauses, no buffered packet is handled;
when the decision arrives the turn goes on in order (CONNACK or refusal first). Other
connections never wait for it. With an ACL, PUBLISH is checked for write, SUBSCRIBE filters
for read, and each delivery for read in `pump()` (a denied QoS 1/2 delivery is discarded in
the core, never sent); decisions are cached per connection and topic until a reload. A
publish quota (`Throttle`) is charged per PUBLISH; when it is in debt the turn ends and the
next one is scheduled when the debt is paid (reading paused meanwhile, keep-alive suspended):
the client is slowed, never disconnected, and nothing it sent is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Final, cast

from ..mqtt.connection import Connection
from ..mqtt.errors import LocalProtocolError, RemoteProtocolError
from ..mqtt.packets import (
    Auth,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from ..mqtt.publishing import send_plain_puback
from ..mqtt.types import ProtocolLevel, ReasonCode, Role
from . import client_close as close
from . import client_guard as guard
from . import client_pump as pumping
from . import drain
from .client_close import CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from .client_close import LINGER_S as LINGER_S
from .client_pump import ENCODING_CACHE_SIZE
from .gate import WRITE, Decision, Throttle

if TYPE_CHECKING:
    from ..config import ListenerConfig
    from .interface import ClientHost

log = logging.getLogger("edge_broker.client")

WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
PULL_LIMIT: Final = 256
BATCH_PACKETS: Final = 64  # packets handled per commit, and per connection per event-loop turn
# A packet's share of that budget beyond 1: a SUBSCRIBE/UNSUBSCRIBE per filter, a PUBLISH per
# this many user properties and per this many subscriptions matched (each about what one
# small packet costs).
USER_PROPERTIES_PER_UNIT: Final = 8
MATCHES_PER_UNIT: Final = 64
MAX_PENDING_COMMITS: Final = 16  # batches of one client awaiting the store before reading pauses


def packet_cost(packet: Packet, matched: int) -> int:
    """A packet's share of the per-turn budget (BATCH_PACKETS): 1, and more for those whose
    work grows with their content, so that one connection's turn stays short whatever it
    sends: a SUBSCRIBE or UNSUBSCRIBE counts its filters (each matched against the retained
    messages, the trie, the ACL), a PUBLISH its user properties; both also what handling them
    matched (`matched`: a PUBLISH's subscriptions, a SUBSCRIBE's retained messages listed to
    send), one unit per MATCHES_PER_UNIT."""
    if isinstance(packet, Publish):
        return (1 + len(packet.properties.user_properties) // USER_PROPERTIES_PER_UNIT
                + matched // MATCHES_PER_UNIT)
    if isinstance(packet, Subscribe):
        return max(1, len(packet.subscriptions)) + matched // MATCHES_PER_UNIT
    if isinstance(packet, Unsubscribe):
        return max(1, len(packet.topic_filters))
    return 1


class ClientHandler(asyncio.Protocol):
    __slots__ = ("_acl_cache", "_buffered", "_close_after_write", "_closed", "_conn",
                 "_connack_pending", "_connect_timer", "_decision", "_deferred",
                 "_disconnect_reason", "_held", "_keepalive_handle", "_keepalive_s",
                 "_kick_after", "_last_commit", "_last_rx", "_linger_handle",
                 "_paused_reading", "_pending_commits", "_rules_generation",
                 "_session_expiry_on_disconnect", "_spent", "_throttle", "_throttle_handle",
                 "_throttled_since", "_turn_handle", "_waiting", "_writing_paused",
                 "admitted", "app", "auth_how", "client_id", "epoch", "peer", "throttled_s",
                 "transport", "username")

    def __init__(self, app: ClientHost[ClientHandler]) -> None:
        self.app = app
        settings = app.config.mqtt
        self._conn = Connection(Role.SERVER, max_packet_size=settings.max_packet_size,
                                receive_maximum=settings.receive_maximum,
                                topic_alias_maximum=settings.topic_alias_maximum)
        self.transport: asyncio.Transport | None = None
        self.client_id: str | None = None  # set once the session is attached
        self.epoch = 0
        self.peer = "?"
        self._closed = False
        self._writing_paused = False
        self._paused_reading = False
        self._pending_commits = 0  # this connection's batches waiting for the store
        self._last_commit: asyncio.Future[None] | None = None  # the latest of them
        self._turn_handle: asyncio.Handle | None = None  # the next turn, when work remains
        # Budget used in this event-loop iteration: uvloop may hand one connection several
        # reads in one iteration, each a turn; they share one budget (`_iteration_over`).
        self._spent = 0
        self._linger_handle: asyncio.TimerHandle | None = None
        self._kick_after: ReasonCode | None = None  # taken over: close once answers are out
        self._connack_pending = False  # our CONNACK waits for its commit: no PUBLISH first
        self._buffered = 0  # bytes of unhandled input counted in app.incomplete_bytes
        self._deferred = 0  # commits in progress whose bytes are not written yet
        self._close_after_write = False
        self._disconnect_reason: int | None = None
        self._session_expiry_on_disconnect: int | None = None
        self._keepalive_s = 0.0
        self._last_rx = 0.0
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        # Security (server/gate.py)
        # counted by the connection limits: (source address, listener)
        self.admitted: tuple[str, ListenerConfig] | None = None
        self.username: str | None = None  # who the client is, once connected
        self.auth_how = "anonymous"
        self._held: Connect | None = None  # the CONNECT waiting for its decision
        self._waiting: asyncio.Future[Decision] | None = None
        self._decision: Decision | None = None
        self._rules_generation = -1  # the gate's generation the caches below belong to
        self._acl_cache: dict[tuple[str, int], bool] | None = None  # made on first use
        self._throttle: Throttle | None = None
        self._throttle_handle: asyncio.TimerHandle | None = None
        self._throttled_since = 0.0
        self.throttled_s = 0.0  # time this connection spent throttled by its quota

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        self._connect_timer = loop.call_later(CONNECT_TIMEOUT_S, self._connect_timeout)
        self.app.connections.add(self)
        self.app.metrics.sockets_opened += 1
        if not self.app.gate.admit(self):  # a connection limit ([quotas]): closed at once
            self._shut()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._close_after_write:
            return  # closing or lingering after our DISCONNECT: input is discarded
        app = self.app
        app.metrics.bytes_received += len(data)
        conn = self._conn
        conn.receive_data(data)
        self.process_buffered()
        if conn.packet_buffered():  # received, not handled yet (paused): it counts
            self._last_rx = app.loop.time()
        self._account_buffered()

    def process_buffered(self) -> None:
        """Handle one turn of this connection: at most BATCH_PACKETS buffered packets.

        No connection may hold the event loop: when packets remain after a turn, reading
        pauses and the next turn is scheduled with `call_soon`, behind the reads and turns
        of every other connection (round robin); reading resumes once the buffer is worked
        off, so a publisher that outruns the broker is paced by TCP. Each batch goes to the
        store on its own and its deliveries are pumped as soon as it is durable. A client's
        batches waiting for the store are pipelined up to MAX_PENDING_COMMITS; then this
        stops, and the app calls it again when one of them completes. A turn that handled
        nothing submits nothing. Nothing is read after a DISCONNECT.
        """
        if (self._closed or self._close_after_write or self._turn_handle is not None
                or self._pending_commits >= MAX_PENDING_COMMITS or self._waiting is not None
                or self._throttle_handle is not None):
            return
        app = self.app
        core = app.core
        conn = self._conn
        replies: list[Packet | int] = []
        now = time.time()
        handled = 0
        spent = self._spent  # the budget's share already used in this loop iteration
        throttle = self._throttle
        in_debt = False
        if self._rules_generation != app.gate.generation:
            guard.rules_changed(self)
            throttle = self._throttle
        try:
            while spent < BATCH_PACKETS:
                packet: Packet | None = self._held
                if packet is not None:
                    self._held = None
                else:
                    event = conn.next_event_or_ack()
                    if event is None:
                        break
                    if isinstance(event, int):  # a subscriber's plain PUBACK: QoS 1 hot path
                        handled += 1
                        spent += 1
                        client_id = self.client_id
                        assert client_id is not None
                        core.puback(client_id, event, now=now)
                        continue
                    packet = event
                    if isinstance(packet, Connect) and not guard.authenticate(self, packet):
                        break  # suspended until the gate decides (_authenticated)
                handled += 1
                spent += self._handle_costed(packet, replies, now)
                if self._closed or self._close_after_write:
                    break
                if throttle is not None and isinstance(packet, Publish):
                    throttle.charge(len(packet.payload) + len(packet.topic), app.loop.time())
                    if throttle.delay(app.loop.time()) > 0:
                        in_debt = True  # over its quota: the rest waits (_throttle_for)
                        break
        except RemoteProtocolError as error:
            self._protocol_error(error, replies)
        except Exception:
            log.exception("internal error handling a packet from %s (%s); closing it",
                          self.client_id or "?", self.peer)
            self._abort(replies)
        app.metrics.packets_received += handled
        if handled:  # the keep alive counts packets, not bytes [MQTT-3.1.2-24]
            self._last_rx = app.loop.time()
        if handled or replies or self._closed or self._close_after_write:
            # An idle turn submits nothing: an empty batch would wait for the store and call
            # this again when done, a chain that never ends while the store is busy.
            app.finish_batch(self, replies, close=self._close_after_write)
        if spent and not self._spent:  # the first turn of this iteration: the budget is
            app.loop.call_soon(self._iteration_over)  # whole again before a next turn runs
        self._spent = spent
        if self._closed or self._close_after_write:
            pass
        elif in_debt and throttle is not None:
            guard.throttle_for(self, throttle.delay(app.loop.time()))
        elif spent >= BATCH_PACKETS:
            self._turn_handle = app.loop.call_soon(self._next_turn)
        self._update_reading()

    def _iteration_over(self) -> None:
        """Scheduled by the first turn of an event-loop iteration, before any next turn: the
        budget is whole again for the next iteration."""
        self._spent = 0

    def _next_turn(self) -> None:  # (after _iteration_over: its budget is whole)
        self._turn_handle = None
        self.process_buffered()
        self._account_buffered()

    @property
    def closed(self) -> bool:
        """Closed or closing (lingering after our DISCONNECT): nothing more is done here."""
        return self._closed

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not handled yet (mostly an incomplete packet)."""
        return self._buffered

    def _account_buffered(self) -> None:
        size = 0 if self._closed and not self._draining else self._conn.buffered_bytes
        delta = size - self._buffered
        if delta:
            self._buffered = size
            self.app.note_buffered(delta)

    def connection_lost(self, exc: Exception | None) -> None:
        # Packets it sent before closing are still handled (drain.py), unless we closed
        # first or nothing more is read (its DISCONNECT handled, taken over).
        drains = not self._closed and self.client_id is not None and not self._close_after_write
        turn_pending = self._turn_handle is not None
        self._closed = True
        self._cancel_timers()
        self.app.gate.release(self)
        if self.throttled_s >= 1.0:
            log.info("client %s (%s) was throttled by its publish quota for %.1f s in all",
                     self.client_id, self.peer, self.throttled_s)
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if drains:  # this turn's budget may be spent already: then the next one
            if turn_pending:
                self._turn_handle = self.app.loop.call_soon(drain.drain_turn, self)
            else:
                drain.drain_turn(self)
            return
        self._account_buffered()
        app = self.app
        app.connection_closed(self)
        if self.client_id is not None:
            app.detach(self, reason_code=self._disconnect_reason,
                       session_expiry_interval=self._session_expiry_on_disconnect)
            app.finish_batch(None, [])

    @property
    def _draining(self) -> bool:
        """The peer is gone and a turn of the packets it sent before is scheduled."""
        return self._closed and self._turn_handle is not None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.pump()

    # -- packets ------------------------------------------------------------------------

    def _handle_costed(self, packet: Packet, replies: list[Packet | int], now: float) -> int:
        """`_handle`, and the packet's share of the turn's budget (`packet_cost`, with what
        the core matched while handling it; also for a closed connection's last packets,
        server/drain.py)."""
        core = self.app.core
        core.router.last_match_size = core.retained_listed = 0
        self._handle(packet, replies, now)
        return packet_cost(packet, core.router.last_match_size + core.retained_listed)

    def _handle(self, packet: Packet, replies: list[Packet | int], now: float) -> None:
        app = self.app
        core = app.core
        client_id = self.client_id
        if isinstance(packet, Publish):
            assert client_id is not None
            if app.gate.acl is not None and not guard.allowed(self, packet.topic, WRITE):
                guard.deny_publish(self, packet, replies)
                return
            # A full store refuses only what would have to be written to it.
            if (packet.qos and app.store.full and not core.is_qos2_resend(client_id, packet)
                    and core.would_store(client_id, packet)):
                self._refuse_for_full_store(packet, replies)
                return
            reason = core.publish(client_id, packet, now=now)
            if reason == ReasonCode.QUOTA_EXCEEDED:  # queue_full_policy "refuse"
                self._refuse_for_full_store(packet, replies, store=False)
                return
            if not packet.qos:
                if reason == ReasonCode.SUCCESS:
                    self._share_received_bytes(packet)
            elif packet.qos == 1:
                packet_id = packet.packet_id or 0
                if not reason or self._conn.protocol_level != ProtocolLevel.MQTT_5:
                    replies.append(packet_id)  # a plain PUBACK, no PubAck built (_encode_all)
                else:
                    replies.append(PubAck(packet_id, reason))
            elif packet.qos == 2:
                replies.append(PubRec(packet.packet_id or 0, self._v5_reason(reason)))
        elif isinstance(packet, PubAck):
            assert client_id is not None
            core.puback(client_id, packet.packet_id, now=now)
        elif isinstance(packet, PubRec):
            assert client_id is not None
            pubrel = core.pubrec(client_id, packet.packet_id, packet.reason_code, now=now)
            if pubrel is not None:
                replies.append(pubrel)
        elif isinstance(packet, PubRel):
            assert client_id is not None
            reason = core.pubrel(client_id, packet.packet_id, now=now)
            replies.append(PubComp(packet.packet_id, reason))
        elif isinstance(packet, PubComp):
            assert client_id is not None
            core.pubcomp(client_id, packet.packet_id, now=now)
        elif isinstance(packet, Subscribe):
            assert client_id is not None
            if app.gate.acl is not None:
                codes = guard.subscribe_checked(self, packet, now)
            else:
                codes = core.subscribe(client_id, packet, now=now)
            replies.append(SubAck(packet.packet_id, codes))
        elif isinstance(packet, Unsubscribe):
            assert client_id is not None
            codes = core.unsubscribe(client_id, packet, now=now)
            replies.append(UnsubAck(packet.packet_id, codes))
        elif isinstance(packet, PingReq):
            replies.append(PingResp())
        elif isinstance(packet, Connect):
            guard.handle_connect(self, packet, replies, now)
        elif isinstance(packet, Disconnect):
            self._disconnect_reason = packet.reason_code
            self._session_expiry_on_disconnect = packet.properties.session_expiry_interval
            self._close_after_write = True
        elif isinstance(packet, Auth):
            # Enhanced authentication is not offered, so the connection never lets an AUTH
            # through; should one arrive, it is a protocol error.
            raise RemoteProtocolError(ReasonCode.PROTOCOL_ERROR, "AUTH is not expected")
        else:  # pragma: no cover - the Connection only lets server-bound packets through
            raise RemoteProtocolError(ReasonCode.PROTOCOL_ERROR,
                                      f"unexpected {type(packet).__name__}")

    def _share_received_bytes(self, packet: Publish) -> None:
        """A QoS 0 PUBLISH on its way to subscribers: when its received bytes are what
        encoding it would give, they go into the shared encodings of its protocol level, so
        `pump` sends them as they are to subscribers of that level (the core hands them this
        same packet; BrokerCore.publish)."""
        conn = self._conn
        level = conn.protocol_level
        if level is None:
            return
        data = conn.received_publish_bytes(packet)
        if data is not None:
            shared = self.app.qos0_encodings[level]
            if len(shared) >= ENCODING_CACHE_SIZE:
                shared.clear()
            shared[id(packet)] = (packet, data)

    def _refuse_for_full_store(self, packet: Publish, replies: list[Packet | int], *,
                               store: bool = True) -> None:
        """The store (or, with `store` False, a subscriber's queue under the "refuse" policy)
        is full: new QoS 1/2 work is refused, not lost. MQTT 5 gets 0x97 Quota exceeded;
        3.1.1 has no way to say it, so the message is not acknowledged (the client sends it
        again later, with DUP)."""
        if store:
            self.app.note_refused_for_full_store(self.client_id or "?")
        if self._conn.protocol_level != ProtocolLevel.MQTT_5:
            return
        ack = PubAck if packet.qos == 1 else PubRec
        replies.append(ack(packet.packet_id or 0, ReasonCode.QUOTA_EXCEEDED))

    def _v5_reason(self, reason: int) -> int:
        return reason if self._conn.protocol_level == ProtocolLevel.MQTT_5 else 0

    # -- errors and closing ---------------------------------------------------------------

    def _protocol_error(self, error: RemoteProtocolError, replies: list[Packet | int]) -> None:
        close.protocol_error(self, error, replies)

    def _abort(self, replies: list[Packet | int]) -> None:
        replies.clear()
        self._shut()

    def kick(self, reason: ReasonCode, *, linger: bool = True) -> None:
        """The server ends this connection (takeover, shutdown, keep-alive timeout, memory).
        `linger=False` closes right after the DISCONNECT (the broker stopping)."""
        close.kick(self, reason, linger=linger)

    def taken_over(self) -> None:
        """Another connection took this one's session over [MQTT-3.1.4-3] (5.0). Answers
        still waiting for the store (this connection's CONNACK, say) are sent first, so a
        storm of takeovers keeps completing handshakes; nothing more is read or delivered
        here, and the connection closes (v5: DISCONNECT 0x8E) once they are out."""
        close.taken_over(self)

    def kick_when_answered(self, reason: ReasonCode) -> None:
        """`kick`, after the CONNACK a commit still holds (a reload's disconnects)."""
        close.kick_when_answered(self, reason)

    def _shut(self, *, linger: bool = False) -> None:
        """Close the transport after what is buffered; detach from the session now
        (server/client_close.py)."""
        close.shut(self, linger=linger)

    def _connect_timeout(self) -> None:
        close.connect_timeout(self)

    def _keepalive_check(self) -> None:
        close.keepalive_check(self)

    def _cancel_timers(self) -> None:
        close.cancel_timers(self)

    # -- output ---------------------------------------------------------------------------

    def _encode_all(self, packets: list[Packet | int]) -> bytes:
        """The replies' bytes; an int is a plain PUBACK (success, no properties) of that
        packet id (the QoS 1 hot path: `_handle`)."""
        conn = self._conn
        return b"".join([send_plain_puback(conn, packet) if isinstance(packet, int)
                         else conn.send(packet) for packet in packets])

    def _cannot_send(self, error: LocalProtocolError) -> None:
        # E.g. a client whose Maximum Packet Size is too small for our CONNACK.
        log.info("closing %s (%s): cannot send to it: %s", self.client_id or "client",
                 self.peer, error)
        self._shut()

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.app.metrics.bytes_sent += len(data)
            self.transport.write(data)

    def write_replies(self, replies: list[Packet | int], *, close: bool = False) -> None:
        """Called by the app once the batch these replies acknowledge is durable; `close`
        when that batch ended with the client's DISCONNECT."""
        if self._closed:
            return
        self.app.metrics.packets_sent += len(replies)
        self._connack_pending = False
        try:
            data = self._encode_all(replies)
        except LocalProtocolError as error:
            self._cannot_send(error)
            return
        except Exception:
            log.exception("internal error encoding a reply to %s (%s); closing it",
                          self.client_id or "?", self.peer)
            self._shut()
            return
        self._write(data)
        if close:
            self._shut()

    # Commits in flight: a client's batches are pipelined (the store groups them into one
    # transaction), up to MAX_PENDING_COMMITS, then reading pauses until one completes.

    @property
    def commits_pending(self) -> bool:
        return self._pending_commits > 0

    @property
    def last_commit(self) -> asyncio.Future[None] | None:
        """The latest of this connection's batches still waiting for the store."""
        return self._last_commit

    def commit_started(self, future: asyncio.Future[None]) -> None:
        self._pending_commits += 1
        self._last_commit = future
        self._update_reading()

    def commit_finished(self) -> None:
        self._pending_commits -= 1
        if not self._pending_commits:
            self._last_commit = None

    def resume_after_commit(self) -> None:
        if self._kick_after is not None:
            if not self._pending_commits:
                self.kick(self._kick_after)
            return
        self.process_buffered()
        self._update_reading()
        self._account_buffered()

    def _update_reading(self) -> None:
        if self.transport is None or self._closed:
            return
        pause = (self._pending_commits >= MAX_PENDING_COMMITS
                 or self._turn_handle is not None or self._waiting is not None
                 or self._throttle_handle is not None)
        if pause != self._paused_reading:
            self._paused_reading = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def pump(self) -> None:
        """Send what the session may send now, until the socket buffer is full."""
        if (self._closed or self.client_id is None or self._writing_paused
                or self._connack_pending or self._kick_after is not None):
            return
        if self._deferred:
            return  # keep order: the write in progress pumps again when it is done
        app = self.app
        core = app.core
        client_id = self.client_id
        while not self._writing_paused:
            packets = core.pull(client_id, now=time.time(), limit=PULL_LIMIT, plain=True)
            if not packets:
                return
            payload = pumping.encode_pulled(self, packets)
            if payload is None:
                return  # closed: a packet could not be sent
            app.metrics.packets_sent += len(packets)
            if core.has_pending_changes and not app.commit_now_or_later(
                    partial(self._write_deferred, payload)):
                # The store records the packet ids before they go out (a QoS 2 delivery must
                # not be sent twice under two ids after a crash); the write follows the commit.
                self._deferred += 1
                return
            self._write(payload)
            if len(packets) < PULL_LIMIT:
                return

    def _write_deferred(self, payload: bytes) -> None:
        self._deferred -= 1
        self._write(payload)
        self.pump()

    def __repr__(self) -> str:
        return f"<ClientHandler {self.client_id or '?'} {self.peer}>"
