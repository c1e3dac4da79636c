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
bytes counted). A message that would exceed either bound is dropped on arrival: the oldest
messages, which the subscriber is about to receive, are kept, as mosquitto does. `dropped`
counts them.

On reconnect with a present session, every inflight delivery is sent again first, in order,
with its original packet id: PUBLISH with DUP set, or PUBREL [MQTT-4.4.0-1] (5.0).
"""

from __future__ import annotations

from collections import deque

from ..mqtt.packets import Will
from .changes import AWAIT_ACK, QUEUED, Message, SubscriptionRecord


class Delivery:
    """One message on its way to one session."""

    __slots__ = ("batch", "dup", "id", "message", "packet_id", "persisted", "qos", "retain",
                 "state", "subscription_ids")

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

    def __repr__(self) -> str:
        return (f"Delivery(id={self.id}, topic={self.message.topic!r}, qos={self.qos}, "
                f"packet_id={self.packet_id}, state={self.state})")


class Session:
    __slots__ = ("client_id", "disconnected_at", "dropped", "epoch", "expires_at",
                 "expiry_interval", "incoming_qos2", "inflight", "inflight_max",
                 "next_packet_id", "online", "protocol_level", "queue", "queued_bytes",
                 "resend", "stored", "subscriptions", "will", "will_due_at")

    def __init__(self, client_id: str, protocol_level: int, expiry_interval: int) -> None:
        self.client_id = client_id
        self.protocol_level = protocol_level
        self.expiry_interval = expiry_interval
        self.online = False
        self.epoch = 0  # bumped on every connect; stale connections are told apart by it
        self.will: Will | None = None
        self.will_due_at: float | None = None
        self.disconnected_at: float | None = None
        self.expires_at: float | None = None
        self.subscriptions: dict[str, SubscriptionRecord] = {}
        # Created on the first delivery: an empty deque is 760 bytes per idle connection.
        self.queue: deque[Delivery] | tuple[()] = ()
        self.queued_bytes = 0
        self.inflight: dict[int, Delivery] = {}  # packet id -> delivery, in send order
        # Inflight deliveries to send again after a reconnect; a deque only while there are
        # some (an empty deque is 760 bytes, per idle connection).
        self.resend: deque[Delivery] | tuple[()] = ()
        self.inflight_max = 20
        self.incoming_qos2: set[int] = set()
        self.next_packet_id = 1
        self.dropped = 0
        self.stored = False  # whether the store holds this session (see BrokerCore._store_session)

    @property
    def persistent(self) -> bool:
        """Whether the session outlives its network connection and is kept in the store."""
        return self.expiry_interval > 0

    def allocate_packet_id(self) -> int:
        """A packet id not used by any inflight delivery; requires a free one to exist."""
        candidate = self.next_packet_id
        inflight = self.inflight
        while candidate in inflight:
            candidate = candidate % 0xFFFF + 1
        self.next_packet_id = candidate % 0xFFFF + 1
        return candidate

    def has_room(self, max_messages: int, max_bytes: int, payload_size: int) -> bool:
        if max_messages and len(self.queue) >= max_messages:
            return False
        return not (max_bytes and self.queued_bytes + payload_size > max_bytes)

    def append(self, delivery: Delivery) -> None:
        queue = self.queue
        if not isinstance(queue, deque):
            queue = self.queue = deque()
        queue.append(delivery)
        self.queued_bytes += len(delivery.message.payload)

    def popleft(self) -> Delivery:
        queue = self.queue
        assert isinstance(queue, deque)
        delivery = queue.popleft()
        self.queued_bytes -= len(delivery.message.payload)
        return delivery

    def replace_queue(self, kept: list[Delivery]) -> None:
        """Keep only `kept` (in order) in the queue."""
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
        self.queue = ()
        self.resend = ()
        self.queued_bytes = 0
