"""Queue bounds and their policy, and retained messages sent on SUBSCRIBE: the part of
`BrokerCore` (a mixin of it) that decides what a full queue drops or refuses, counts the
drops, and turns a subscription's pending retained topics into deliveries.

Theory of operation: docs/architecture.md, "Queue bounds and policies"; the user's view:
docs/configuration.md, "Queue bounds".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .changes import Change, DeliveryDeleted, Message
from .retain import RetainStore
from .session import DELIVERY_OVERHEAD, Delivery, QueueMemory, RetainedPending, Session, cost

if TYPE_CHECKING:
    from .broker import BrokerStats, CoreSettings

# Queue policies (docs/configuration.md, queue_full_policy).
DROP_OLDEST = "drop-oldest"
DROP_NEWEST = "drop-newest"
REFUSE = "refuse"
QUEUE_FULL_POLICIES = (DROP_OLDEST, DROP_NEWEST, REFUSE)
# Drop reasons, as named in $SYS/broker/publish/messages/dropped/<reason>.
QUEUE_FULL = "queue_full"
MEMORY_FULL = "memory_full"
STORE_FULL = "store_full"  # an offline drop-oldest backlog gave way to max_store_bytes
DROP_LOG_INTERVAL_S = 10.0

# A session, the message, the QoS and retain flag it gets it with, its subscription ids.
Target = tuple[Session, Message, int, bool, tuple[int, ...]]


class QueueBounds:
    """Mixin of BrokerCore (which provides the state declared here)."""

    settings: CoreSettings
    sessions: dict[str, Session]
    stats: BrokerStats
    memory: QueueMemory
    retained: RetainStore
    _changes: list[Change]
    _drops_unlogged: set[str]
    _drops_ended: dict[str, tuple[int, float]]
    _batch: int
    _next_delivery_id: int

    # Provided by BrokerCore. Plain methods, not stubs under TYPE_CHECKING: mypyc compiles
    # this class and does not accept conditional definitions in a class body.
    def _clear_retained(self, topic: str) -> None:
        raise NotImplementedError

    def _save_message(self, message: Message) -> None:
        raise NotImplementedError

    def _save_delivery(self, session: Session, delivery: Delivery) -> None:
        raise NotImplementedError

    def _fits(self, targets: list[Target], message: Message) -> bool:
        """Whether every target can queue the message without reaching a bound."""
        settings = self.settings
        queue_qos0 = settings.queue_qos0_messages
        size = len(message.payload)
        queued = 0
        for session, _, qos, _, _ in targets:
            if not session.online and qos == 0 and not queue_qos0:
                continue
            if not session.has_room(settings.max_queued_messages, settings.max_queued_bytes,
                                    size):
                return False
            queued += 1
        limit = settings.max_queued_memory_bytes
        return not (limit and queued and self.memory.used + cost(message)
                    + (queued - 1) * DELIVERY_OVERHEAD > limit)

    def _make_room(self, session: Session, message: Message) -> bool:
        """Apply `queue_full_policy` at the bounds. False: this delivery is dropped (counted).

        The session's own bounds drop its oldest queued deliveries (drop-oldest) or the new
        one (drop-newest, and refuse when the PUBLISH could not be refused: QoS 0, wills,
        $SYS). The broker-wide memory bound drops from the largest backlogs, not from
        whichever session happens to receive this message. Inflight deliveries are never
        dropped."""
        settings = self.settings
        policy = settings.queue_full_policy
        max_messages = settings.max_queued_messages
        max_bytes = settings.max_queued_bytes
        size = len(message.payload)
        if not session.has_room(max_messages, max_bytes, size):
            if policy == DROP_OLDEST:
                # The fast lane (core/session.py) holds the oldest entries: they go first.
                while session.ready and not session.has_room(max_messages, max_bytes, size):
                    session.drop_ready(oldest=True)
                    self._count_drop(session, QUEUE_FULL)
                while session.queue and not session.has_room(max_messages, max_bytes, size):
                    self._drop(session, session.popleft(), QUEUE_FULL)
            if not session.has_room(max_messages, max_bytes, size):
                self._count_drop(session, QUEUE_FULL)
                return False
        limit = settings.max_queued_memory_bytes
        if limit and self.memory.used + cost(message) > limit and (
                policy == REFUSE or not self._shed_memory(session, cost(message), limit)):
            self._count_drop(session, MEMORY_FULL)
            return False
        return True

    def _shed_memory(self, receiver: Session, needed: int, limit: int) -> bool:
        """Drop from the largest backlogs until `needed` more bytes fit, with 1% of the limit
        to spare (so the search for the largest is not repeated for every message). Returns
        False when the new delivery to `receiver` is what goes (drop-newest, and `receiver`
        has the largest backlog) or nothing queued is left to drop."""
        memory = self.memory
        target = max(0, limit - needed - limit // 100)
        oldest = self.settings.queue_full_policy == DROP_OLDEST
        while memory.used > target:
            victim = max((s for s in self.sessions.values() if s.queue or s.ready),
                         key=lambda s: s.queued_bytes + s.queued_count * DELIVERY_OVERHEAD,
                         default=None)
            if victim is None:
                return memory.used + needed <= limit
            if victim is receiver and not oldest:
                return False
            # The fast lane's entries are older than the queue's (core/session.py).
            while memory.used > target:
                if oldest and victim.ready:
                    victim.drop_ready(oldest=True)
                    self._count_drop(victim, MEMORY_FULL)
                elif victim.queue:
                    self._drop(victim, victim.popleft() if oldest else victim.pop(),
                               MEMORY_FULL)
                elif victim.ready:
                    victim.drop_ready(oldest=False)
                    self._count_drop(victim, MEMORY_FULL)
                else:
                    break
        return True

    def _drop(self, session: Session, delivery: Delivery, reason: str) -> None:
        if delivery.persisted:
            self._changes.append(DeliveryDeleted(session.client_id, delivery.id))
        self._count_drop(session, reason)

    def _count_drop(self, session: Session, reason: str) -> None:
        stats = self.stats
        stats.publish_dropped += 1
        if reason == QUEUE_FULL:
            stats.dropped_queue_full += 1
        elif reason == STORE_FULL:
            stats.dropped_store_full += 1
        else:
            stats.dropped_memory_full += 1
        session.dropped += 1
        session.drops_unlogged += 1
        self._drops_unlogged.add(session.client_id)

    @property
    def has_unlogged_drops(self) -> bool:
        return bool(self._drops_unlogged or self._drops_ended)

    def take_drop_reports(self, now: float, *, every: bool = False) -> list[tuple[str, int]]:
        """(client id, deliveries dropped since its last report) for each session with drops
        not reported in the last DROP_LOG_INTERVAL_S seconds: the server logs them, so the
        log gets at most one line per session per interval; a session that ended keeps its
        count until its interval is over. `every`: each session with drops not reported yet,
        however recent its last report (the broker is stopping)."""
        if not self._drops_unlogged and not self._drops_ended:
            return []
        reports: dict[str, int] = {}
        for client_id in list(self._drops_unlogged):
            session = self.sessions.get(client_id)
            if session is None or not session.drops_unlogged:  # ended: in _drops_ended
                self._drops_unlogged.discard(client_id)
            elif every or now - session.drop_logged_at >= DROP_LOG_INTERVAL_S:
                reports[client_id] = session.drops_unlogged
                session.drops_unlogged = 0
                session.drop_logged_at = now
                self._drops_unlogged.discard(client_id)
        for client_id, (count, logged_at) in list(self._drops_ended.items()):
            if every or now - logged_at >= DROP_LOG_INTERVAL_S:
                reports[client_id] = reports.get(client_id, 0) + count
                del self._drops_ended[client_id]
        return list(reports.items())

    def _next_retained(self, session: Session, entry: RetainedPending,
                       now: float) -> Delivery | None:
        """The next retained message of `entry` as a delivery (not yet taken from the list:
        the caller pops its topic once it has room to send it), or None after skipping a
        topic cleared meanwhile or an expired message (or when the list is done)."""
        topics = entry.topics
        if entry.topic_filter not in session.subscriptions:
            topics.clear()
            return None
        while topics:
            message = self.retained.get(topics[0])  # the current one, if replaced meanwhile
            if message is None:
                topics.popleft()
                continue
            if message.expires_at is not None and message.expires_at <= now:
                topics.popleft()
                self._clear_retained(message.topic)
                continue
            return Delivery(self._next_delivery_id, message, min(message.qos, entry.qos),
                            True, entry.subscription_ids, 0)
        return None

    def _queue_retained_pending(self, session: Session, now: float) -> None:
        """A persistent session goes offline with retained messages still to send: the QoS
        1/2 ones (QoS 0 too with queue_qos0_messages) become queued deliveries, as they would
        have been had they been queued on SUBSCRIBE; they are not subject to the bounds."""
        pending = session.retained_pending
        session.retained_pending = ()
        queue_qos0 = self.settings.queue_qos0_messages
        for entry in pending:
            while True:
                delivery = self._next_retained(session, entry, now)
                if delivery is None:
                    break
                entry.topics.popleft()
                self._next_delivery_id += 1
                if delivery.qos == 0 and not queue_qos0:
                    continue
                delivery.batch = self._batch
                session.append(delivery)
                if session.stored:
                    self._save_message(delivery.message)
                    self._save_delivery(session, delivery)


def forget_retained_pending(session: Session, topic_filter: str) -> None:
    """Stop sending the retained messages a subscription still had to get."""
    for entry in session.retained_pending:
        if entry.topic_filter == topic_filter:
            entry.topics.clear()
