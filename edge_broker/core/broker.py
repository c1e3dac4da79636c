"""BrokerCore: MQTT broker semantics, synchronous and in memory.

Theory of operation. The server calls one method per packet a client sent (`connect`,
`publish`, `puback`, `subscribe`, ...), always with `now` (wall-clock seconds) as an argument;
the core never awaits, never reads a clock and never does I/O. Each call updates sessions, the
subscription trie and the retained store, and appends change records (core/changes.py) to the
current batch. The server then:

1. takes the batch with `drain()` and hands its changes to the store;
2. once the store has committed them, calls `committed(batch.number)`, which returns the
   client ids that now have deliveries they may be sent;
3. sends the acknowledgements it collected (so a PUBACK never leaves before the message it
   acknowledges is durable), then pumps each woken connection with `pull()`.

Deliveries queued by batch N are only handed out by `pull()` once batch N committed (the
commit watermark), or at once when batch N had nothing to store (then it has nothing to lose
in a crash; a session's queue is still sent in order, so such a delivery never overtakes one
queued before it), whatever wakes the connection. `tick(now)` fires will-delay and session-
expiry timers and prunes expired messages; it returns when it next needs to run.

`BrokerCore` is one class built from a chain of mixins, one module each (a single chain:
mypyc compiles no multiple inheritance): core/queues.py (queue bounds and policy) <
core/streams.py (named streams) < core/backlog.py (offline sessions read from the log) <
core/routing.py (PUBLISH: message, targets, queues, the fast lane) < core/outbound.py (`pull`,
the packets sent, acknowledgements) < core/subscriptions.py (SUBSCRIBE, UNSUBSCRIBE) < this
module (settings, start-up, connections and session lifecycle, wills, timers, batches).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..mqtt.packets import Connect, Publish, Will
from ..mqtt.types import ProtocolLevel, ReasonCode
from .changes import (
    AWAIT_ACK,
    EXPIRY_NEVER,
    QUEUED,
    Change,
    DeliveryDeleted,
    Qos2Received,
    SessionDeleted,
    SessionRecord,
    SessionSaved,
    Snapshot,
    SubscriptionSaved,
)
from .queues import DROP_OLDEST
from .retain import RetainStore
from .router import Router
from .session import (
    Delivery,
    QueueMemory,
    Session,
)
from .streams import (
    STREAM_PREFIX,
    parse_position,
    parse_stream_filter,
)
from .subscriptions import Subscriptions

_WILL_TIMER = 0
_EXPIRY_TIMER = 1


@dataclass(frozen=True, slots=True)
class CoreSettings:
    max_inflight_messages: int = 20
    max_queued_messages: int = 100_000  # per session, 0 = unlimited
    max_queued_bytes: int = 0  # per session, 0 = unlimited
    max_queued_memory_bytes: int = 256 * 1024 * 1024  # all queues together, 0 = unlimited
    queue_full_policy: str = DROP_OLDEST  # or DROP_NEWEST, REFUSE (core/queues.py)
    queue_qos0_messages: bool = False
    max_qos: int = 2
    retain_available: bool = True
    persistent_client_expiration: int = 0  # seconds, 0 = never (3.1.1 persistent sessions)
    max_session_expiry_interval: int = 0  # seconds, 0 = no cap
    sweep_interval_s: float = 60.0  # how often expired queued/retained messages are pruned


@dataclass(frozen=True, slots=True)
class ConnectResult:
    session_present: bool
    epoch: int  # identifies this connection of the session; pass it to disconnect()
    taken_over: bool  # the session was connected: the server must close the old connection
    session_expiry_interval: int  # as granted (may be lower than requested)


@dataclass(slots=True)
class Batch:
    number: int
    changes: list[Change]


@dataclass(slots=True)
class BrokerStats:
    publish_received: int = 0  # PUBLISH packets accepted from clients
    publish_sent: int = 0  # PUBLISH packets handed to connections (resends included)
    publish_dropped: int = 0  # deliveries dropped by the queue policy (all reasons)
    dropped_queue_full: int = 0  # ... because a session's queue bound was reached
    dropped_memory_full: int = 0  # ... because max_queued_memory_bytes was reached
    dropped_store_full: int = 0  # ... given way to [storage] max_store_bytes (backlog.py)
    refused_queue_full: int = 0  # QoS 1/2 PUBLISH refused by the "refuse" policy
    stream_dropped: int = 0  # QoS 0 messages a stream did not record: the store was full
    messages_expired: int = 0  # deliveries dropped because their message expired
    clients_expired: int = 0  # sessions ended by session expiry
    clients_connected: int = 0
    clients_maximum: int = 0


class BrokerCore(Subscriptions):
    def __init__(self, settings: CoreSettings | None = None) -> None:
        self.settings = settings or CoreSettings()
        self.sessions: dict[str, Session] = {}
        self.router = Router()
        self.retained = RetainStore()
        self.stats = BrokerStats()
        self.memory = QueueMemory()  # estimated bytes held by all queues
        self._drops_unlogged: set[str] = set()  # sessions with drops not yet reported
        # client id -> (drops not yet reported, when its last line was) of ended sessions
        self._drops_ended: dict[str, tuple[int, float]] = {}
        self._changes: list[Change] = []
        self._batch = 1  # number of the batch being filled
        self._committed = 0  # highest batch number the store has committed
        self._free: set[int] = set()  # drained batches above it with no changes to commit
        self._wake: dict[str, int] = {}  # online client id -> its oldest held batch
        self.retained_listed = 0
        self._next_message_id = 1
        self._next_delivery_id = 1
        self._last_saved_message = 0
        self._timers: list[tuple[float, int, str, int]] = []  # (when, kind, client, epoch)
        self._next_sweep: float | None = None
        self._qos0_packets: dict[int, Publish] = {}  # message id * 2 + retain -> packet
        # Connection epochs are unique across sessions: a session replaced by a clean start
        # must not share an epoch with the old connection (whose detach would end it).
        self._last_epoch = 0
        # Asked (client id, username, will topic) before a will is published; False drops the
        # will (the server's ACL: a will must be writable by its client, checked when it goes
        # out). The username is the session's, stored with it, so also known after a restart.
        self.will_check: Callable[[str, str | None, str], bool] | None = None
        self._init_streams()
        self._init_backlog()

    # -- start-up -----------------------------------------------------------------------

    def restore(self, snapshot: Snapshot, *, now: float) -> None:
        """Rebuild state from a store. Sessions that were connected when the broker stopped
        are treated as disconnected now (their wills are scheduled as for a lost connection).
        """
        for srec in snapshot.sessions:
            session = Session(srec.client_id, srec.protocol_level, srec.expiry_interval,
                              self.memory)
            session.stored = True
            session.will = srec.will
            session.username = srec.username
            self.sessions[srec.client_id] = session
            self._schedule_offline(session, srec.disconnected_at or now)
        self._next_offset = max(self._next_offset, snapshot.log_last_offset + 1)
        for sub in snapshot.subscriptions:
            owner = self.sessions.get(sub.client_id)
            if owner is None:
                continue
            owner.subscriptions[sub.topic_filter] = sub
            if sub.topic_filter.startswith(STREAM_PREFIX):
                # Resumes from its stored cursor (core/streams.py), else from the next offset.
                parsed = parse_stream_filter(sub.topic_filter)
                cursor = snapshot.stream_cursors.get((sub.client_id, sub.topic_filter))
                position = parse_position(cursor) if cursor is not None else None
                if parsed is not None:
                    self._stream_subscribe(owner, sub, parsed, position or "latest")
                continue
            self._route_subscription(sub)
        for message_id in snapshot.retained.values():
            message = snapshot.messages.get(message_id)
            if message is not None:
                self.retained.set(message)
        for drec in snapshot.deliveries:
            owner = self.sessions.get(drec.client_id)
            message = snapshot.messages.get(drec.message_id)
            if owner is None or message is None:
                continue
            delivery = Delivery(drec.delivery_id, message, drec.qos, drec.retain,
                                drec.subscription_ids, 0)
            delivery.persisted = True
            delivery.dup = drec.dup
            if drec.state != QUEUED and drec.packet_id is not None:
                delivery.packet_id = drec.packet_id
                delivery.state = drec.state
                owner.inflight[drec.packet_id] = delivery
            else:
                owner.append(delivery)
        if snapshot.deliveries:
            last = max(d.delivery_id for d in snapshot.deliveries)
            self._next_delivery_id = max(self._next_delivery_id, last + 1)
        for client_id, packet_id in snapshot.incoming_qos2:
            owner = self.sessions.get(client_id)
            if owner is not None:
                owner.accept_qos2(packet_id)
        if snapshot.messages:
            self._next_message_id = max(self._next_message_id, max(snapshot.messages) + 1)
        self._backlog_restore(snapshot)  # backlogs are readers of the log (core/backlog.py)

    # -- connections --------------------------------------------------------------------

    def connect(self, packet: Connect, *, client_id: str, now: float,
                receive_maximum: int = 65535, username: str | None = None) -> ConnectResult:
        """A CONNECT was accepted (authenticated, valid): attach it to its session.

        `client_id` is the identifier in use (the server assigns one for an empty id).
        `receive_maximum` is the client's Receive Maximum (65535 when absent or on 3.1.1).
        `username` is who the server authenticated it as (None: anonymous); it is stored
        with the session, and its will is authorised as that user (`will_check`).
        """
        expiry = self._granted_expiry(packet)
        session = self.sessions.get(client_id)
        taken_over = False
        if session is not None:
            if session.online:
                # The old network connection ends now without a DISCONNECT [MQTT-3.1.4-3]
                # (3.1.1), [MQTT-3.1.4-3] (5.0). A session that was not persistent ended with
                # it [MQTT-3.1.2-6] (3.1.1), 3.1.2.11.2 (5.0): the new connection gets a fresh
                # one. The old connection's will is published only if its session ends here
                # (not persistent, or this CONNECT has Clean Start), as mosquitto does.
                taken_over = True
                self._set_offline(session)
                if not session.persistent:
                    self._end_session(session, now)
                    session = None
                elif not packet.clean_start:
                    session.will = None
                    session.will_due_at = None
            elif session.expires_at is not None and session.expires_at <= now:
                self._end_session(session, now, expired=True)
                session = None
            else:
                if session.will_due_at is not None and session.will_due_at <= now:
                    self._publish_will(session, now)
                session.will = None  # a new connection within the will delay cancels it
                session.will_due_at = None
        if session is not None and packet.clean_start:
            self._end_session(session, now)
            session = None
        present = session is not None
        if session is None:
            session = Session(client_id, packet.protocol_level, expiry, self.memory)
            self.sessions[client_id] = session
        else:
            session.protocol_level = packet.protocol_level
            session.expiry_interval = expiry
            session.start_resend()
        self._last_epoch += 1
        session.epoch = self._last_epoch
        session.online = True
        self._backlog_connect(session)
        self.stats.clients_connected += 1
        self.stats.clients_maximum = max(self.stats.clients_maximum, self.stats.clients_connected)
        session.disconnected_at = None
        session.expires_at = None
        session.will = packet.will
        session.will_due_at = None
        session.username = username
        session.inflight_max = max(1, min(self.settings.max_inflight_messages, receive_maximum))
        if session.persistent:
            if session.stored:
                self._changes.append(SessionSaved(self._session_record(session)))
            else:
                self._store_session(session)
        elif session.stored:
            self._changes.append(SessionDeleted(client_id))
            self._forget_stored(session)
            self._backlog_keep(session)  # its backlog's reader lives as long as it does
        return ConnectResult(present, session.epoch, taken_over, expiry)

    def disconnect(self, client_id: str, epoch: int, *, now: float,
                   reason_code: int | None = None,
                   session_expiry_interval: int | None = None) -> None:
        """The connection `epoch` of `client_id` ended.

        `reason_code` is what the client's DISCONNECT said, or None when the connection
        closed without one (network error, keep-alive timeout, protocol error, takeover,
        server shutdown): then the will is published. 0x00 deletes the will; 0x04 (and
        every other code) publishes it, 3.14.2.1 (5.0). `session_expiry_interval` is the
        value from a v5 DISCONNECT, if it carried one.
        """
        session = self.sessions.get(client_id)
        if session is None or session.epoch != epoch or not session.online:
            return
        self._set_offline(session)
        if reason_code == ReasonCode.NORMAL_DISCONNECTION:
            session.will = None  # [MQTT-3.14.4-3] (5.0), [MQTT-3.14.4-3] (3.1.1)
        if session_expiry_interval is not None:
            session.expiry_interval = self._cap_expiry(session_expiry_interval)
        if not session.persistent:
            self._end_session(session, now)
            return
        if not self.settings.queue_qos0_messages:
            self._drop_queued_qos0(session)
        if session.retained_pending:
            self._queue_retained_pending(session, now)
        if session.stored:
            # QoS 1 packet ids are not written as they are sent (at-least-once allows
            # sending one again under a new id after a crash); on a disconnect (and so at a
            # graceful shutdown) they are, so the resend carries DUP and the original id.
            for delivery in session.inflight.values():
                if delivery.qos == 1 and delivery.state == AWAIT_ACK:
                    if not delivery.persisted:  # a retained message sent on SUBSCRIBE
                        self._save_message(delivery.message)
                    self._save_delivery(session, delivery)
        session.resend = ()
        self._schedule_offline(session, now)
        if session.stored:
            self._backlog_open(session)  # from now on its messages go to the log
        self._changes.append(SessionSaved(self._session_record(session)))
        if session.stored:
            for topic_filter in session.subscriptions:
                if topic_filter.startswith(STREAM_PREFIX):
                    self._stream_save_cursor(session, topic_filter)

    def end_session(self, client_id: str, *, now: float) -> bool:
        """Delete a session (an administrator's request). A pending will is published, as at
        any session end. The server closes a live connection first. False if unknown."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        self._end_session(session, now)
        return True

    # -- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Fire due will and expiry timers and prune expired messages.

        Returns the wall-clock time of the next timer, or None when nothing is pending.
        """
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, kind, client_id, epoch = heapq.heappop(timers)
            session = self.sessions.get(client_id)
            if session is None or session.online or session.epoch != epoch:
                continue
            if kind == _WILL_TIMER:
                if session.will_due_at is not None and session.will_due_at <= now:
                    self._publish_will(session, now)
                    self._changes.append(SessionSaved(self._session_record(session)))
            elif session.expires_at is not None and session.expires_at <= now:
                self._end_session(session, now, expired=True)
        if self._next_sweep is None or now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + self.settings.sweep_interval_s
        return self.next_deadline()

    def next_deadline(self) -> float | None:
        """When `tick` next needs to run (wall clock), or None."""
        if self._timers:
            first = self._timers[0][0]
            return first if self._next_sweep is None else min(first, self._next_sweep)
        return self._next_sweep

    # -- batches --------------------------------------------------------------------------

    def drain(self) -> Batch:
        """Take the changes made since the last drain as one batch for the store."""
        self._backlog_flush()
        batch = Batch(self._batch, self._changes)
        if not batch.changes:
            # Nothing of it is stored: what it queued may go out before earlier batches are
            # durable (each session's queue is still sent in order, so a message never
            # overtakes one queued before it by a pending batch).
            self._free.add(batch.number)
        self._changes = []
        self._backlog_drained(batch.number)
        self._batch += 1
        # A store may prune a body once nothing refers to it at the end of a batch, so a
        # delivery in a later batch must save its message again.
        self._last_saved_message = 0
        return batch

    def free(self, number: int) -> None:
        """What batch `number` queued may go out before it is durable (its changes are only
        QoS 0 log records: nothing acknowledged depends on them). The commit watermark, and
        with it what log readers may read, still waits for its commit."""
        if number > self._committed:
            self._free.add(number)

    def committed(self, number: int) -> list[str]:
        """The store committed every batch up to `number`. Returns the online clients that
        have deliveries they may now be sent."""
        if number > self._committed:
            self._committed = number
            self._backlog_committed(number)
        free = self._free
        if free:
            free.difference_update([b for b in free if b <= number])
        if not self._wake:
            return []
        ready = [cid for cid, batch in self._wake.items() if batch <= number or batch in free]
        for cid in ready:
            del self._wake[cid]
        return ready

    @property
    def has_pending_changes(self) -> bool:
        return bool(self._changes)

    # -- internals ------------------------------------------------------------------------

    def _granted_expiry(self, packet: Connect) -> int:
        if packet.protocol_level == ProtocolLevel.MQTT_5:
            requested = packet.properties.session_expiry_interval or 0
        elif packet.clean_start:
            requested = 0
        else:
            requested = self.settings.persistent_client_expiration or EXPIRY_NEVER
        return self._cap_expiry(requested)

    def _cap_expiry(self, requested: int) -> int:
        cap = self.settings.max_session_expiry_interval
        return min(requested, cap) if cap else requested

    def _set_offline(self, session: Session) -> None:
        session.online = False
        self.stats.clients_connected -= 1
        self._wake.pop(session.client_id, None)

    def _schedule_offline(self, session: Session, disconnected_at: float) -> None:
        session.disconnected_at = disconnected_at
        if session.expiry_interval != EXPIRY_NEVER:
            session.expires_at = disconnected_at + session.expiry_interval
            heapq.heappush(self._timers, (session.expires_at, _EXPIRY_TIMER,
                                          session.client_id, session.epoch))
        if session.will is not None:
            delay = _will_delay(session.will)
            session.will_due_at = disconnected_at + delay
            heapq.heappush(self._timers, (session.will_due_at, _WILL_TIMER,
                                          session.client_id, session.epoch))

    def _end_session(self, session: Session, now: float, *, expired: bool = False) -> None:
        """The session ends: a pending will goes now, everything else is forgotten."""
        if session.online:
            self._set_offline(session)
        if session.will is not None:
            self._publish_will(session, now)
        for record in session.subscriptions.values():
            if record.topic_filter.startswith(STREAM_PREFIX):
                self._stream_unsubscribe(session, record.topic_filter)
                continue
            self._unroute_subscription(record)
        session.subscriptions.clear()
        session.clear_deliveries()
        session.stream_history = ()
        self._backlog_end(session)
        del self.sessions[session.client_id]
        if session.drops_unlogged:  # still reported (take_drop_reports)
            count, at = self._drops_ended.get(session.client_id, (0, session.drop_logged_at))
            self._drops_ended[session.client_id] = (count + session.drops_unlogged,
                                                    max(at, session.drop_logged_at))
            session.drops_unlogged = 0
        if session.stored:
            self._changes.append(SessionDeleted(session.client_id))
            session.stored = False
        if expired:
            self.stats.clients_expired += 1

    def _publish_will(self, session: Session, now: float) -> None:
        will = session.will
        session.will = None
        session.will_due_at = None
        if will is None:
            return
        check = self.will_check
        if check is not None and not check(session.client_id, session.username, will.topic):
            return
        message = self._new_message(will.topic, will.payload, will.qos, will.retain,
                                    will.properties, session.client_id, now)
        if will.retain and self.settings.retain_available:
            self._retain(message, persist=True)
        self._route(message)
        self._stream_append(message)

    def _drop_queued_qos0(self, session: Session) -> None:
        session.clear_ready()
        if not any(d.qos == 0 for d in session.queue):
            return
        session.replace_queue([d for d in session.queue if d.qos > 0])

    def _session_record(self, session: Session) -> SessionRecord:
        return SessionRecord(session.client_id, session.protocol_level,
                             session.expiry_interval, session.will, session.disconnected_at,
                             session.username)

    def _store_session(self, session: Session) -> None:
        """First time a session becomes persistent: write all of it."""
        session.stored = True
        changes = self._changes
        changes.append(SessionSaved(self._session_record(session)))
        for record in session.subscriptions.values():
            changes.append(SubscriptionSaved(record))
            if record.topic_filter.startswith(STREAM_PREFIX):
                self._stream_save_cursor(session, record.topic_filter)
        for delivery in _all_deliveries(session):
            self._save_message(delivery.message)
            self._save_delivery(session, delivery)
        for packet_id in session.incoming_qos2:
            changes.append(Qos2Received(session.client_id, packet_id))

    def _forget_stored(self, session: Session) -> None:
        session.stored = False
        for delivery in _all_deliveries(session):
            delivery.persisted = False

    def _sweep(self, now: float) -> None:
        """Drop expired messages from offline queues and the retained store."""
        for topic in self.retained.expired(now):
            self._clear_retained(topic)
        for session in self.sessions.values():
            if session.online or not session.queue:
                continue
            if not any(d.message.expires_at is not None and d.message.expires_at <= now
                       for d in session.queue):
                continue
            kept = []
            for delivery in session.queue:
                expires_at = delivery.message.expires_at
                if expires_at is not None and expires_at <= now:
                    self.stats.messages_expired += 1
                    if delivery.persisted:
                        self._changes.append(DeliveryDeleted(session.client_id, delivery.id))
                else:
                    kept.append(delivery)
            session.replace_queue(kept)


def _will_delay(will: Will) -> int:
    return will.properties.will_delay_interval or 0


def _all_deliveries(session: Session) -> Iterable[Delivery]:
    yield from session.inflight.values()
    yield from session.queue
