"""Named streams in the core: which messages the log records, and `$stream/` subscriptions
(replay of a stream's history, then its live messages). A mixin of `BrokerCore`.

Theory of operation.

*Appending.* The core holds the configured streams' filters in a trie of its own
(`set_streams`). A message whose topic one of them matches (QoS 0 included, whether or not
anyone subscribes) gets the log's next offset and a `LogAppended` record in the current batch;
the store appends it in the same group transaction as the rest of the batch. The core assigns
the offsets itself: the log assigns `last_offset + 1, ...` in append order, batches are
committed in order and every `LogAppended` is appended exactly once, so both agree (the store
checks it). Start-up takes the log's last offset from the snapshot. A QoS 1/2 message a stream
takes is acknowledged 0x00 after the commit, like one queued for a session; a QoS 0 message
that cannot be stored (`stream_full()`, i.e. the store is full) is dropped from the streams
and counted in `stats.stream_dropped`, never refused.

*Replay.* A `$stream/<name>[@<position>][/<filter>]` subscription is a `StreamSub`, not an
entry of the subscription trie. At SUBSCRIBE the core notes `live_from`, the next offset it
will assign: messages from there on are live and reach the subscription as they are
published (queued in the session's queue, bounded and dropped as any delivery). The history
is `[start, live_from - 1]`, `start` from the position (resolved by the store). The core never
awaits: `take_stream_fetches()` lists the pages the server must read from the store (only once
the SUBSCRIBE's batch committed, so every offset below `live_from` is in the file), and
`stream_page()` hands the rows back; `pull()` sends a subscription's history before anything
of the session's queue, under the same flow control. A page ending at `live_from - 1` ends the
history, and the queue (which holds the live messages from `live_from` on) follows: no gap
and no duplicate at the seam. Each message goes out under its original topic, at
min(granted QoS, its QoS), with the user property `stream-offset` (MQTT 5 only).

*Persistent sessions.* A stored session's stream subscription has a cursor in the store
(`StreamCursorSaved`: the position it resumes from), written at SUBSCRIBE and at disconnect
(so at a graceful stop): the oldest offset it has in flight, else the one after the last it
was sent. Its deliveries are never written as delivery rows: the log holds the messages.
After a restart it replays from the cursor, then goes live; after a crash from the cursor
last written (at least once: what was sent after it comes again, QoS 2 included). A
SUBSCRIBE repeated on reconnect without the `stream-offset` property keeps the running
subscription and its cursor (an `@<position>` in the filter does not reset it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..mqtt.packets import Publish, PubRel
from ..mqtt.properties import Properties
from ..mqtt.topics import is_valid_topic_filter, topic_matches
from ..mqtt.types import ProtocolLevel, ReasonCode
from .changes import (
    AWAIT_ACK,
    Change,
    LogAppended,
    Message,
    StreamCursorSaved,
    SubscriptionRecord,
)
from .queues import QueueBounds
from .replay import (
    EncodedPublish,
    StoredRow,
    encode_v5,
    encode_v311,
    properties_body,
    rows_of,
    stored_properties,
    subscription_identifier,
    topic_head,
)
from .router import Router
from .session import Delivery, Session

if TYPE_CHECKING:
    from .broker import BrokerStats

STREAM_PREFIX = "$stream/"
STREAM_OFFSET = "stream-offset"  # the user property: a SUBSCRIBE's position, a message's offset
PAGE_SIZE = 512  # rows per history page read from the store
# Ask for the next page while at most this many are buffered: the read of the next page
# overlaps the sending of this one, and a subscription buffers two pages at most. The ask
# is made when a page arrives and, through `stream_refill`, as soon as sending brings the
# buffer down to this: the store reads the next page while the buffered one is sent.
REFILL_AT = PAGE_SIZE

Position = str | int | float  # "earliest" | "latest" | an offset | a time (seconds, UTC)


def parse_position(text: str) -> Position | None:
    """`earliest`, `latest`, an integer offset, or an ISO-8601 UTC time; None if invalid."""
    value = text.strip()
    if value in ("earliest", "latest"):
        return value
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """A parsed `$stream/` topic filter."""

    name: str
    position: Position | None  # from `@<position>`, None when absent
    topic_filter: str | None  # None: every topic of the stream


def parse_stream_filter(text: str) -> StreamFilter | None:
    """`$stream/<name>[@<position>][/<topic filter>]`; None when malformed."""
    head, slash, rest = text[len(STREAM_PREFIX):].partition("/")
    name, at, position_text = head.partition("@")
    position = None
    if at:
        position = parse_position(position_text)
        if position is None:
            return None
    if not name or (slash and not is_valid_topic_filter(rest)):
        return None
    return StreamFilter(name, position, rest if slash else None)


@dataclass(eq=False, slots=True)
class StreamSub:
    """One `$stream/` subscription of one session."""

    record: SubscriptionRecord  # as the client sent it (topic_filter is the $stream/ filter)
    stream: str
    topic_filter: str | None
    position: Position
    live_from: int  # live messages from this offset on reach it through the session queue
    batch: int  # the SUBSCRIBE's batch: no history page is read before it committed
    after: int = -1  # history delivered up to here (-1: start not resolved yet)
    done: bool = False  # the history is complete (the buffer may still hold some)
    fetching: bool = False
    # What is read and not sent yet: deliveries, and QoS 0 messages encoded from their row
    # (core/replay.py).
    buffer: deque[Delivery | EncodedPublish] = field(default_factory=deque)
    sent: int = -1  # the highest offset handed to the connection (-1: none yet)


@dataclass(frozen=True, slots=True)
class StreamFetch:
    """A history page the server must read from the store and hand to `stream_page`."""

    client_id: str
    sub: StreamSub
    stream: str
    topic_filter: str | None
    position: Position | None  # the first page: resolve the start from it
    after: int  # later pages: rows with offset > after ...
    until: int  # ... and <= until
    limit: int


class StreamRouting(QueueBounds):
    """Mixin of BrokerCore (which provides the state declared here). It extends QueueBounds,
    the other mixin, only so that BrokerCore has a single base: mypyc compiles no multiple
    inheritance."""

    sessions: dict[str, Session]
    stats: BrokerStats
    _changes: list[Change]
    _batch: int
    _committed: int
    _next_message_id: int
    _next_delivery_id: int

    # Provided by BrokerCore. Plain methods, not stubs under TYPE_CHECKING: mypyc compiles
    # this class and accepts no conditional definitions in a class body.
    def _deliver(self, session: Session, message: Message, qos: int, retain: bool,
                 subscription_ids: tuple[int, ...]) -> bool:
        raise NotImplementedError

    def _new_message(self, topic: str, payload: bytes, qos: int, retain: bool,
                     properties: Properties, origin: str, now: float) -> Message:
        raise NotImplementedError

    def _route(self, message: Message) -> int:
        raise NotImplementedError

    def _publish_packet(self, session: Session, delivery: Delivery, now: float) -> Publish:
        raise NotImplementedError

    def _init_streams(self) -> None:
        self.streams: dict[str, str] = {}  # name -> filter
        self._stream_router = Router()
        self._next_offset = 1
        self._stream_subs: dict[str, dict[tuple[str, str], StreamSub]] = {}
        self._replaying: set[str] = set()  # sessions with a history to replay
        self._stream_marking: StreamSub | None = None  # set while _deliver_stream runs
        self.stream_full: Callable[[], bool] = _never
        # Called (by `pull`) when a replaying subscription's buffer came down to REFILL_AT
        # and no page is being read: the server calls `take_stream_fetches` soon after.
        self.stream_refill: Callable[[], None] = _nothing
        # Bridges' uplink filters (core/downlink.py set_uplinks): recorded like a stream's.
        self.uplinks: dict[str, tuple[str, ...]] = {}  # reader name -> topic filters
        # The QoS 0 lane (docs/bridges.md "The QoS 0 lane"): the readers of bridges whose
        # uplink process is running now. A QoS 0 message that only such readers take is
        # not appended to the log but put on `lane_out[reader]` (in order); the server
        # drains it once per loop turn (`lane_wake` is called when it stops being empty).
        self.lane_open: frozenset[str] = frozenset()
        self.lane_out: dict[str, list[Message]] = {}
        self.lane_wake: Callable[[], None] = _nothing

    def set_streams(self, streams: Iterable[tuple[str, str]]) -> None:
        """The configured streams, (name, topic filter); before `restore`."""
        self.streams = dict(streams)
        self._stream_router = Router()
        for name, topic_filter in self.streams.items():
            self._stream_router.subscribe(SubscriptionRecord(name, topic_filter, 0),
                                          topic_filter)
        for name, filters in self.uplinks.items():
            for topic_filter in filters:
                self._stream_router.subscribe(SubscriptionRecord(name, topic_filter, 0),
                                              topic_filter)

    def streams_of(self, topic: str) -> list[str]:
        """The streams and bridge uplinks (reader names) that record a topic."""
        if not self.streams and not self.uplinks:
            return []
        records, _ = self._stream_router.match(topic)
        return [r.client_id for r in records]

    # -- appending ------------------------------------------------------------------------

    def _stream_append(self, message: Message) -> bool:
        """Record the message in the log if a stream takes it. True if one does (even when
        a QoS 0 message was dropped because the store is full)."""
        if not self.streams and not self.uplinks:
            return False
        records, _ = self._stream_router.match(message.topic)
        if not records:
            return False
        if message.offset is None:  # else a session's backlog appended it (core/backlog.py)
            if self.lane_open and not message.qos and self._to_lane(records, message):
                return True
            if message.qos == 0 and self.stream_full():
                self.stats.stream_dropped += 1
                return True
            message.offset = self._next_offset
            self._next_offset += 1
            self._changes.append(LogAppended(message))
        for record in records:
            subs = self._stream_subs.get(record.client_id)
            if subs:
                self._stream_live(message, subs)
        return True

    def log_end(self) -> int:
        """The last log offset assigned (its batch may not be committed yet)."""
        return self._next_offset - 1

    def _to_lane(self, records: list[SubscriptionRecord], message: Message) -> bool:
        """Put a QoS 0 message on the lane when every reader that takes it has an open one
        (no named stream, no in-process bridge): True if it went there."""
        lane = self.lane_open
        out = self.lane_out
        if len(records) == 1:  # the usual case: one bridge, one of its filters
            name = records[0].client_id
            if name not in lane:
                return False
            if not out:
                self.lane_wake()
                out[name] = [message]
                return True
            taken = out.get(name)
            if taken is None:
                out[name] = [message]
            else:
                taken.append(message)
            return True
        for record in records:
            if record.client_id not in lane:
                return False
        if not out:
            self.lane_wake()
        # A bridge with several filters matching the topic matches once per filter: it
        # takes the message once (as the log appends it once).
        for record in records:
            name = record.client_id
            taken = out.get(name)
            if taken is None:
                out[name] = [message]
            elif taken[-1] is not message:
                taken.append(message)
        return True

    def _stream_live(self, message: Message, subs: dict[tuple[str, str], StreamSub]) -> None:
        offset = message.offset
        assert offset is not None
        for (client_id, _), sub in subs.items():
            if offset < sub.live_from:
                continue
            if sub.topic_filter is not None and not topic_matches(sub.topic_filter,
                                                                   message.topic):
                continue
            record = sub.record
            if record.no_local and client_id == message.origin:
                continue  # [MQTT-3.8.3-3] (5.0)
            session = self.sessions.get(client_id)
            if session is None:
                continue
            self._deliver_stream(session, message, sub)

    def _deliver_stream(self, session: Session, message: Message, sub: StreamSub) -> None:
        record = sub.record
        ids = (record.subscription_id,) if record.subscription_id else ()
        # _deliver marks the delivery as this subscription's before it could persist it:
        # the mark keeps it out of the deliveries table (BrokerCore._save_delivery).
        self._stream_marking = sub
        try:
            self._deliver(session, message, min(record.qos, message.qos),
                          message.retain and record.retain_as_published, ids)
        finally:
            self._stream_marking = None

    def republish(self, topic: str, payload: bytes, qos: int, properties: Properties, *,
                  now: float) -> None:
        """A stored message published again (`edge-broker replay --republish`): routed to
        subscribers and recorded by the streams whose filter matches its new topic."""
        message = self._new_message(topic, payload, qos, False, properties, "", now)
        self._route(message)
        self._stream_append(message)

    # -- subscriptions --------------------------------------------------------------------

    def _stream_subscribe(self, session: Session, record: SubscriptionRecord,
                          parsed: StreamFilter, position: Position | None) -> int:
        """Add (or keep) a `$stream/` subscription. `position` is the SUBSCRIBE's
        `stream-offset` property (None: absent). Returns the SUBACK reason code."""
        if parsed.name not in self.streams:
            return ReasonCode.TOPIC_FILTER_INVALID  # 0x8F: no such stream
        key = (session.client_id, record.topic_filter)
        subs = self._stream_subs.setdefault(parsed.name, {})
        old = subs.get(key)
        if old is not None and position is None:
            # A SUBSCRIBE repeated (as client libraries do on reconnect) without the
            # property keeps the running subscription's cursor, `@<position>` or not.
            old.record = record
            return record.qos
        if position is None:
            position = parsed.position
        if old is not None:
            self._stream_forget(session, old)
        sub = StreamSub(record, parsed.name, parsed.topic_filter,
                        position if position is not None else "latest",
                        self._next_offset, self._batch)
        if isinstance(sub.position, int) and sub.position > sub.live_from:
            sub.live_from = sub.position  # past the last: wait for it
        if sub.position == "latest":
            sub.done = True
        else:
            if not isinstance(session.stream_history, list):
                session.stream_history = []
            session.stream_history.append(sub)
            self._replaying.add(session.client_id)
        subs[key] = sub
        return record.qos

    def _stream_unsubscribe(self, session: Session, topic_filter: str) -> None:
        parsed = parse_stream_filter(topic_filter)
        if parsed is None:
            return
        sub = self._stream_subs.get(parsed.name, {}).get((session.client_id, topic_filter))
        if sub is not None:
            self._stream_forget(session, sub)

    def _stream_forget(self, session: Session, sub: StreamSub) -> None:
        subs = self._stream_subs.get(sub.stream)
        if subs is not None:
            subs.pop((session.client_id, sub.record.topic_filter), None)
        history = session.stream_history
        if isinstance(history, list) and sub in history:
            history.remove(sub)
        sub.buffer.clear()
        sub.done = True

    # -- history: pages from the store ----------------------------------------------------

    def take_stream_fetches(self) -> list[StreamFetch]:
        """The history pages to read now (each sub at most one at a time)."""
        out: list[StreamFetch] = []
        if not self._replaying:
            return out
        committed = self._committed
        for client_id in list(self._replaying):
            session = self.sessions.get(client_id)
            if session is None or not session.stream_history:
                self._replaying.discard(client_id)
                continue
            history = session.stream_history
            if not session.online:
                continue
            for sub in history:
                assert isinstance(sub, StreamSub)
                if (sub.done or sub.fetching or sub.batch > committed
                        or len(sub.buffer) > REFILL_AT):
                    continue
                sub.fetching = True
                out.append(StreamFetch(
                    session.client_id, sub, sub.stream, sub.topic_filter,
                    sub.position if sub.after < 0 else None, max(sub.after, 0),
                    sub.live_from - 1, PAGE_SIZE))
        return out

    def stream_page(self, fetch: StreamFetch, messages: list[Message], end: int,
                    *, now: float) -> None:
        """`stream_rows` for messages (tests and tools): the rows they would be stored as."""
        rows, topics = rows_of(messages)
        self.stream_rows(fetch, rows, topics, end, now=now)

    def stream_rows(self, fetch: StreamFetch, rows: Sequence[StoredRow],
                    topics: Mapping[int, str], end: int, *, now: float) -> None:
        """The store's answer to `fetch`: `rows` as the log holds them (in offset order; see
        core/replay.py), `topics` the names of their topic ids, and `end`, the offset up to
        which every row of the page's range was looked at. A row sent at QoS 0 without an
        expiry is encoded here, once (`EncodedPublish`); any other becomes a delivery."""
        sub = fetch.sub
        sub.fetching = False
        session = self.sessions.get(fetch.client_id)
        if sub.done or session is None or not isinstance(session.stream_history, list) or (
                sub not in session.stream_history):
            return  # unsubscribed or replaced meanwhile
        record = sub.record
        granted = record.qos
        no_local = record.no_local
        as_published = record.retain_as_published
        client_id = fetch.client_id
        sid = record.subscription_id
        ids = (sid,) if sid else ()
        v5 = session.protocol_level == ProtocolLevel.MQTT_5
        extra = subscription_identifier(sid) if sid and v5 else b""
        heads: dict[int, bytes] = {}
        buffer = sub.buffer
        for row in rows:
            offset: int = row[0]
            qos: int = row[3]
            payload: bytes = row[5]
            props: bytes | None = row[6]
            expires_at: float | None = row[8]
            if expires_at is not None and expires_at <= now:
                continue
            if no_local and row[7] == client_id:
                continue  # [MQTT-3.8.3-3] (5.0)
            tid: int = row[2]
            retain = bool(row[4]) and as_published
            if expires_at is None and (granted == 0 or qos == 0):
                head = heads.get(tid)
                if head is None:
                    head = heads[tid] = topic_head(topics[tid])
                data = (encode_v5(head, offset, retain, payload, properties_body(props), extra)
                        if v5 else encode_v311(head, retain, payload))
                buffer.append(EncodedPublish(data, offset, topics[tid], payload, retain, props,
                                             ids, v5))
                continue
            message = Message(self._next_message_id, topics[tid], payload, qos, bool(row[4]),
                              stored_properties(props), row[1], expires_at, row[7], offset)
            self._next_message_id += 1
            delivery = Delivery(0, message, min(granted, qos), retain, ids, 0)
            delivery.stream = sub
            buffer.append(delivery)
        sub.after = max(end, sub.after, 0)
        if sub.after >= sub.live_from - 1:
            sub.done = True

    def _stream_save_cursor(self, session: Session, topic_filter: str) -> None:
        """Store where a stored session's stream subscription resumes after a restart: the
        oldest offset it has in flight, else the one after the last it was sent, else its
        starting position. Written at SUBSCRIBE and at disconnect (so at a graceful stop):
        after a crash it resumes from the last of those (at least once)."""
        parsed = parse_stream_filter(topic_filter)
        if parsed is None:
            return
        sub = self._stream_subs.get(parsed.name, {}).get((session.client_id, topic_filter))
        if sub is None:
            return
        inflight = [d.message.offset for d in session.inflight.values()
                    if d.stream is sub and d.message.offset is not None]
        if inflight:
            position = str(min(inflight))
        elif sub.sent >= 0:
            position = str(sub.sent + 1)
        elif sub.done and not sub.buffer:
            position = str(sub.live_from)
        else:
            position = position_text(sub.position)
        self._changes.append(StreamCursorSaved(session.client_id, topic_filter, position))

    def _stream_history_send(self, session: Session, out: list[Publish | PubRel | EncodedPublish],
                             now: float, limit: int) -> bool | None:
        """For `pull`: send the next history messages (up to `limit` in `out`). True: some
        were added to `out`; False: none may go now (waiting for a page, or the inflight
        window is full); None: every history is complete, the queue may follow."""
        history = session.stream_history
        while True:
            if not history:
                session.stream_history = ()
                return None
            assert isinstance(history, list)
            sub = history[0]
            assert isinstance(sub, StreamSub)
            if sub.buffer:
                break
            if not sub.done:
                return False
            history.pop(0)
        buffer = sub.buffer
        item = buffer[0]
        if isinstance(item, EncodedPublish):
            # Encoded QoS 0 messages: as many as the caller may take, in one go.
            taken = 0
            room = limit - len(out)
            v5 = session.protocol_level == ProtocolLevel.MQTT_5
            while taken < room:
                out.append(item if item.v5 == v5 else item.for_level(v5))
                buffer.popleft()
                taken += 1
                sub.sent = item.offset
                if not buffer:
                    break
                head = buffer[0]
                if not isinstance(head, EncodedPublish):
                    break
                item = head
            self.stats.publish_sent += taken
        else:
            delivery = item
            if delivery.qos and len(session.inflight) >= session.inflight_max:
                return False
            buffer.popleft()
            delivery.id = self._next_delivery_id
            self._next_delivery_id += 1
            delivery.batch = self._committed
            sub.sent = delivery.message.offset or 0
            if delivery.qos:
                # Never written as a delivery row (the cursor covers it), QoS 2 included.
                packet_id = session.allocate_packet_id()
                delivery.packet_id = packet_id
                delivery.state = AWAIT_ACK
                session.inflight[packet_id] = delivery
            out.append(self._publish_packet(session, delivery, now))
            if delivery.qos:
                delivery.dup = True  # any later send of it is a resend
        if len(buffer) <= REFILL_AT and not sub.fetching and not sub.done:
            self.stream_refill()  # the next page is read while these are sent
        return True


def position_text(position: Position) -> str:
    if isinstance(position, float):
        return datetime.fromtimestamp(position, UTC).isoformat().replace("+00:00", "Z")
    return str(position)


def stream_offset_property(properties: Properties) -> str | None:
    """The `stream-offset` user property of a SUBSCRIBE (the last one given), or None."""
    value = None
    for key, text in properties.user_properties:
        if key == STREAM_OFFSET:
            value = text
    return value


def _never() -> bool:
    return False


def _nothing() -> None:
    return None
