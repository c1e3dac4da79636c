"""Subscriptions: the part of `BrokerCore` (a mixin of it, core/broker.py) that handles
SUBSCRIBE and UNSUBSCRIBE: the subscription trie, `$stream/` filters (core/streams.py),
retained messages listed for sending on SUBSCRIBE (`RetainedPending`), backlog readers' filters
(core/backlog.py).
"""

from __future__ import annotations

from collections import deque

from ..mqtt.packets import Subscribe, Subscription, Unsubscribe
from ..mqtt.topics import is_valid_topic_filter, parse_shared
from ..mqtt.types import ProtocolLevel, ReasonCode
from .changes import (
    SubscriptionDeleted,
    SubscriptionRecord,
    SubscriptionSaved,
)
from .outbound import Outbound
from .queues import forget_retained_pending
from .session import (
    RetainedPending,
    Session,
)
from .streams import (
    STREAM_PREFIX,
    parse_position,
    parse_stream_filter,
    stream_offset_property,
)


class Subscriptions(Outbound):
    """Mixin of BrokerCore (which provides the state declared in the bases)."""

    retained_listed: int  # retained topics the last SUBSCRIBE listed to send (fairness)

    # -- subscriptions --------------------------------------------------------------------

    def subscribe(self, client_id: str, packet: Subscribe, *, now: float) -> tuple[int, ...]:
        """Returns the SUBACK reason codes. Retained messages are queued behind the SUBACK."""
        session = self.sessions[client_id]
        ids = packet.properties.subscription_identifiers
        subscription_id = ids[0] if ids else None
        codes: list[int] = []
        v5 = session.protocol_level == ProtocolLevel.MQTT_5
        offset_text = stream_offset_property(packet.properties) if v5 else None
        self.retained_listed = 0
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
            self.retained_listed += len(topics)
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
