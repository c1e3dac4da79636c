"""Routing and delivery: the part of `BrokerCore` (a mixin of it, core/broker.py) that takes
a PUBLISH (a client's, a will, $SYS), makes its message, finds the sessions it goes to and
queues it for each of them, or puts it in the fast lane (core/session.py), and records what
must be stored (the message body, delivery rows).

Theory of operation: core/broker.py (the core as a whole), docs/architecture.md ("One
PUBLISH, end to end", "The fast lane", "Queue bounds and policies").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from ..mqtt.errors import RemoteProtocolError
from ..mqtt.packets import Publish
from ..mqtt.properties import NO_PROPERTIES, Properties
from ..mqtt.types import ReasonCode
from .backlog import BacklogRouting
from .changes import (
    DeliveryRecord,
    DeliverySaved,
    Message,
    MessageSaved,
    Qos2Received,
    RetainedDeleted,
    RetainedSaved,
)
from .queues import REFUSE, Target
from .router import Router
from .session import (
    DELIVERY_OVERHEAD,
    MESSAGE_OVERHEAD,
    Delivery,
    Session,
)

QOS0_PACKET_CACHE_SIZE: Final = 1024


class Routing(BacklogRouting):
    """Mixin of BrokerCore (which provides the state declared here and in the bases). A
    single chain of bases: mypyc compiles no multiple inheritance."""

    router: Router
    _free: set[int]
    _wake: dict[str, int]
    _last_saved_message: int
    _qos0_packets: dict[int, Publish]

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
            session.accept_qos2(packet_id)
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
        store; $SYS updates do not, to spare the flash. A stream or a bridge's uplink whose
        filter names $SYS topics (`#` does not [MQTT-4.7.2-1]) records it, as any message."""
        message = self._new_message(topic, payload, qos, retain, NO_PROPERTIES, "", now)
        if retain:
            self._retain(message, persist=persist)
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
