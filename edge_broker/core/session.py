"""One client's session: subscriptions, outbound queue and inflight window, incoming QoS 2 ids,
will and expiry.

Theory of operation. Every message routed to a session becomes a `Delivery` appended to
`queue`. A connection pulls from the session (`BrokerCore.pull`): QoS 0 deliveries leave the
queue as they are sent; QoS 1/2 deliveries get a packet id and move to `inflight` (at most
`inflight_max`, which is the server's `max_inflight_messages` capped by the client's Receive
Maximum) until the client acknowledges them. Nothing in `queue` is sent before the store has
committed the batch that queued it (`Delivery.batch` against the core's commit watermark), so a
crash can never leave a client holding a message the broker forgot it sent.

The queue is bounded (`max_queued_messages`, `max_queued_bytes`, inflight excluded, payload
bytes counted), and all queues together by `max_queued_memory_bytes` (estimated by
`QueueMemory`: a message body counts once however many queues hold it, plus an overhead per
delivery). What happens at a bound is `queue_full_policy` (BrokerCore._make_room); `dropped`
counts this session's drops.

Retained messages sent on SUBSCRIBE are not queued as deliveries: `retained_pending` holds, per
subscription, the list of matching retained topics still to send; `BrokerCore.pull` turns them
into deliveries one by one, under flow control, looking up the current retained message.

The fast lane. A QoS 0 message for an online session in live mode whose queue is empty (no
retained topics or stream history waiting either) does not become a `Delivery`: the packet it
goes out as is built at once and kept in `ready`, alternating with its message (packet,
message, packet, message...), until the connection pulls it. `ready` only ever holds entries
of one batch (`ready_batch`, the commit watermark applies to them as to the queue) and is
older than everything in `queue` (while it holds a batch, later batches' deliveries are
queued), so per-session order holds. Its entries count against the same bounds (messages,
bytes, memory) and are dropped by the same policy, oldest first; they are never stored (a
QoS 0 delivery to an online session is not), and a persistent session going offline drops
them with its other queued QoS 0 deliveries (which is why the lane is not used for persistent
sessions with `queue_qos0_messages`).

On reconnect with a present session, every inflight delivery is sent again first, in order,
with its original packet id: PUBLISH with DUP set, or PUBREL [MQTT-4.4.0-1] (5.0).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final, cast

from ..mqtt.packets import Publish, Will
from .changes import AWAIT_ACK, QUEUED, Message, SubscriptionRecord

if TYPE_CHECKING:
    from .backlog import Backlog
    from .streams import StreamSub

# Estimated memory of one queued delivery (Delivery object, deque slot) and of one message
# body besides its payload and topic (Message object, properties); measured with
# sys.getsizeof on CPython 3.11, rounded up.
DELIVERY_OVERHEAD: Final = 160
MESSAGE_OVERHEAD: Final = 200
_NO_IDS: frozenset[int] = frozenset()  # shared by every session without QoS 2 ids


class QueueMemory:
    """The broker-wide estimate of memory held by queued deliveries (shared by all sessions)."""

    __slots__ = ("refs", "used")

    def __init__(self) -> None:
        self.used = 0
        self.refs: dict[int, int] = {}  # message id -> queued deliveries of it

    def add(self, message: Message) -> None:
        refs = self.refs
        count = refs.get(message.id, 0)
        refs[message.id] = count + 1
        self.used += DELIVERY_OVERHEAD if count else (
            DELIVERY_OVERHEAD + MESSAGE_OVERHEAD + len(message.payload) + len(message.topic))

    def remove(self, message: Message) -> None:
        refs = self.refs
        count = refs.pop(message.id, 1) - 1
        if count:
            refs[message.id] = count
            self.used -= DELIVERY_OVERHEAD
        else:
            self.used -= (DELIVERY_OVERHEAD + MESSAGE_OVERHEAD + len(message.payload)
                          + len(message.topic))


def cost(message: Message) -> int:
    """The most one more queued delivery of `message` can add to `QueueMemory.used`."""
    return DELIVERY_OVERHEAD + MESSAGE_OVERHEAD + len(message.payload) + len(message.topic)


class RetainedPending:
    """Retained topics still to send for one subscription (made by SUBSCRIBE)."""

    __slots__ = ("after", "batch", "qos", "subscription_ids", "topic_filter", "topics")

    def __init__(self, topic_filter: str, topics: list[str], qos: int,
                 subscription_ids: tuple[int, ...], batch: int, after: int) -> None:
        self.topic_filter = topic_filter
        self.topics = deque(topics)
        self.qos = qos
        self.subscription_ids = subscription_ids
        self.batch = batch  # sent only once this batch (the SUBACK's) committed
        self.after = after  # queued deliveries with a lower id go first


class Delivery:
    """One message on its way to one session."""

    __slots__ = ("batch", "dup", "from_log", "id", "message", "packet_id", "persisted", "qos",
                 "retain", "state", "stream", "subscription_ids")

    def __init__(self, delivery_id: int, message: Message, qos: int, retain: bool,
                 subscription_ids: tuple[int, ...], batch: int) -> None:
        self.id = delivery_id
        self.message = message
        self.qos = qos
        self.retain = retain
        self.subscription_ids = subscription_ids
        self.packet_id: int | None = None
        self.state = QUEUED
        self.dup = False
        self.batch = batch  # the change batch that queued it; sent only once that committed
        self.persisted = False  # whether the store holds a row for it
        # Sent for this $stream/ subscription: carries the user property stream-offset
        # (v5), is never written as a delivery row (the log and the cursor cover it).
        self.stream: StreamSub | None = None
        # Read from the log for a persistent session's backlog (core/backlog.py): in flight,
        # it is stored as the reader's in-flight entry, not as a delivery row.
        self.from_log = False

    def __repr__(self) -> str:
        return (f"Delivery(id={self.id}, topic={self.message.topic!r}, qos={self.qos}, "
                f"packet_id={self.packet_id}, state={self.state})")


class Session:
    __slots__ = ("backlog", "backlog_bytes", "backlog_count", "client_id", "disconnected_at",
                 "drop_logged_at", "dropped", "drops_unlogged", "epoch", "expires_at",
                 "expiry_interval", "incoming_qos2", "inflight", "inflight_max", "memory",
                 "next_packet_id", "online", "protocol_level",
                 "queue", "queued_bytes", "ready", "ready_batch", "resend",
                 "retained_pending", "stored", "stream_history", "subscriptions", "username",
                 "will", "will_due_at")

    def __init__(self, client_id: str, protocol_level: int, expiry_interval: int,
                 memory: QueueMemory | None = None) -> None:
        self.client_id = client_id
        self.protocol_level = protocol_level
        self.expiry_interval = expiry_interval
        self.online = False
        self.epoch = 0  # bumped on every connect; stale connections are told apart by it
        self.will: Will | None = None
        # Who its last connection authenticated as (None: anonymous); its will is published
        # with this user's rights, also after a restart (SessionRecord.username).
        self.username: str | None = None
        self.will_due_at: float | None = None
        self.disconnected_at: float | None = None
        self.expires_at: float | None = None
        self.subscriptions: dict[str, SubscriptionRecord] = {}
        # Created on the first delivery: an empty deque is 760 bytes per idle connection.
        self.queue: deque[Delivery] | tuple[()] = ()
        self.queued_bytes = 0
        # The fast lane (above): () or a non-empty list of Publish, Message pairs, all of
        # batch `ready_batch`, sent before `queue`.
        self.ready: list[Publish | Message] | tuple[()] = ()
        self.ready_batch = 0
        self.inflight: dict[int, Delivery] = {}  # packet id -> delivery, in send order
        # Inflight deliveries to send again after a reconnect; a deque only while there are
        # some (an empty deque is 760 bytes, per idle connection).
        self.resend: deque[Delivery] | tuple[()] = ()
        self.inflight_max = 20
        # QoS 2 ids accepted, PUBREL not yet received: a set only once there was one (an
        # empty set is 216 bytes per idle connection; accept_qos2, release_qos2).
        self.incoming_qos2: set[int] | frozenset[int] = _NO_IDS
        self.next_packet_id = 1
        self.dropped = 0  # deliveries dropped by the queue policy, since the session began
        self.drops_unlogged = 0  # of which not yet logged
        self.drop_logged_at = -1e18
        self.memory = memory if memory is not None else QueueMemory()
        self.retained_pending: deque[RetainedPending] | tuple[()] = ()
        self.stored = False  # whether the store holds this session (see BrokerCore._store_session)
        # $stream/ subscriptions still replaying their history, in SUBSCRIBE order (a list
        # only while there are some; core/streams.py): they go before the queue.
        self.stream_history: list[StreamSub] | tuple[()] = ()
        # While offline (and after a reconnect until it caught up), a stored session's
        # messages go to the log, read back through this cursor (core/backlog.py); None: live.
        self.backlog: Backlog | None = None
        self.backlog_count = 0  # messages for it in the log not yet handed out (bounds)
        self.backlog_bytes = 0  # their payload bytes

    @property
    def persistent(self) -> bool:
        """Whether the session outlives its network connection and is kept in the store."""
        return self.expiry_interval > 0

    def accept_qos2(self, packet_id: int) -> None:
        """A QoS 2 PUBLISH accepted: its id is kept until its PUBREL (4.3.3 (5.0))."""
        ids = self.incoming_qos2
        if not isinstance(ids, set):
            ids = self.incoming_qos2 = set()
        ids.add(packet_id)

    def release_qos2(self, packet_id: int) -> None:
        """Its PUBREL arrived: the id is free again."""
        ids = self.incoming_qos2
        if isinstance(ids, set):
            ids.discard(packet_id)

    def allocate_packet_id(self) -> int:
        """A packet id not used by any inflight delivery; requires a free one to exist."""
        candidate = self.next_packet_id
        inflight = self.inflight
        while candidate in inflight:
            candidate = candidate % 0xFFFF + 1
        self.next_packet_id = candidate % 0xFFFF + 1
        return candidate

    @property
    def queued_count(self) -> int:
        """Deliveries waiting to be sent: the queue and the fast lane."""
        return len(self.queue) + (len(self.ready) >> 1)

    def has_room(self, max_messages: int, max_bytes: int, payload_size: int) -> bool:
        if max_messages and (len(self.queue) + (len(self.ready) >> 1) + self.backlog_count
                             >= max_messages):
            return False
        return not (max_bytes and self.queued_bytes + self.backlog_bytes + payload_size
                    > max_bytes)

    def append(self, delivery: Delivery) -> None:
        queue = self.queue
        if isinstance(queue, tuple):  # (a tuple check costs less than a deque one compiled)
            queue = self.queue = deque()
        queue.append(delivery)
        self.queued_bytes += len(delivery.message.payload)
        self.memory.add(delivery.message)

    def popleft(self) -> Delivery:
        queue = self.queue
        assert not isinstance(queue, tuple)
        delivery = queue.popleft()
        self.queued_bytes -= len(delivery.message.payload)
        self.memory.remove(delivery.message)
        return delivery

    def pop(self) -> Delivery:
        """Remove the newest queued delivery."""
        queue = self.queue
        assert isinstance(queue, deque)
        delivery = queue.pop()
        self.queued_bytes -= len(delivery.message.payload)
        self.memory.remove(delivery.message)
        return delivery

    def release_ready(self, messages: list[Message]) -> None:
        """Fast-lane entries of these messages left the session (sent or dropped): their
        bytes and memory are no longer held."""
        memory = self.memory
        refs = memory.refs
        released = payload = 0
        for message in messages:
            size = len(message.payload)
            payload += size
            message_id = message.id
            count = refs.pop(message_id, 1) - 1
            if count:
                refs[message_id] = count
                released += DELIVERY_OVERHEAD
            else:
                released += DELIVERY_OVERHEAD + MESSAGE_OVERHEAD + size + len(message.topic)
        memory.used -= released
        self.queued_bytes -= payload

    def drop_ready(self, *, oldest: bool) -> None:
        """Remove the oldest (or newest) fast-lane entry (the queue policy drops it)."""
        ready = self.ready
        assert isinstance(ready, list)
        if oldest:
            message = ready[1]
            del ready[:2]
        else:
            message = ready[-1]
            del ready[-2:]
        if not ready:
            self.ready = ()
        assert isinstance(message, Message)
        self.release_ready([message])

    def clear_ready(self) -> None:
        ready = self.ready
        if ready:
            self.ready = ()
            self.release_ready(cast("list[Message]", ready[1::2]))

    def replace_queue(self, kept: list[Delivery]) -> None:
        """Keep only `kept` (in order) in the queue."""
        for delivery in self.queue:
            self.memory.remove(delivery.message)
        self.queue = ()
        self.queued_bytes = 0
        for delivery in kept:
            self.append(delivery)

    def start_resend(self) -> None:
        """After a reconnect: everything inflight goes out again first, in order."""
        if not self.inflight:
            self.resend = ()
            return
        self.resend = deque(self.inflight.values())
        for delivery in self.resend:
            if delivery.state == AWAIT_ACK:
                delivery.dup = True

    def clear_deliveries(self) -> None:
        """Drop every queued and inflight delivery (the session ends; the store's cascading
        SessionDeleted removes their rows)."""
        self.inflight.clear()
        self.clear_ready()
        for delivery in self.queue:
            self.memory.remove(delivery.message)
        self.queue = ()
        self.resend = ()
        self.retained_pending = ()
        self.queued_bytes = 0
