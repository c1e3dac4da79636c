"""Outbound: the part of `BrokerCore` (a mixin of it, core/broker.py) that hands a connection
what it may send now (`pull`: resends, the fast lane, retained messages on SUBSCRIBE, stream
history, the queue, the backlog; within the inflight window and the commit watermark), builds
the packets, and ends in-flight deliveries on the client's acknowledgements.

Theory of operation: core/broker.py and core/session.py; docs/architecture.md ("The commit
watermark").
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Final, cast

from ..mqtt.packets import Publish, PubRel
from ..mqtt.properties import NO_PROPERTIES, Properties, expiry_left
from ..mqtt.types import ProtocolLevel, ReasonCode
from .changes import (
    AWAIT_ACK,
    AWAIT_COMP,
    DeliveryDeleted,
    Message,
    Qos2Released,
)
from .replay import EncodedPublish
from .routing import Routing
from .session import (
    Delivery,
    Session,
)

_AWAIT_ACK: Final = AWAIT_ACK  # a static when compiled, not a module-dict look-up

# A QoS 1 PUBLISH without properties, as `pull(plain=True)` hands it out: topic, payload,
# retain, dup, packet id (the server encodes it with Connection.send's QoS 1 hot path).
PlainQos1 = tuple[str, bytes, bool, bool, int]


class Outbound(Routing):
    """Mixin of BrokerCore (which provides the state declared in the bases)."""

    # -- acknowledgements -----------------------------------------------------------------

    def puback(self, client_id: str, packet_id: int, *, now: float) -> None:
        session = self.sessions[client_id]
        inflight = session.inflight
        delivery = inflight.get(packet_id)
        if delivery is None or delivery.qos != 1:
            return  # unknown id: nothing to do
        if delivery.from_log or delivery.persisted:
            self._finish_inflight(session, delivery)
        else:  # what _finish_inflight does for it (the QoS 1 hot path)
            del inflight[packet_id]

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
        session.release_qos2(packet_id)
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

    # -- outbound -------------------------------------------------------------------------

    def pull(self, client_id: str, *, now: float, limit: int = 256,
             plain: bool = False) -> list[Publish | PubRel | EncodedPublish | PlainQos1]:
        """What this client's connection may send now: resends first, then queued deliveries
        whose batch committed, within the inflight window. At most `limit` packets; a
        replayed stream message may come encoded already (core/replay.py). With `plain`, a
        first send of a QoS 1 message without properties comes as a `PlainQos1` tuple, not
        as a `Publish` (the server encodes it without one: the QoS 1 hot path)."""
        session = self.sessions.get(client_id)
        if session is None or not session.online:
            return []
        out: list[Publish | PubRel | EncodedPublish | PlainQos1] = []
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
                sent = self._stream_history_send(
                    session, cast("list[Publish | PubRel | EncodedPublish]", out), now, limit)
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
            delivery.state = _AWAIT_ACK
            inflight[packet_id] = delivery
            if session.stored and (delivery.qos == 2 or delivery.from_log):
                # A QoS 2 delivery's packet id is durable before it is sent: after a crash
                # it goes out again under the same id, so the client can tell the duplicate
                # [MQTT-4.3.3] (5.0). A QoS 1 delivery's is written at disconnect only (below),
                # unless read from the log (the cursor moves past it: core/backlog.py).
                if not delivery.persisted and not delivery.from_log:  # retained, on SUBSCRIBE
                    self._save_message(delivery.message)
                self._save_delivery(session, delivery)
            message = delivery.message
            if (delivery.subscription_ids or message.expires_at is not None
                    or delivery.stream is not None):
                out.append(self._publish_packet(session, delivery, now))
            else:  # what _publish_packet builds for it, in one step (the QoS 1/2 hot path)
                self.stats.publish_sent += 1
                if plain and delivery.qos == 1 and message.properties is NO_PROPERTIES:
                    out.append((message.topic, message.payload, delivery.retain, delivery.dup,
                                packet_id))
                else:
                    out.append(Publish(message.topic, message.payload, delivery.qos,
                                       delivery.retain, delivery.dup, packet_id,
                                       message.properties))
            delivery.dup = True  # any later send of it is a resend
        if queue and session.online and not (queue[0].batch <= committed
                                             or queue[0].batch in free):
            self._wake.setdefault(client_id, queue[0].batch)  # the next commit that matters
        return out

    def _finish_inflight(self, session: Session, delivery: Delivery) -> None:
        assert delivery.packet_id is not None
        del session.inflight[delivery.packet_id]
        if delivery.from_log:
            self._backlog_clear_inflight(session, delivery)
        if delivery.persisted:
            self._changes.append(DeliveryDeleted(session.client_id, delivery.id))

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
                remaining = expiry_left(message.expires_at, now)
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
