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
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import cast

from ..mqtt.errors import RemoteProtocolError
from ..mqtt.packets import Connect, Publish, PubRel, Subscribe, Subscription, Unsubscribe, Will
from ..mqtt.properties import NO_PROPERTIES, Properties
from ..mqtt.topics import is_valid_topic_filter, parse_shared
from ..mqtt.types import ProtocolLevel, ReasonCode
from .backlog import BacklogRouting
from .changes import (
    AWAIT_ACK,
    AWAIT_COMP,
    EXPIRY_NEVER,
    QUEUED,
    Change,
    DeliveryDeleted,
    DeliveryRecord,
    DeliverySaved,
    Message,
    MessageSaved,
    Qos2Received,
    Qos2Released,
    RetainedDeleted,
    RetainedSaved,
    SessionDeleted,
    SessionRecord,
    SessionSaved,
    Snapshot,
    SubscriptionDeleted,
    SubscriptionRecord,
    SubscriptionSaved,
)
from .queues import DROP_OLDEST, REFUSE, Target, forget_retained_pending
from .replay import EncodedPublish
from .retain import RetainStore
from .router import Router
from .session import (
    DELIVERY_OVERHEAD,
    MESSAGE_OVERHEAD,
    Delivery,
    QueueMemory,
    RetainedPending,
    Session,
)
from .streams import (
    STREAM_PREFIX,
    parse_position,
    parse_stream_filter,
    stream_offset_property,
)

_WILL_TIMER = 0
QOS0_PACKET_CACHE_SIZE = 1024
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


class BrokerCore(BacklogRouting):
    def __init__(self, settings: CoreSettings | None = None) -> None:
        self.settings = settings or CoreSettings()
        self.sessions: dict[str, Session] = {}
        self.router = Router()
        self.retained = RetainStore()
        self.stats = BrokerStats()
        self.memory = QueueMemory()  # estimated bytes held by all queues
        self._drops_unlogged: set[str] = set()  # sessions with drops not yet reported
        self._changes: list[Change] = []
        self._batch = 1  # number of the batch being filled
        self._committed = 0  # highest batch number the store has committed
        self._free: set[int] = set()  # drained batches above it with no changes to commit
        self._wake: dict[str, int] = {}  # online client id -> its oldest held batch
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
                owner.incoming_qos2.add(packet_id)
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

    # -- publish, from a client or from the broker ---------------------------------------

    def publish(self, client_id: str, packet: Publish, *, now: float) -> int:
        """A client's PUBLISH. Returns the reason code for its PUBACK/PUBREC.

        Raises RemoteProtocolError when the client uses a QoS or retain the server said it
        does not support (the connection then closes).
        """
        session = self.sessions[client_id]
        qos = packet.qos
        if qos > self.settings.max_qos:
            raise RemoteProtocolError(ReasonCode.QOS_NOT_SUPPORTED,
                                      f"QoS {qos} above the maximum {self.settings.max_qos}")
        if packet.retain and not self.settings.retain_available:
            raise RemoteProtocolError(ReasonCode.RETAIN_NOT_SUPPORTED, "retain is not available")
        self.stats.publish_received += 1
        if packet.topic.startswith("$SYS"):
            # Only the broker writes $SYS (as mosquitto: clients may not publish there).
            return ReasonCode.NOT_AUTHORIZED
        if qos == 2 and packet.packet_id in session.incoming_qos2:
            # A resend of a QoS 2 message already accepted: acknowledge, do not forward
            # again (exactly once, 4.3.3 (5.0)).
            return ReasonCode.SUCCESS
        message = self._new_message(packet.topic, packet.payload, qos, packet.retain,
                                    packet.properties, client_id, now)
        targets = self._targets(message)
        in_stream = False
        if qos and self.settings.queue_full_policy == REFUSE and not self._fits(targets,
                                                                                 message):
            # The whole message is refused (no subscriber gets it, it is not retained):
            # the publisher keeps it and sends it again later.
            self.stats.refused_queue_full += 1
            return ReasonCode.QUOTA_EXCEEDED
        if qos == 2:
            packet_id = packet.packet_id
            assert packet_id is not None
            session.incoming_qos2.add(packet_id)
            if session.stored:
                self._changes.append(Qos2Received(client_id, packet_id))
        if packet.retain:
            self._retain(message, persist=True)
        if (targets and not qos and packet.properties is NO_PROPERTIES
                and packet.packet_id is None and not packet.dup):
            # What goes out at QoS 0 is this very packet (same topic, payload, retain flag,
            # no properties): _publish_packet shares it, so the server may send the bytes it
            # arrived as (Connection.received_publish_bytes) instead of encoding it again.
            qos0_packets = self._qos0_packets
            if len(qos0_packets) >= QOS0_PACKET_CACHE_SIZE:
                qos0_packets.clear()
            qos0_packets[message.id * 2 + packet.retain] = packet
        self._deliver_all(message, targets)
        in_stream = self._stream_append(message)
        # A subscriber whose queue dropped the message still matched it; a message a stream
        # records is taken (acknowledged after its commit, like one queued for a session).
        return (ReasonCode.SUCCESS if targets or in_stream
                else ReasonCode.NO_MATCHING_SUBSCRIBERS)

    def would_store(self, client_id: str, packet: Publish) -> bool:
        """Whether accepting this PUBLISH would write to the store: its QoS 2 packet id (a
        stored publisher session), a retained message, or a delivery to a stored session.
        Used to refuse only such PUBLISHes while the store is full."""
        session = self.sessions.get(client_id)
        if packet.qos == 2 and session is not None and session.stored:
            return True
        if packet.retain and packet.payload and self.settings.retain_available:
            return True
        if packet.qos and self.streams_of(packet.topic):
            return True  # a stream or a bridge's uplink records it
        normal, groups = self.router.match(packet.topic)
        sessions = self.sessions
        queue_qos0 = self.settings.queue_qos0_messages
        for record in normal:
            target = sessions.get(record.client_id)
            if target is not None and target.stored and (
                    min(record.qos, packet.qos) or (queue_qos0 and not target.online)):
                return True
        for group in groups:
            if any(sessions[m.client_id].stored for m in group.members.values()
                   if m.client_id in sessions):
                return True
        return False

    def is_qos2_resend(self, client_id: str, packet: Publish) -> bool:
        """Whether this is a QoS 2 PUBLISH already accepted (its PUBREL not yet received)."""
        session = self.sessions.get(client_id)
        return (packet.qos == 2 and session is not None
                and packet.packet_id in session.incoming_qos2)

    def publish_internal(self, topic: str, payload: bytes, *, now: float, retain: bool = False,
                         qos: int = 0, persist: bool = False) -> None:
        """A message from the broker itself ($SYS). `persist` keeps a retained copy in the
        store; $SYS updates do not, to spare the flash."""
        message = self._new_message(topic, payload, qos, retain, NO_PROPERTIES, "", now)
        if retain:
            self._retain(message, persist=persist)
        self._route(message)

    # -- acknowledgements -----------------------------------------------------------------

    def puback(self, client_id: str, packet_id: int, *, now: float) -> None:
        session = self.sessions[client_id]
        delivery = session.inflight.get(packet_id)
        if delivery is None or delivery.qos != 1:
            return  # unknown id: nothing to do
        self._finish_inflight(session, delivery)

    def pubrec(self, client_id: str, packet_id: int, reason_code: int, *,
               now: float) -> PubRel | None:
        """Returns the PUBREL to send (after the batch commits), or None."""
        session = self.sessions[client_id]
        delivery = session.inflight.get(packet_id)
        if delivery is None or delivery.qos != 2:
            return PubRel(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)
        if reason_code >= 0x80:
            self._finish_inflight(session, delivery)  # the flow ends here, 4.3.3 (5.0)
            return None
        if delivery.state == AWAIT_ACK:
            delivery.state = AWAIT_COMP
            delivery.dup = False
            if session.stored:
                self._save_delivery(session, delivery)
        return PubRel(packet_id)

    def pubrel(self, client_id: str, packet_id: int, *, now: float) -> int:
        """Returns the reason code for the PUBCOMP."""
        session = self.sessions[client_id]
        if packet_id not in session.incoming_qos2:
            return ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
        session.incoming_qos2.discard(packet_id)
        if session.stored:
            self._changes.append(Qos2Released(client_id, packet_id))
        return ReasonCode.SUCCESS

    def pubcomp(self, client_id: str, packet_id: int, *, now: float) -> None:
        session = self.sessions[client_id]
        delivery = session.inflight.get(packet_id)
        if delivery is not None and delivery.state == AWAIT_COMP:
            self._finish_inflight(session, delivery)

    def discard(self, client_id: str, packet_id: int) -> None:
        """A pulled PUBLISH could not be sent (larger than the client's Maximum Packet Size):
        it counts as delivered [MQTT-3.1.2-25] (5.0)."""
        session = self.sessions.get(client_id)
        if session is None:
            return
        delivery = session.inflight.get(packet_id)
        if delivery is not None:
            self._finish_inflight(session, delivery)

    # -- subscriptions --------------------------------------------------------------------

    def subscribe(self, client_id: str, packet: Subscribe, *, now: float) -> tuple[int, ...]:
        """Returns the SUBACK reason codes. Retained messages are queued behind the SUBACK."""
        session = self.sessions[client_id]
        ids = packet.properties.subscription_identifiers
        subscription_id = ids[0] if ids else None
        codes: list[int] = []
        v5 = session.protocol_level == ProtocolLevel.MQTT_5
        offset_text = stream_offset_property(packet.properties) if v5 else None
        for sub in packet.subscriptions:
            topic_filter = sub.topic_filter
            if topic_filter.startswith(STREAM_PREFIX) or (
                    topic_filter.startswith("$share/") and STREAM_PREFIX[:-1] in topic_filter):
                codes.append(self._subscribe_stream(session, sub, topic_filter, offset_text,
                                                    subscription_id, v5))
                continue
            if not is_valid_topic_filter(topic_filter):
                codes.append(ReasonCode.TOPIC_FILTER_INVALID
                             if session.protocol_level == ProtocolLevel.MQTT_5
                             else ReasonCode.UNSPECIFIED_ERROR)
                continue
            qos = min(sub.qos, self.settings.max_qos)
            record = SubscriptionRecord(client_id, topic_filter, qos, sub.no_local,
                                        sub.retain_as_published, sub.retain_handling,
                                        subscription_id)
            old = session.subscriptions.get(topic_filter)
            existed = old is not None
            session.subscriptions[topic_filter] = record
            self._backlog_subscribe(session, topic_filter, None if old == record else old)
            shared = self._route_subscription(record)
            if session.stored:
                self._changes.append(SubscriptionSaved(record))
            codes.append(qos)
            # Retained messages on subscribe, 3.3.1.3 (5.0); never for a shared
            # subscription, 4.8.2 (5.0).
            if existed:
                forget_retained_pending(session, topic_filter)
            if shared or sub.retain_handling == 2 or (sub.retain_handling == 1 and existed):
                continue
            # Every matching retained message is sent, however many: not queued as
            # deliveries (nor bounded or dropped as they are) but listed by topic and sent
            # by pull() under flow control, after what was queued before this SUBSCRIBE.
            topics = [message.topic for message in self.retained.matching(topic_filter)]
            if not topics:
                continue
            pending = RetainedPending(topic_filter, topics, qos,
                                      (subscription_id,) if subscription_id else (),
                                      self._batch, self._next_delivery_id)
            if not isinstance(session.retained_pending, deque):
                session.retained_pending = deque()
            session.retained_pending.append(pending)
            if session.online:
                self._wake[client_id] = self._batch
        return tuple(codes)

    def _subscribe_stream(self, session: Session, sub: Subscription, topic_filter: str,
                          offset_text: str | None, subscription_id: int | None,
                          v5: bool) -> int:
        """A `$stream/` filter in a SUBSCRIBE (core/streams.py). Returns its reason code."""
        if topic_filter.startswith("$share/"):
            shared = parse_shared(topic_filter)
            if shared is not None and shared[1].startswith(STREAM_PREFIX):
                # Shared subscriptions to a stream are not offered: 0x9E (5.0).
                return (ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if v5
                        else ReasonCode.UNSPECIFIED_ERROR)
            if shared is None:
                return ReasonCode.TOPIC_FILTER_INVALID if v5 else ReasonCode.UNSPECIFIED_ERROR
            topic_filter = shared[1]
        parsed = parse_stream_filter(topic_filter)
        position = parse_position(offset_text) if offset_text is not None else None
        if parsed is None or (offset_text is not None and position is None):
            return ReasonCode.TOPIC_FILTER_INVALID if v5 else ReasonCode.UNSPECIFIED_ERROR
        qos = min(sub.qos, self.settings.max_qos)
        record = SubscriptionRecord(session.client_id, topic_filter, qos, sub.no_local,
                                    sub.retain_as_published, sub.retain_handling,
                                    subscription_id)
        code = self._stream_subscribe(session, record, parsed, position)
        if code >= 0x80:
            # [MQTT-3.9.3-1] (3.1.1) has only 0x80 for a failure; 0x8F names it (5.0).
            return code if v5 else ReasonCode.UNSPECIFIED_ERROR
        session.subscriptions[topic_filter] = record
        if session.stored:
            self._changes.append(SubscriptionSaved(record))
            self._stream_save_cursor(session, topic_filter)
        if session.online:
            self._wake[session.client_id] = self._batch
        return code

    def unsubscribe(self, client_id: str, packet: Unsubscribe, *,
                    now: float) -> tuple[int, ...]:
        session = self.sessions[client_id]
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            if topic_filter.startswith(STREAM_PREFIX):
                if session.subscriptions.pop(topic_filter, None) is None:
                    codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                    continue
                self._stream_unsubscribe(session, topic_filter)
                if session.stored:
                    self._changes.append(SubscriptionDeleted(client_id, topic_filter))
                codes.append(ReasonCode.SUCCESS)
                continue
            if not is_valid_topic_filter(topic_filter):
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            record = session.subscriptions.pop(topic_filter, None)
            if record is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            self._unroute_subscription(record)
            self._backlog_unsubscribe(session, topic_filter, record)
            forget_retained_pending(session, topic_filter)
            if session.stored:
                self._changes.append(SubscriptionDeleted(client_id, topic_filter))
            codes.append(ReasonCode.SUCCESS)
        return tuple(codes)

    # -- outbound -------------------------------------------------------------------------

    def pull(self, client_id: str, *, now: float,
             limit: int = 256) -> list[Publish | PubRel | EncodedPublish]:
        """What this client's connection may send now: resends first, then queued deliveries
        whose batch committed, within the inflight window. At most `limit` packets; a
        replayed stream message may come encoded already (core/replay.py)."""
        session = self.sessions.get(client_id)
        if session is None or not session.online:
            return []
        out: list[Publish | PubRel | EncodedPublish] = []
        inflight = session.inflight
        resend = session.resend
        # Resends count against the client's Receive Maximum like new sends: inflight
        # deliveries already sent on this connection are len(inflight) - len(resend).
        while resend and len(out) < limit and (
                len(inflight) - len(resend) < session.inflight_max):
            assert isinstance(resend, deque)
            again = resend.popleft()
            if again.packet_id is None or inflight.get(again.packet_id) is not again:
                continue  # acknowledged meanwhile
            if again.state == AWAIT_ACK:
                out.append(self._publish_packet(session, again, now))
            else:
                out.append(PubRel(again.packet_id))
        committed = self._committed
        free = self._free
        ready = session.ready
        if isinstance(ready, list):
            # The fast lane: older than the queue, all of one batch (core/session.py).
            batch = session.ready_batch
            room = limit - len(out)
            if room <= 0 or not (batch <= committed or batch in free):
                return out
            if len(ready) <= 2 * room:
                taken = ready
                session.ready = ()
            else:
                taken = ready[:2 * room]
                del ready[:2 * room]
            packets = cast("list[Publish]", taken[0::2])
            out.extend(packets)
            self.stats.publish_sent += len(packets)
            session.release_ready(cast("list[Message]", taken[1::2]))
            if session.ready:
                return out
        queue = session.queue
        pending = session.retained_pending
        while len(out) < limit:
            if session.stream_history:
                # A $stream/ subscription's history goes before the queue, which holds its
                # live messages (core/streams.py): nothing of the queue until it is done.
                sent = self._stream_history_send(session, out, now, limit)
                if sent is not None:
                    if sent:
                        continue
                    break
            delivery: Delivery | None
            if pending and (pending[0].batch <= committed or pending[0].batch in free) and (
                    not queue or queue[0].id >= pending[0].after):
                entry = pending[0]
                delivery = self._next_retained(session, entry, now)
                if delivery is None:
                    if not entry.topics:
                        assert isinstance(pending, deque)
                        pending.popleft()
                    continue
                if delivery.qos and len(inflight) >= session.inflight_max:
                    break
                entry.topics.popleft()
                self._next_delivery_id += 1
            elif not queue and session.backlog is not None:
                delivery = self._backlog_take(session, now)  # core/backlog.py
                if delivery is None:
                    break
            elif queue and (queue[0].batch <= committed or queue[0].batch in free):
                delivery = queue[0]
                expires_at = delivery.message.expires_at
                if expires_at is not None and expires_at <= now:
                    session.popleft()
                    self.stats.messages_expired += 1
                    if delivery.persisted:
                        self._changes.append(DeliveryDeleted(client_id, delivery.id))
                    continue
                if delivery.qos and len(inflight) >= session.inflight_max:
                    break
                session.popleft()
            else:
                break
            if delivery.stream is not None:
                delivery.stream.sent = delivery.message.offset or 0
            if delivery.qos == 0:
                if delivery.persisted:
                    self._changes.append(DeliveryDeleted(client_id, delivery.id))
                out.append(self._publish_packet(session, delivery, now))
                continue
            packet_id = session.allocate_packet_id()
            delivery.packet_id = packet_id
            delivery.state = AWAIT_ACK
            inflight[packet_id] = delivery
            if session.stored and (delivery.qos == 2 or delivery.from_log):
                # A QoS 2 delivery's packet id is durable before it is sent: after a crash
                # it goes out again under the same id, so the client can tell the duplicate
                # [MQTT-4.3.3] (5.0). A QoS 1 delivery's is written at disconnect only (below),
                # unless read from the log (the cursor moves past it: core/backlog.py).
                if not delivery.persisted and not delivery.from_log:  # retained, on SUBSCRIBE
                    self._save_message(delivery.message)
                self._save_delivery(session, delivery)
            out.append(self._publish_packet(session, delivery, now))
            delivery.dup = True  # any later send of it is a resend
        if queue and session.online and not (queue[0].batch <= committed
                                             or queue[0].batch in free):
            self._wake.setdefault(client_id, queue[0].batch)  # the next commit that matters
        return out

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

    def _new_message(self, topic: str, payload: bytes, qos: int, retain: bool,
                     properties: Properties, origin: str, now: float) -> Message:
        expires_at = None
        if properties is not NO_PROPERTIES:
            if properties.message_expiry_interval is not None:
                expires_at = now + properties.message_expiry_interval
            properties = _pass_through(properties)
        message_id = self._next_message_id
        self._next_message_id = message_id + 1
        return Message(message_id, topic, payload, qos, retain, properties, now, expires_at,
                       origin)

    def _retain(self, message: Message, *, persist: bool) -> None:
        if not message.payload:
            self._clear_retained(message.topic)  # [MQTT-3.3.1-6] (5.0)
            return
        self.retained.set(message)
        if persist:
            self._save_message(message)
            self._changes.append(RetainedSaved(message.topic, message.id))

    def _clear_retained(self, topic: str) -> None:
        if self.retained.clear(topic):
            self._changes.append(RetainedDeleted(topic))

    def _route(self, message: Message) -> int:
        """Queue the message for every matching session. Returns how many matched."""
        targets = self._targets(message)
        self._deliver_all(message, targets)
        return len(targets)

    def _targets(self, message: Message) -> list[Target]:
        """The sessions the message goes to, with QoS, retain flag and subscription ids."""
        normal, groups = self.router.match(message.topic)
        if not normal and not groups:
            return []
        targets: list[Target] = []
        sessions = self.sessions
        if len(normal) == 1:
            record = normal[0]
            if not (record.no_local and record.client_id == message.origin):
                targets.append((
                    sessions[record.client_id], message, min(record.qos, message.qos),
                    message.retain and record.retain_as_published,
                    (record.subscription_id,) if record.subscription_id else ()))
        elif normal and (per_topic := self.router.merged(message.topic, normal)) is not None:
            # Merged once per topic (Router.merged): one copy per client, at the highest QoS
            # of its matching subscriptions, with every matching subscription identifier.
            top = message.qos
            retain = message.retain
            for client_id, qos, as_published, sub_ids in per_topic:
                targets.append((sessions[client_id], message, qos if qos < top else top,
                                retain and as_published, sub_ids))
        elif normal:
            # One copy per client, at the highest QoS of its matching subscriptions, with
            # every matching subscription identifier [MQTT-3.3.5-1] (3.1.1), 3.3.4 (5.0).
            merged: dict[str, tuple[int, bool, tuple[int, ...]]] = {}
            for record in normal:
                client_id = record.client_id
                if record.no_local and client_id == message.origin:
                    continue  # [MQTT-3.8.3-3] (5.0)
                ids: tuple[int, ...] = ((record.subscription_id,) if record.subscription_id
                                        else ())
                seen = merged.get(client_id)
                if seen is None:
                    merged[client_id] = (record.qos, record.retain_as_published, ids)
                else:
                    merged[client_id] = (max(seen[0], record.qos),
                                         seen[1] or record.retain_as_published, seen[2] + ids)
            for client_id, (qos, as_published, ids) in merged.items():
                targets.append((sessions[client_id], message, min(qos, message.qos),
                                message.retain and as_published, ids))
        for group in groups:
            member = group.pick(self._is_online)
            if member is None:
                continue
            targets.append((
                sessions[member.client_id], message, min(member.qos, message.qos),
                message.retain and member.retain_as_published,
                (member.subscription_id,) if member.subscription_id else ()))
        return targets

    def _is_online(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        return session is not None and session.online

    def _deliver(self, session: Session, message: Message, qos: int, retain: bool,
                 subscription_ids: tuple[int, ...]) -> bool:
        online = session.online
        if not online and qos == 0 and not self.settings.queue_qos0_messages:
            return False
        backlog = session.backlog
        if backlog is not None and self._stream_marking is None:
            takes = backlog.takes.get(message.topic)  # _backlog_takes' cache, looked up here
            if takes is None:
                takes = self._backlog_takes(session, message)
            if takes:
                return self._backlog_deliver(session, message, qos)  # the log holds it
        if not self._make_room(session, message):
            return False
        delivery_id = self._next_delivery_id
        self._next_delivery_id = delivery_id + 1
        delivery = Delivery(delivery_id, message, qos, retain, subscription_ids, self._batch)
        delivery.stream = self._stream_marking  # a $stream/ subscription's (core/streams.py)
        session.append(delivery)
        if session.stored and (qos or not online):
            self._save_message(message)
            self._save_delivery(session, delivery)
        if online:
            # Woken when its oldest held delivery is durable (pull registers the next one):
            # the newest batch here would starve it while a flow keeps adding batches.
            self._wake.setdefault(session.client_id, self._batch)
        return True

    def _deliver_all(self, message: Message, targets: list[Target]) -> None:
        """Queue `message` for each target. A QoS 0 delivery to an online session in live
        mode with nothing queued goes by the fast lane (core/session.py): no Delivery, the
        packet built now (shared by every subscriber that gets it unchanged), under the same
        bounds and policy as the queue (`_make_room`); anything else by `_deliver`."""
        if message.expires_at is not None or self._stream_marking is not None:
            for target in targets:
                self._deliver(*target)
            return
        batch = self._batch
        queue_qos0 = self.settings.queue_qos0_messages
        size = -1  # the rest is set up at the first fast-lane target
        for target in targets:
            session, _, qos, retain, subscription_ids = target
            ready = session.ready
            if (qos or not session.online or session.backlog is not None or session.queue
                    or session.retained_pending or session.stream_history
                    or (ready and session.ready_batch != batch)
                    or (queue_qos0 and session.persistent)):
                self._deliver(*target)
                continue
            if size < 0:
                wake = self._wake
                settings = self.settings
                max_messages = settings.max_queued_messages
                max_bytes = settings.max_queued_bytes
                limit = settings.max_queued_memory_bytes
                memory = self.memory
                refs = memory.refs
                message_id = message.id
                size = len(message.payload)
                body = DELIVERY_OVERHEAD + MESSAGE_OVERHEAD + size + len(message.topic)
                shared: Publish | None = None
            if ((max_messages and len(ready) >> 1 >= max_messages)
                    or (max_bytes and session.queued_bytes + size > max_bytes)
                    or (limit and memory.used + body > limit)):
                if not self._make_room(session, message):
                    continue
                ready = session.ready
            if subscription_ids:
                # Only v5 sends them, but built whatever the level is now: the session may
                # be taken over by a connection of another level before this is pulled.
                packet = Publish(message.topic, message.payload, 0, retain, False, None,
                                 replace(message.properties,
                                         subscription_identifiers=subscription_ids))
            elif shared is not None and shared.retain == retain:
                packet = shared
            else:
                packet = shared = self._shared_qos0_packet(message, retain)
            if isinstance(ready, list):
                ready.append(packet)
                ready.append(message)
            else:
                session.ready = [packet, message]
                session.ready_batch = batch
            session.queued_bytes += size
            # QueueMemory.add, inline: a body counts once however many queues hold it.
            count = refs.get(message_id, 0)
            refs[message_id] = count + 1
            memory.used += DELIVERY_OVERHEAD if count else body
            wake.setdefault(session.client_id, batch)  # the oldest held batch wakes it

    def _shared_qos0_packet(self, message: Message, retain: bool) -> Publish:
        """The packet every subscriber getting `message` at QoS 0 unchanged gets (one
        instance, so the server encodes it once for all of them)."""
        key = message.id * 2 + retain
        qos0_packets = self._qos0_packets
        packet = qos0_packets.get(key)
        if packet is None:
            if len(qos0_packets) >= QOS0_PACKET_CACHE_SIZE:
                qos0_packets.clear()
            packet = qos0_packets[key] = Publish(message.topic, message.payload, 0, retain,
                                                 False, None, message.properties)
        return packet

    def _save_message(self, message: Message) -> None:
        if message.id != self._last_saved_message:
            self._last_saved_message = message.id
            self._changes.append(MessageSaved(message))

    def _save_delivery(self, session: Session, delivery: Delivery) -> None:
        if delivery.from_log:
            self._backlog_save_inflight(session, delivery)
            return
        if delivery.stream is not None:
            return  # the log holds it, and the subscription's cursor says how far it went
        delivery.persisted = True
        self._changes.append(DeliverySaved(DeliveryRecord(
            session.client_id, delivery.id, delivery.message.id, delivery.qos, delivery.retain,
            delivery.subscription_ids, delivery.packet_id, delivery.state, delivery.dup)))

    def _finish_inflight(self, session: Session, delivery: Delivery) -> None:
        assert delivery.packet_id is not None
        del session.inflight[delivery.packet_id]
        if delivery.from_log:
            self._backlog_clear_inflight(session, delivery)
        if delivery.persisted:
            self._changes.append(DeliveryDeleted(session.client_id, delivery.id))

    def _drop_queued_qos0(self, session: Session) -> None:
        session.clear_ready()
        if not any(d.qos == 0 for d in session.queue):
            return
        session.replace_queue([d for d in session.queue if d.qos > 0])

    def _publish_packet(self, session: Session, delivery: Delivery, now: float) -> Publish:
        message = delivery.message
        self.stats.publish_sent += 1
        properties = message.properties
        v5_extras = session.protocol_level == ProtocolLevel.MQTT_5 and (
            delivery.subscription_ids or message.expires_at is not None
            or delivery.stream is not None)
        if not delivery.qos and not v5_extras:
            return self._shared_qos0_packet(message, delivery.retain)
        if v5_extras:
            remaining = None
            if message.expires_at is not None:
                # [MQTT-3.3.2-6] (5.0): the interval minus the time spent waiting here.
                remaining = max(1, math.ceil(message.expires_at - now))
            if delivery.stream is not None and message.offset is not None:
                # Each replayed or live stream message names its offset, so a device can
                # resume from the last one it processed, plus one. Built in one call: a
                # message carries only pass-through properties (_pass_through), and
                # dataclasses.replace cost most of a replayed message's time (measured).
                p = properties
                properties = Properties(
                    payload_format_indicator=p.payload_format_indicator,
                    message_expiry_interval=remaining, content_type=p.content_type,
                    response_topic=p.response_topic, correlation_data=p.correlation_data,
                    subscription_identifiers=delivery.subscription_ids,
                    user_properties=(*p.user_properties, ("stream-offset", str(message.offset))))
            else:
                properties = replace(properties,
                                     subscription_identifiers=delivery.subscription_ids,
                                     message_expiry_interval=remaining)
        return Publish(message.topic, message.payload, delivery.qos, delivery.retain,
                       delivery.dup if delivery.qos else False, delivery.packet_id, properties)

    def _route_subscription(self, record: SubscriptionRecord) -> bool:
        """Put a subscription in the trie. Returns whether it is a shared subscription."""
        shared = parse_shared(record.topic_filter)
        if shared is None:
            self.router.subscribe(record, record.topic_filter)
            return False
        group, topic_filter = shared
        self.router.subscribe(record, topic_filter, group)
        return True

    def _unroute_subscription(self, record: SubscriptionRecord) -> None:
        shared = parse_shared(record.topic_filter)
        if shared is None:
            self.router.unsubscribe(record.client_id, record.topic_filter)
        else:
            self.router.unsubscribe(record.client_id, shared[1], shared[0])

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


def _pass_through(properties: Properties) -> Properties:
    """The properties a message carries from its publisher to its subscribers."""
    if (properties.payload_format_indicator is None and properties.content_type is None
            and properties.response_topic is None and properties.correlation_data is None
            and not properties.user_properties):
        return NO_PROPERTIES
    return Properties(
        payload_format_indicator=properties.payload_format_indicator,
        content_type=properties.content_type,
        response_topic=properties.response_topic,
        correlation_data=properties.correlation_data,
        user_properties=properties.user_properties,
    )
