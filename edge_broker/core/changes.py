"""The change records the core emits for persistence: the contract between core/ and store/.

The core is the only source of truth while the broker runs; a store only has to be able to
rebuild the same state at start-up (`store.base.Snapshot`). Records are appended to a batch in
the order the core makes them; a store applies a batch atomically and in order. Later records
win over earlier ones for the same key, so a store may coalesce within a batch (a delivery
saved and deleted in one batch need not touch the disk).

The records are slotted dataclasses that are hashable but not frozen: the core makes one or two
per message, and construction of a frozen dataclass costs about four times as much. Never
modify one after it is made.

Keys:
- session: client_id. `SessionDeleted` removes the session's subscriptions, deliveries and
  incoming QoS 2 state too.
- subscription: (client_id, topic_filter)
- message: message id (bodies are shared; a store may drop a body once no delivery and no
  retained entry refers to it)
- delivery: (client_id, delivery id); delivery ids grow monotonically, so they also give the
  queue order of a session
- incoming QoS 2 packet id: (client_id, packet_id)
- retained: topic
- log entry: `LogAppended` is never coalesced: each one is appended once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mqtt.packets import Will
from ..mqtt.properties import NO_PROPERTIES, Properties

# Session Expiry Interval meaning "never expires", 3.1.2.11.2 (5.0).
EXPIRY_NEVER = 0xFFFFFFFF


@dataclass(slots=True, init=False)
class Message:
    """An application message as it entered the broker; shared by every delivery of it.

    Not frozen, for construction speed (one per PUBLISH; see `mqtt.packets.Publish`), but
    never modified after it is made. Its `__init__` is written out (the same as the one
    @dataclass would generate, defaults included) so that mypyc compiles it: the compiled
    build otherwise runs the dataclass-generated Python `__init__` for every message."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    # Pass-through properties only: payload format, content type, response topic,
    # correlation data, user properties. Expiry is `expires_at`; aliases and subscription
    # identifiers belong to a connection or a subscriber.
    properties: Properties = NO_PROPERTIES
    received_at: float = 0.0
    expires_at: float | None = None  # wall clock, from the Message Expiry Interval
    origin: str = ""  # publishing client id ("" for the broker itself), for No Local
    # Its offset in the store's append-only log when a named stream records it (the core
    # assigns offsets in append order, as the log does: see core/streams.py); else None.
    offset: int | None = None

    def __init__(self, id: int, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties = NO_PROPERTIES, received_at: float = 0.0,
                 expires_at: float | None = None, origin: str = "",
                 offset: int | None = None) -> None:
        self.id = id
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.received_at = received_at
        self.expires_at = expires_at
        self.origin = origin
        self.offset = offset


@dataclass(slots=True, unsafe_hash=True)
class SessionRecord:
    client_id: str
    protocol_level: int
    expiry_interval: int  # seconds; EXPIRY_NEVER for a 3.1.1 persistent session without cap
    will: Will | None = None
    # None while connected; the wall-clock time of the disconnect otherwise.
    disconnected_at: float | None = None
    # The authenticated username of its last connection (a password login or a certificate
    # identity), None for an anonymous one: a will published after a restart is
    # authorised as this user [MQTT-3.1.2-8] (5.0).
    username: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class SubscriptionRecord:
    client_id: str
    topic_filter: str  # as the client sent it, "$share/group/..." included
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None


# Delivery states.
QUEUED = 0  # waiting to be sent
AWAIT_ACK = 1  # PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
AWAIT_COMP = 2  # PUBREL sent, waiting for PUBCOMP


@dataclass(slots=True, unsafe_hash=True)
class DeliveryRecord:
    client_id: str
    delivery_id: int
    message_id: int
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...] = ()
    packet_id: int | None = None
    state: int = QUEUED
    dup: bool = False


@dataclass(slots=True, unsafe_hash=True)
class SessionSaved:
    record: SessionRecord


@dataclass(slots=True, unsafe_hash=True)
class SessionDeleted:
    client_id: str


@dataclass(slots=True, unsafe_hash=True)
class SubscriptionSaved:
    record: SubscriptionRecord


@dataclass(slots=True, unsafe_hash=True)
class SubscriptionDeleted:
    client_id: str
    topic_filter: str


@dataclass(slots=True, unsafe_hash=True)
class MessageSaved:
    message: Message


@dataclass(slots=True, unsafe_hash=True)
class DeliverySaved:
    record: DeliveryRecord


@dataclass(slots=True, unsafe_hash=True)
class DeliveryDeleted:
    client_id: str
    delivery_id: int


@dataclass(slots=True, unsafe_hash=True)
class Qos2Received:
    """An incoming QoS 2 PUBLISH was accepted; its packet id blocks duplicates until PUBREL."""

    client_id: str
    packet_id: int


@dataclass(slots=True, unsafe_hash=True)
class Qos2Released:
    client_id: str
    packet_id: int


@dataclass(slots=True, unsafe_hash=True)
class RetainedSaved:
    topic: str
    message_id: int


@dataclass(slots=True, unsafe_hash=True)
class RetainedDeleted:
    topic: str


@dataclass(slots=True, unsafe_hash=True)
class LogAppended:
    """A message some named stream records: the store appends it to its log, in batch order,
    at `message.offset` (which the core assigned: the log's next offset)."""

    message: Message


@dataclass(slots=True, unsafe_hash=True)
class StreamCursorSaved:
    """Where a stored session's `$stream/` subscription resumes after a restart: a position
    as in `stream-offset` ("earliest", an offset to start at, an ISO time). Deleted with the
    subscription (SubscriptionDeleted) or the session."""

    client_id: str
    topic_filter: str
    position: str


@dataclass(slots=True, unsafe_hash=True)
class DownlinkPosition:
    """A bridge's remote position (JetStream stream sequence, Kafka offset per
    "<topic>:<partition>", an MQTT QoS 2 packet identifier held until PUBREL), written in the
    same transaction as the message published locally with it (core/downlink.py), so a crash
    between the local commit and the remote acknowledgement neither loses nor doubles it.
    `position` < 0 forgets the source (an MQTT packet identifier released)."""

    bridge: str
    source: str
    position: int


# -- log readers (core/backlog.py): a persistent session's backlog while it is offline ----
# Applied by the store after the group's `LogAppended` records, in order. `SessionDeleted`
# removes the session's reader too (readers of sessions are named `reader_name(client_id)`).


@dataclass(slots=True, unsafe_hash=True)
class ReaderOpened:
    """Make (or replace) a reader at `offset` with `filters` ((topic filter, since), ...):
    it selects the rows after `offset` whose topic one of its filters matches above its
    since. In-flight entries of a replaced reader are kept."""

    reader: str
    offset: int
    filters: tuple[tuple[str, int], ...]


@dataclass(slots=True, unsafe_hash=True)
class ReaderFilterSaved:
    reader: str
    topic_filter: str
    since: int


@dataclass(slots=True, unsafe_hash=True)
class ReaderFilterDeleted:
    reader: str
    topic_filter: str


@dataclass(slots=True, unsafe_hash=True)
class ReaderMoved:
    """Every selected row at or below `offset` is done, except the reader's in-flight
    entries. Later records win."""

    reader: str
    offset: int


@dataclass(slots=True, unsafe_hash=True)
class ReaderCounted:
    """The session's own count of its backlog (what the queue bounds apply to: messages,
    payload bytes, oldest still to skip by drop-oldest). Later records win."""

    reader: str
    count: int
    bytes: int
    skip: int


@dataclass(slots=True, unsafe_hash=True)
class ReaderRangesSaved:
    """What a session's unsubscribed or replaced subscriptions left to read in its backlog
    (core/backlog.py, `Backlog.closing`): replaces every range the store holds for the
    reader (none: forgets them). Each range is (topic filter, since, until, the old
    subscription): it selects the rows in (since, until] as that subscription would have.
    `subscribed` gives the since of each of those filters that is subscribed again (the
    store's filter keeps the lowest since, which the log's selection uses). Written in the
    batch that changed them, so a restart restores them."""

    reader: str
    ranges: tuple[tuple[str, int, int, SubscriptionRecord], ...]
    subscribed: tuple[tuple[str, int], ...]


@dataclass(slots=True, unsafe_hash=True)
class ReaderClosed:
    """Forget a reader, its filters and in-flight entries (the session went live)."""

    reader: str


@dataclass(slots=True, unsafe_hash=True)
class InflightSaved:
    """A delivery read from the log, in flight under `packet_id`: durable before it is sent
    (so it goes out again under the same id after a crash, QoS 2 exactly once)."""

    reader: str
    packet_id: int
    offset: int
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...]
    state: int
    dup: bool


@dataclass(slots=True, unsafe_hash=True)
class InflightCleared:
    reader: str
    packet_id: int


ReaderChange = (
    ReaderOpened | ReaderFilterSaved | ReaderFilterDeleted | ReaderMoved | ReaderClosed
    | InflightSaved | InflightCleared | ReaderCounted | ReaderRangesSaved
)

Change = (
    SessionSaved | SessionDeleted | SubscriptionSaved | SubscriptionDeleted | MessageSaved
    | DeliverySaved | DeliveryDeleted | Qos2Received | Qos2Released | RetainedSaved
    | RetainedDeleted | LogAppended | StreamCursorSaved | ReaderOpened | ReaderFilterSaved
    | ReaderFilterDeleted | ReaderMoved | ReaderClosed | InflightSaved | InflightCleared
    | ReaderCounted | ReaderRangesSaved | DownlinkPosition
)


SESSION_READER_PREFIX = "session:"


def reader_name(client_id: str) -> str:
    """The log reader of a persistent session."""
    return SESSION_READER_PREFIX + client_id


@dataclass(slots=True)
class InflightEntry:
    """A stored in-flight delivery read from the log (start-up)."""

    packet_id: int
    message: Message  # with its offset
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...]
    state: int
    dup: bool


@dataclass(slots=True)
class ReaderState:
    """A reader as the store holds it (start-up): counters and cursor, never the rows."""

    offset: int
    filters: dict[str, int]  # topic filter -> since
    backlog_count: int = 0  # the session's count (ReaderCounted)
    backlog_bytes: int = 0
    skip: int = 0
    inflight: list[InflightEntry] = field(default_factory=list)
    # ReaderRangesSaved: (topic filter, since, until, subscription), and filter -> since of
    # the filters among them subscribed again.
    ranges: list[tuple[str, int, int, SubscriptionRecord]] = field(default_factory=list)
    subscribed: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Snapshot:
    """Everything a store holds, as the core needs it to rebuild its state at start-up."""

    sessions: list[SessionRecord]
    subscriptions: list[SubscriptionRecord]
    messages: dict[int, Message]
    deliveries: list[DeliveryRecord]  # in delivery id order
    retained: dict[str, int]  # topic -> message id
    incoming_qos2: list[tuple[str, int]]  # (client id, packet id)
    log_last_offset: int = 0  # the last offset the store's log assigned (0: none yet)
    # (client id, $stream/ filter) -> position to resume from (StreamCursorSaved)
    stream_cursors: dict[tuple[str, str], str] = field(default_factory=dict)
    readers: dict[str, ReaderState] = field(default_factory=dict)  # by reader name

    @classmethod
    def empty(cls) -> Snapshot:
        return cls([], [], {}, [], {}, [])
