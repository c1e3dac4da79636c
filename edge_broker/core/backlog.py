"""A persistent session's backlog as a reader of the log. A mixin of `BrokerCore`.

Theory of operation.

*Live and backlog mode.* A stored (persistent) session is in one of two modes. Live (the
session is connected and caught up, `Session.backlog is None`): its messages are queued in
memory as deliveries, written as delivery rows as before (core/session.py). Backlog (the
session is offline, or reconnected and still reading what it missed): its messages are not
queued at all. Each is appended ONCE to the store's log (`LogAppended`, the offset assigned
by the core as for streams), however many sessions and streams take it, and the session keeps
a `Backlog`: a cursor over the log (the store's reader `reader_name(client_id)`, with the
session's non-shared subscriptions as filters), not a row per message.

*Going offline.* At disconnect a stored session opens its reader at the log's last offset
(`ReaderOpened`): every later row its filters match is its backlog. Its in-memory queue (what
was queued while it was live) stays as it was, with its delivery rows; it is sent first.

*Reading it back.* The core never awaits: once the session is connected again,
`take_backlog_fetches()` lists the pages the server must read from the store (only rows of
committed batches), and `backlog_page()` hands them back. Each row becomes a delivery as the
publish would have made it: one copy, at min(highest matching subscription QoS, message QoS),
with every matching subscription identifier, retain as published, No Local from the row's
origin; a filter only selects rows above its `since` (the offset at which it was made); QoS 0
rows published while the session was offline are skipped unless `queue_qos0_messages`; expired
rows are skipped (counted) and the Message Expiry Interval is decremented when sent. `pull()`
sends them after the in-memory queue, under the inflight window, in offset order.

*Durability.* What a row became is recorded before its PUBLISH leaves (the server writes a
pull's packets after the batch holding these records committed): `ReaderMoved` (every
selected row at or below this offset is done) and, for QoS 1 and 2, `InflightSaved` (packet
id, offset, QoS 2 phase), cleared at PUBACK/PUBCOMP. After a crash the in-flight entries are
sent again under their packet ids (DUP) and the reader resumes after its offset, skipping the
offsets in flight: no QoS 1/2 message lost, no QoS 2 message sent twice as a new message.
A move that passes only QoS 1 rows (sent, or acknowledged) and rows not for the session is
recorded lazily: at the latest with the CURSOR_SAVE_EVERY-th such move, and at once with any
other move (a QoS 0 or QoS 2 row, a skipped one) and at disconnect. A subscriber draining at
QoS 1 then sends PUBACKs that need no commit, so what it may receive next is sent at once,
not after an fsync; a crash may send up to CURSOR_SAVE_EVERY acknowledged QoS 1 messages
again (at least once), never a QoS 0 or QoS 2 one. The session's counts (`ReaderCounted`)
are written with its cursor.

*The seam.* New messages for a session in backlog mode go to the log even while it is
connected. When its cursor has caught up with the last offset appended for it (`Backlog.last`)
and nothing read is left to send, the session goes live in one synchronous step: its in-flight
log deliveries become delivery rows (`ReaderClosed` in the same batch) and the next message is
queued in memory. No gap and no duplicate: every message before the switch is in the log below
`last`, every one after it in the queue.
That step copies their bodies into `messages`: while they exceed `SEAM_COPY_MAX_BYTES` it
waits in backlog mode for acknowledgements, so it writes a bounded amount whatever the window
and message size. A full disk drains with the room of the ballast file (store/sqlite/
space.py): a whole window of large bodies did not fit there with the checkpoint after it, and
the store committed nothing more (no ack, no DISCONNECT) until space came back
(tests/system/test_full_storage.py).

*Bounds.* `max_queued_messages` / `max_queued_bytes` count the in-memory queue plus the backlog
(`Session.backlog_count` / `backlog_bytes`, payload bytes, exact while running; at start-up the
store's reader counters, which count topic + payload + property bytes of every selected row).
drop-newest (and refuse for what cannot be refused) skips the new message for this session
(`excluded`); drop-oldest skips the oldest not yet handed out (`skip`; by bytes with the
backlog's mean message size); both are counted and logged as queue drops. The invariant:
`backlog_count` + `skip` is the number of rows the session will still hand out or drop, which
is what a restart restores; QoS 0 deliveries counted while it is connected count against the
bounds as its in-memory queue's do, but are not kept when it goes offline, so going offline
takes them out of the count (or of `skip`), and the store is never given them
(`Backlog.qos0`). A takeover keeps them (the session stayed connected). The memory bound
(`max_queued_memory_bytes`) does not apply to a backlog: it is on disk.

*Shared pages.* Sessions that reconnect together (after an outage, say) read the same range
with the same filters: one page read serves them all. A page is keyed by where it starts
(`Backlog.after`) and the session's filters (each since below `after` counts as `after`:
it selects the same rows); a session whose reader has other ranges (`Backlog.closing`) does
not share. The first session that needs it reads it from the store; the others that need it
meanwhile wait for that read (`SharedPage.waiting`) instead of reading it again, and those
that need it later take it from memory, without a store read, as they send (`_backlog_take`).
The rows of a page are the same for all (the log's rows never change, and a row a session's
reader selects above its cursor is not deleted: retention keeps it, and a budget give-way
moves that session's `after` past it), the Message made of a row too (one per row, as a
publish shares one among its deliveries); what each session makes of them (its
subscriptions' QoS, No Local, in flight, excluded, QoS 0 published offline) is its own. At
most SHARED_PAGES_MAX pages and SHARED_PAGES_MAX_BYTES of payload are kept, oldest first out.

*Shared subscriptions* stay on the per-delivery path: a message for a member of a shared
group is queued in memory with a delivery row, even in backlog mode (it may then reach the
session before older backlog rows of its other subscriptions).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..mqtt.topics import topic_matches
from .changes import (
    SESSION_READER_PREFIX,
    InflightCleared,
    InflightSaved,
    LogAppended,
    Message,
    ReaderClosed,
    ReaderCounted,
    ReaderFilterDeleted,
    ReaderFilterSaved,
    ReaderMoved,
    ReaderOpened,
    ReaderRangesSaved,
    Snapshot,
    SubscriptionRecord,
    reader_name,
)
from .queues import DROP_OLDEST, QUEUE_FULL, STORE_FULL
from .replay import StoredRow, rows_of, stored_properties
from .session import Delivery, Session
from .streams import PAGE_SIZE, REFILL_AT, STREAM_PREFIX, StreamRouting

DONE = 3  # the state of a stored marker: a QoS 2 row finished above the durable cursor
EXCLUDED_PRUNE_AT = 1024  # prune `Backlog.excluded` of handed-out offsets past this size
# Going live copies the in-flight log deliveries' bodies (topic + payload bytes) only up to
# this; above it the session waits in backlog mode for acknowledgements (the seam, above).
SEAM_COPY_MAX_BYTES = 64 * 1024
TAKES_CACHE_SIZE = 1024  # topics remembered per backlog by `_backlog_takes`
# A connected session's cursor moves over QoS 1 rows (sent, then acknowledged) are recorded
# once per this many (and whenever anything else moves it): see *Durability*.
CURSOR_SAVE_EVERY = 256
# Pages read for one session kept for the others reading the same range (*Shared pages*):
# at most this many, and this many bytes of payload.
SHARED_PAGES_MAX = 16
SHARED_PAGES_MAX_BYTES = 4 * 1024 * 1024


def is_log_filter(topic_filter: str) -> bool:
    """Whether a subscription is one of a session's reader filters (not shared, no stream)."""
    return not (topic_filter.startswith("$share/") or topic_filter.startswith(STREAM_PREFIX))


class Backlog:
    """A session's cursor over the log (see the module docstring)."""

    __slots__ = ("after", "buffer", "closing", "durable", "excluded", "fetching", "generation",
                 "last", "markers", "online_from", "outstanding", "qos0", "qos0_bytes",
                 "qos0_skipped", "reader", "sent", "since", "skip", "taken", "takes", "unsaved")

    def __init__(self, reader: str, offset: int, since: dict[str, int]) -> None:
        self.reader = reader
        self.sent = offset  # every selected row at or below was handed out
        self.durable = offset  # the last ReaderMoved: rows at or below are done or in flight
        # QoS 1 rows sent and not acknowledged, not stored (offset order): the durable cursor
        # stays below the oldest, so after a crash they are sent again (at least once).
        self.outstanding: dict[int, None] = {}
        # QoS 2 rows finished above the durable cursor: stored as entries with packet id
        # -offset (state DONE), so that a restart does not send them again.
        self.markers: set[int] = set()
        self.after = offset  # read up to here (the buffer holds what is not sent yet)
        self.last = offset  # the last offset appended for this session
        self.since = since  # reader filter -> since
        # Subscriptions unsubscribed or replaced (SUBSCRIBE again with other options) while
        # rows they took for the session were not read yet: filter -> [(since, until: `last`
        # then, the old subscription)]. Each selects the rows in (since, until] as that
        # subscription, and stays in the store until the durable cursor passed `until`
        # (`_backlog_unsubscribe`, `_backlog_subscribe`, `_backlog_forget_closed`), recorded
        # with ReaderRangesSaved in the batch that changes it (`_backlog_save_ranges`), so a
        # restart restores it (`_backlog_restore`).
        self.closing: dict[str, list[tuple[int, int, SubscriptionRecord]]] = {}
        self.buffer: deque[Delivery] = deque()
        self.fetching = False
        self.generation = 0  # bumped when the buffer is dropped (a page in flight is stale)
        self.online_from = offset  # QoS 0 rows at or below were published while offline
        self.skip = 0  # oldest rows to drop (drop-oldest), already counted
        # The count invariant (*Bounds* in the module docstring). The rows the session has
        # queued in the log form one sequence in offset order: every row it will still hand
        # out or drop from its buffer's head. `Session.backlog_count` + `skip` is its length:
        # the first `skip` are dropped (drop-oldest), the others counted (bounds). `taken`
        # counts those that left the head (sent, expired or skipped); so the one at position
        # p (0: the head) has index `taken` + p, for as long as this Backlog lives.
        self.taken = 0
        # The QoS 0 deliveries in that sequence counted while the session was connected
        # (`queue_qos0_messages = false`): (index, offset, payload bytes), in order. They are
        # not kept when it goes offline (read back, they are QoS 0 rows published while it
        # was offline): `_backlog_open` takes them out of the sequence. The first
        # `qos0_skipped` are in the skip prefix (already uncounted); `qos0_bytes` is the
        # payload of the others. What the store records (`_backlog_flush`), and so what a
        # restart restores, is the sequence without them: count - (len(qos0) - qos0_skipped),
        # bytes - qos0_bytes, skip - qos0_skipped.
        self.qos0: deque[tuple[int, int, int]] = deque()
        self.qos0_skipped = 0
        self.qos0_bytes = 0
        self.excluded: set[int] = set()  # offsets not for it (drop-newest), already counted
        # topic -> whether a reader filter matches it (`_backlog_takes`); cleared whenever
        # `since` changes (`_backlog_subscribe`, `_backlog_unsubscribe`).
        self.takes: dict[str, bool] = {}
        self.unsaved = 0  # lazy cursor moves not recorded yet (_backlog_sync)


class SharedPage:
    """A backlog page that several sessions read (*Shared pages* in the module docstring)."""

    __slots__ = ("after", "end", "filters", "messages", "rows", "size", "topics", "waiting")

    def __init__(self, after: int, filters: frozenset[tuple[str, int]]) -> None:
        self.after = after
        self.filters = filters
        self.rows: Sequence[StoredRow] | None = None  # None: being read
        self.topics: Mapping[int, str] = {}
        self.end = after  # the offset up to which the range was looked at
        self.size = 0
        self.messages: dict[int, Message] = {}  # offset -> the Message made of its row
        # Sessions waiting for the read: (client id, backlog, its generation, its until).
        self.waiting: list[tuple[str, Backlog, int, int]] = []


@dataclass(frozen=True, slots=True)
class BacklogFetch:
    """A backlog page the server must read from the store and hand to `backlog_page`: rows
    with after < offset <= until that the filters (topic filter -> since) select."""

    client_id: str
    backlog: Backlog
    generation: int
    reader: str
    filters: dict[str, int]
    after: int
    until: int
    limit: int
    page: SharedPage | None = None  # the shared page it reads for


class BacklogRouting(StreamRouting):
    """Mixin of BrokerCore (which provides the state declared in the bases)."""

    def _save_message(self, message: Message) -> None:
        raise NotImplementedError

    def _save_delivery(self, session: Session, delivery: Delivery) -> None:
        raise NotImplementedError

    def _init_backlog(self) -> None:
        self._backlog_online: set[str] = set()  # connected sessions in backlog mode
        # Set by the server when the store keeps a log it can read pages from (SQLite);
        # otherwise every session stays on the per-delivery path.
        self.log_backlogs = False
        # (batch, last offset it appended), for batches not committed yet; and the offset up
        # to which every appended message is durable (pages are read only up to there).
        self._appended: deque[tuple[int, int]] = deque()
        self._log_committed = 0
        self._backlog_touched: set[str] = set()  # sessions whose counts changed this batch
        # *Shared pages*: by the offset they start after; the ready ones oldest first.
        self._shared_pages: dict[int, list[SharedPage]] = {}
        self._shared_order: deque[SharedPage] = deque()
        self._shared_bytes = 0

    def _backlog_flush(self) -> None:
        """Record the counts that changed (one record per session per batch)."""
        touched = self._backlog_touched
        if not touched:
            return
        for client_id in touched:
            session = self.sessions.get(client_id)
            backlog = None if session is None else session.backlog
            if session is not None and backlog is not None:
                # What it keeps offline (`Backlog.qos0`): a restart restores exactly that.
                skipped = backlog.qos0_skipped
                count = session.backlog_count - (len(backlog.qos0) - skipped)
                self._changes.append(ReaderCounted(
                    backlog.reader, max(0, count),
                    max(0, session.backlog_bytes - backlog.qos0_bytes),
                    max(0, backlog.skip - skipped)))
        touched.clear()

    def _backlog_drained(self, number: int) -> None:
        last = self._next_offset - 1
        appended = self._appended
        if last > (appended[-1][1] if appended else self._log_committed):
            appended.append((number, last))

    def _backlog_committed(self, number: int) -> None:
        appended = self._appended
        while appended and appended[0][0] <= number:
            self._log_committed = appended.popleft()[1]

    # -- modes ----------------------------------------------------------------------------

    def _backlog_open(self, session: Session) -> None:
        """A stored session goes offline: its messages go to the log from now on."""
        backlog = session.backlog
        self._backlog_online.discard(session.client_id)
        if not self.log_backlogs:
            return
        if backlog is not None:
            # Offline again before it caught up: what was read and not sent is read again.
            # Its QoS 1 rows in flight were stored by `disconnect` (with their packet ids).
            for delivery in session.inflight.values():
                offset = delivery.message.offset
                if delivery.from_log and offset in backlog.outstanding:
                    del backlog.outstanding[offset]
                    self._changes.append(_inflight_record(backlog, delivery, offset))
            self._backlog_forget_qos0(session, backlog)
            self._backlog_sync(backlog)
            backlog.generation += 1
            backlog.buffer.clear()
            backlog.fetching = False
            backlog.after = backlog.sent
            return
        offset = self._next_offset - 1
        since = {f: offset for f in session.subscriptions if is_log_filter(f)}
        backlog = session.backlog = Backlog(reader_name(session.client_id), offset, since)
        self._changes.append(ReaderOpened(backlog.reader, offset, tuple(since.items())))

    def _backlog_forget_qos0(self, session: Session, backlog: Backlog) -> None:
        """Going offline: the QoS 0 deliveries counted while it was connected are not kept
        (`Backlog.qos0`): out of the count, or out of the skip prefix that had dropped them."""
        qos0 = backlog.qos0
        if not qos0:
            return
        skipped = backlog.qos0_skipped
        session.backlog_count = max(0, session.backlog_count - (len(qos0) - skipped))
        session.backlog_bytes = max(0, session.backlog_bytes - backlog.qos0_bytes)
        backlog.skip = max(0, backlog.skip - skipped)
        qos0.clear()
        backlog.qos0_skipped = backlog.qos0_bytes = 0
        self._backlog_touched.add(session.client_id)

    def _backlog_connect(self, session: Session) -> None:
        backlog = session.backlog
        if backlog is not None:
            if session.client_id not in self._backlog_online:
                # A takeover (connected throughout) keeps what was queued for it, QoS 0 too.
                backlog.online_from = self._next_offset - 1
            self._backlog_online.add(session.client_id)

    def _backlog_close(self, session: Session) -> None:
        """Caught up: the session goes live. Its in-flight log deliveries (at most
        `SEAM_COPY_MAX_BYTES` of them, `_backlog_take`) become delivery rows in the batch
        that forgets the reader."""
        backlog = session.backlog
        assert backlog is not None
        session.backlog = None
        session.backlog_count = session.backlog_bytes = 0
        self._backlog_online.discard(session.client_id)
        backlog.outstanding.clear()
        backlog.closing.clear()  # ReaderClosed forgets every filter
        for delivery in session.inflight.values():
            if delivery.from_log:
                delivery.from_log = False
                if session.stored:
                    self._save_message(delivery.message)
                    self._save_delivery(session, delivery)
        self._changes.append(ReaderClosed(backlog.reader))

    def _backlog_keep(self, session: Session) -> None:
        """The session goes on but is no longer stored (a v5 CONNECT with Clean Start 0 and
        Session Expiry Interval 0 resumes it [MQTT-3.1.2-4] (5.0), to end with the
        connection, 3.1.2.11.2 (5.0)): the store's SessionDeleted forgot its reader, so it is
        opened again, at the durable cursor with the same filters, in the same batch. Its
        backlog is delivered during this connection; until it is caught up or the session
        ends (`_backlog_end`), retention and the store budget keep the rows it selects."""
        backlog = session.backlog
        if backlog is not None:
            self._changes.append(ReaderOpened(backlog.reader, backlog.durable,
                                              tuple(self._reader_filters(backlog).items())))
            if backlog.closing:
                self._backlog_save_ranges(backlog)
            # `markers` stay (pages skip them); their stored entries went with the old
            # reader, and nothing needs them after a crash, which ends this session.
            self._backlog_touched.add(session.client_id)

    def _backlog_end(self, session: Session) -> None:
        """The session ends (the store's SessionDeleted forgets the reader of a stored
        session; the reader `_backlog_keep` opened for one that is not is closed here)."""
        backlog = session.backlog
        if backlog is not None and not session.stored:
            self._changes.append(ReaderClosed(backlog.reader))
        session.backlog = None
        session.backlog_count = session.backlog_bytes = 0
        self._backlog_online.discard(session.client_id)

    def _backlog_restore(self, snapshot: Snapshot) -> None:
        """At start-up every stored session is offline, in backlog mode: from its stored
        reader (cursor, filters, counters, in-flight entries), or a new one."""
        self._log_committed = snapshot.log_last_offset
        if not self.log_backlogs:
            return
        for name in snapshot.readers:
            # A reader whose session is not stored: `_backlog_keep`'s, left by a crash
            # during that session's connection (which ended the session).
            session = self.sessions.get(name[len(SESSION_READER_PREFIX):])
            if session is None or not session.stored:
                self._changes.append(ReaderClosed(name))
        for session in self.sessions.values():
            if not session.stored:
                continue
            state = snapshot.readers.get(reader_name(session.client_id))
            if state is None:
                self._backlog_open(session)  # a store of an earlier version
                continue
            filters = dict(state.filters)
            # The ranges unsubscribed or replaced subscriptions left to read
            # (`Backlog.closing`, stored by ReaderRangesSaved); the store holds their filter.
            closing: dict[str, list[tuple[int, int, SubscriptionRecord]]] = {}
            for topic_filter, since, until, record in state.ranges:
                if topic_filter in filters:
                    closing.setdefault(topic_filter, []).append((since, until, record))
            for topic_filter in list(filters):
                if topic_filter in session.subscriptions:
                    if topic_filter in closing:  # subscribed again: its own since
                        filters[topic_filter] = state.subscribed.get(
                            topic_filter, filters[topic_filter])
                    continue
                del filters[topic_filter]
                if topic_filter not in closing:
                    self._changes.append(ReaderFilterDeleted(reader_name(session.client_id),
                                                             topic_filter))
            backlog = session.backlog = Backlog(reader_name(session.client_id), state.offset,
                                                filters)
            if closing:
                backlog.closing = closing
                self._backlog_forget_closed(backlog)  # those the cursor passed
            backlog.last = max(snapshot.log_last_offset, state.offset)
            session.backlog_count = state.backlog_count
            session.backlog_bytes = state.backlog_bytes
            backlog.skip = state.skip
            for topic_filter in session.subscriptions:
                if is_log_filter(topic_filter) and topic_filter not in backlog.since:
                    self._backlog_subscribe(session, topic_filter)
            for entry in state.inflight:
                message = entry.message
                if entry.state == DONE:
                    backlog.markers.add(message.offset or 0)
                    continue
                message.id = self._next_message_id
                self._next_message_id += 1
                delivery = Delivery(self._next_delivery_id, message, entry.qos, entry.retain,
                                    entry.subscription_ids, 0)
                self._next_delivery_id += 1
                delivery.from_log = True
                delivery.packet_id = entry.packet_id
                delivery.state = entry.state
                delivery.dup = entry.dup
                session.inflight[entry.packet_id] = delivery

    # -- publishing -----------------------------------------------------------------------

    def _log_append(self, message: Message) -> int:
        """The message's offset in the log, appending it (once) if it has none yet."""
        offset = message.offset
        if offset is None:
            offset = message.offset = self._next_offset
            self._next_offset = offset + 1
            self._changes.append(LogAppended(message))
        return offset

    def _backlog_deliver(self, session: Session, message: Message, qos: int) -> bool:
        """`_deliver` for a session in backlog mode: the log holds the message, the session
        counts it (`qos`: the delivery's). False: dropped by the queue policy (counted)."""
        backlog = session.backlog
        assert backlog is not None
        offset = message.offset
        if offset is None:  # the first session of this message appends it
            offset = self._log_append(message)
        settings = self.settings
        max_messages = settings.max_queued_messages
        max_bytes = settings.max_queued_bytes
        size = len(message.payload)
        if (max_messages or max_bytes) and not session.has_room(max_messages, max_bytes, size):
            if settings.queue_full_policy == DROP_OLDEST:
                while session.queue and not session.has_room(max_messages, max_bytes, size):
                    self._drop(session, session.popleft(), QUEUE_FULL)
                while session.backlog_count and not session.has_room(max_messages, max_bytes,
                                                                     size):
                    mean = session.backlog_bytes // session.backlog_count
                    session.backlog_count -= 1
                    session.backlog_bytes -= mean
                    qos0 = backlog.qos0
                    skipped = backlog.qos0_skipped
                    if (len(qos0) > skipped
                            and qos0[skipped][0] == backlog.taken + backlog.skip):
                        backlog.qos0_skipped = skipped + 1  # it drops a QoS 0 one
                        backlog.qos0_bytes -= qos0[skipped][2]
                    backlog.skip += 1
                    self._count_drop(session, QUEUE_FULL)
                self._backlog_touched.add(session.client_id)
            if not session.has_room(max_messages, max_bytes, size):
                backlog.excluded.add(offset)
                self._count_drop(session, QUEUE_FULL)
                return False
        if qos == 0 and session.online and not settings.queue_qos0_messages:
            backlog.qos0.append(
                (backlog.taken + session.backlog_count + backlog.skip, offset, size))
            backlog.qos0_bytes += size
        session.backlog_count += 1
        session.backlog_bytes += size
        self._backlog_touched.add(session.client_id)
        backlog.last = offset
        return True

    @staticmethod
    def _backlog_takes(session: Session, message: Message) -> bool:
        """Whether one of the session's reader filters matches: else the delivery is for a
        shared subscription, which stays on the per-delivery path."""
        backlog = session.backlog
        assert backlog is not None
        topic = message.topic
        takes = backlog.takes.get(topic)
        if takes is None:  # once per topic (a publish matches every filter of 10 sessions)
            if len(backlog.takes) >= TAKES_CACHE_SIZE:
                backlog.takes.clear()
            takes = backlog.takes[topic] = any(topic_matches(f, topic) for f in backlog.since)
        return takes

    # -- the store budget (store/log/budget.py) ------------------------------------------

    def backlogs_giving_way(self) -> list[tuple[str, int]]:
        """The readers whose oldest rows may give way to `max_store_bytes`, largest backlog
        first, with their backlog bytes: offline sessions under drop-oldest (drop-newest and
        refuse do not give way: their policy refuses or drops the new work instead)."""
        out: list[tuple[str, int]] = []
        if self.settings.queue_full_policy != DROP_OLDEST:
            return out
        for session in self.sessions.values():
            backlog = session.backlog
            if backlog is not None and not session.online and session.backlog_count > 0:
                out.append((backlog.reader, session.backlog_bytes))
        out.sort(key=_second, reverse=True)
        return out

    def backlog_gave_way(self, reader: str, offset: int, count: int) -> int:
        """The store moved `reader` past its `count` oldest rows, up to `offset`, for the
        store budget: the session forgets them, and they are counted and logged as drops
        (reason store_full), except those drop-oldest had already counted (`skip`).
        Returns the drops counted now."""
        session = self.sessions.get(reader[len(SESSION_READER_PREFIX):])
        backlog = None if session is None else session.backlog
        if session is None or backlog is None or backlog.reader != reader or count <= 0:
            return 0
        backlog.taken += count
        if backlog.qos0:  # reconnected since it was named: those rows are gone
            self._backlog_qos0_left(backlog, offset)
        counted = min(backlog.skip, count)
        backlog.skip -= counted
        new = count - counted
        for _ in range(new):
            if session.backlog_count > 0:
                session.backlog_bytes -= session.backlog_bytes // session.backlog_count
                session.backlog_count -= 1
            self._count_drop(session, STORE_FULL)
        if backlog.after < offset:  # a page read meanwhile is stale (reconnected since)
            backlog.generation += 1
            backlog.buffer.clear()
            backlog.fetching = False
            backlog.after = offset
        backlog.sent = max(backlog.sent, offset)
        backlog.durable = max(backlog.durable, offset)  # the store's cursor is there
        self._backlog_touched.add(session.client_id)
        return new

    # -- subscriptions --------------------------------------------------------------------

    def _backlog_subscribe(self, session: Session, topic_filter: str,
                           replaced: SubscriptionRecord | None = None) -> None:
        """A new filter selects the rows appended from now on. A subscription replaced by
        one with other options (QoS...) [MQTT-3.8.4-3] (3.1.1): the rows it already took stay
        the deliveries their publish made, at the old QoS (`Backlog.closing`)."""
        backlog = session.backlog
        if backlog is None or not is_log_filter(topic_filter):
            return
        if topic_filter in backlog.since:
            since = backlog.since[topic_filter]
            if (replaced is not None and since < backlog.last
                    and backlog.durable < backlog.last):
                backlog.closing.setdefault(topic_filter, []).append(
                    (since, backlog.last, replaced))
                backlog.since[topic_filter] = self._next_offset - 1  # the store keeps since
                self._backlog_save_ranges(backlog)
            return
        since = backlog.since[topic_filter] = self._next_offset - 1
        backlog.takes.clear()
        if topic_filter in backlog.closing:
            # The store keeps the older since (rows in between match neither range) and
            # this one with the ranges.
            self._backlog_save_ranges(backlog)
            return
        self._changes.append(ReaderFilterSaved(backlog.reader, topic_filter, since))

    def _backlog_unsubscribe(self, session: Session, topic_filter: str,
                             record: SubscriptionRecord | None = None) -> None:
        """No new message is taken for the filter [MQTT-3.10.4-2] (3.1.1), but the rows it
        already took (in the queue bounds' counts) stay queued, as an in-memory queue's
        deliveries do: each becomes the delivery its publish made. So the filter keeps
        selecting the rows up to `last` (`Backlog.closing`)."""
        backlog = session.backlog
        if backlog is None:
            return
        since = backlog.since.pop(topic_filter, None)
        if since is None:
            return
        backlog.takes.clear()
        if record is not None and since < backlog.last and backlog.durable < backlog.last:
            backlog.closing.setdefault(topic_filter, []).append((since, backlog.last, record))
        elif topic_filter not in backlog.closing:
            self._changes.append(ReaderFilterDeleted(backlog.reader, topic_filter))
            return
        # The store keeps the filter until the cursor passed the ranges' `until`.
        self._backlog_save_ranges(backlog)

    def _backlog_forget_closed(self, backlog: Backlog) -> None:
        """Unsubscribed filters whose rows the durable cursor passed leave the store (or get
        back the since of their new subscription)."""
        changed = False
        for topic_filter, ranges in list(backlog.closing.items()):
            kept = [r for r in ranges if r[1] > backlog.durable]
            if len(kept) == len(ranges):
                continue
            changed = True
            ranges[:] = kept
            if ranges:
                continue
            del backlog.closing[topic_filter]
            since = backlog.since.get(topic_filter)
            if since is None:
                self._changes.append(ReaderFilterDeleted(backlog.reader, topic_filter))
            else:
                self._changes.append(ReaderFilterSaved(backlog.reader, topic_filter, since))
        if changed:
            self._backlog_save_ranges(backlog)

    def _backlog_save_ranges(self, backlog: Backlog) -> None:
        """Record `Backlog.closing` (and the since of its filters subscribed again) in the
        batch that changed it, so that a restart restores it."""
        ranges = tuple((topic_filter, since, until, record)
                       for topic_filter, closing in backlog.closing.items()
                       for since, until, record in closing)
        subscribed = tuple((f, backlog.since[f]) for f in backlog.closing if f in backlog.since)
        self._changes.append(ReaderRangesSaved(backlog.reader, ranges, subscribed))

    def _reader_filters(self, backlog: Backlog) -> dict[str, int]:
        """The filters the store holds for the reader: the subscriptions' and the closing
        ones', each with its lowest since."""
        filters = dict(backlog.since)
        for topic_filter, ranges in backlog.closing.items():
            for since, _, _ in ranges:
                filters[topic_filter] = min(since, filters.get(topic_filter, since))
        return filters

    # -- reading pages --------------------------------------------------------------------

    def take_backlog_fetches(self) -> list[BacklogFetch]:
        """The backlog pages to read now (at most one per session at a time)."""
        out: list[BacklogFetch] = []
        if not self._backlog_online:
            return out
        committed = self._log_committed  # nothing is read above (not in the file yet)
        for client_id in list(self._backlog_online):
            session = self.sessions.get(client_id)
            backlog = None if session is None or not session.online else session.backlog
            if backlog is None:
                self._backlog_online.discard(client_id)
                continue
            until = min(backlog.last, committed)
            if backlog.fetching or len(backlog.buffer) > REFILL_AT or backlog.after >= until:
                continue
            backlog.fetching = True
            page = None
            if not backlog.closing:
                filters = _page_filters(backlog)
                page = self._shared_page(backlog.after, filters)
                if page is not None:
                    if page.rows is None:  # being read for another session: wait for it
                        page.waiting.append((client_id, backlog, backlog.generation, until))
                        continue
                    if page.end > until:
                        page = None  # read further than this session may go yet
                    # else read already: the server hands it over without a store read
                if page is None:
                    page = SharedPage(backlog.after, filters)
                    self._shared_pages.setdefault(backlog.after, []).append(page)
            out.append(BacklogFetch(client_id, backlog, backlog.generation, backlog.reader,
                                    dict(backlog.since), backlog.after, until, PAGE_SIZE,
                                    page))
        return out

    def _shared_page(self, after: int,
                     filters: frozenset[tuple[str, int]]) -> SharedPage | None:
        pages = self._shared_pages.get(after)
        if pages is not None:
            for page in pages:
                if page.filters == filters:
                    return page
        return None

    def _backlog_shared_fill(self, session: Session, backlog: Backlog, now: float) -> bool:
        """Fill the buffer from a shared page already read, if there is one for where it
        stands (`_backlog_take`, as it runs low). True: it did."""
        if backlog.after not in self._shared_pages or backlog.closing or backlog.fetching:
            return False
        page = self._shared_page(backlog.after, _page_filters(backlog))
        until = min(backlog.last, self._log_committed)
        if page is None or page.rows is None or page.end > until or backlog.after >= until:
            return False
        self._backlog_fill(session, backlog, page.rows, page.topics, page.end, until,
                           page.messages, now)
        return True

    def backlog_fetch_failed(self, fetch: BacklogFetch) -> None:
        """The store could not read `fetch`: it and the sessions waiting for the same page
        read it again later (the cursor did not move)."""
        fetch.backlog.fetching = False
        page = fetch.page
        if page is not None and page.rows is None:
            for _, backlog, generation, _ in page.waiting:
                if backlog.generation == generation:
                    backlog.fetching = False
            page.waiting.clear()
            self._forget_shared(page)

    def _forget_shared(self, page: SharedPage) -> None:
        pages = self._shared_pages.get(page.after)
        if pages is not None and page in pages:
            pages.remove(page)
            if not pages:
                del self._shared_pages[page.after]

    def _keep_shared(self, page: SharedPage) -> None:
        """A shared page was read: keep it, within SHARED_PAGES_MAX(_BYTES), oldest out."""
        order = self._shared_order
        order.append(page)
        self._shared_bytes += page.size
        while order and (len(order) > SHARED_PAGES_MAX
                         or self._shared_bytes > SHARED_PAGES_MAX_BYTES):
            old = order.popleft()
            self._shared_bytes -= old.size
            self._forget_shared(old)

    def backlog_page(self, fetch: BacklogFetch, messages: list[Message], end: int,
                     *, now: float) -> list[str]:
        """`backlog_rows` for messages (tests and tools): the rows they would be stored as."""
        rows, topics = rows_of(messages)
        return self.backlog_rows(fetch, rows, topics, end, now=now)

    def backlog_rows(self, fetch: BacklogFetch, rows: Sequence[StoredRow],
                     topics: Mapping[int, str], end: int, *, now: float) -> list[str]:
        """The store's answer to `fetch` (or the shared page it names, when that was read
        already: `fetch.page.rows`): the selected rows as the log holds them (in offset
        order; core/replay.py), the names of their topic ids, and `end`, the offset up to
        which the range was looked at. Returns the other sessions that waited for the same
        page and got it (*Shared pages*): the server pumps them."""
        woken: list[str] = []
        page = fetch.page
        messages: dict[int, Message] = {} if page is None else page.messages
        if page is not None and page.rows is None:
            page.rows, page.topics, page.end = rows, topics, end
            page.size = sum(len(row[5]) for row in rows) + 64 * len(rows)
            self._keep_shared(page)
            waiting = page.waiting
            page.waiting = []
            for client_id, other, generation, until in waiting:
                if other.generation != generation:
                    continue  # dropped its buffer meanwhile (offline again)
                other.fetching = False
                session = self.sessions.get(client_id)
                if (session is not None and session.backlog is other
                        and other.after == page.after and end <= until):
                    self._backlog_fill(session, other, rows, topics, end, until, messages,
                                       now)
                    woken.append(client_id)
        backlog = fetch.backlog
        if fetch.generation != backlog.generation:
            return woken  # the buffer was dropped meanwhile (offline again)
        backlog.fetching = False
        session = self.sessions.get(fetch.client_id)
        if session is None or session.backlog is not backlog:
            return woken
        self._backlog_fill(session, backlog, rows, topics, end, fetch.until, messages, now)
        return woken

    def _backlog_fill(self, session: Session, backlog: Backlog, rows: Sequence[StoredRow],
                      topics: Mapping[int, str], end: int, until: int,
                      messages: dict[int, Message], now: float) -> None:
        """Append the deliveries the rows (after < offset <= until) become to the buffer;
        the range is read up to min(end, until). `messages`: the Messages made of rows."""
        in_flight = {d.message.offset for d in session.inflight.values() if d.from_log}
        in_flight.update(backlog.markers)
        excluded = backlog.excluded
        after = backlog.after
        # Per topic of the page: its matching subscriptions, (since, record), found once.
        matching: dict[int, list[tuple[int, int | None, SubscriptionRecord]]] = {}
        buffer = backlog.buffer
        for row in rows:
            offset: int = row[0]
            if offset <= after or offset in in_flight or offset in excluded:
                continue
            if offset > until:
                break
            tid: int = row[2]
            found = matching.get(tid)
            if found is None:
                found = matching[tid] = self._backlog_matching(session, backlog, topics[tid])
            delivery = self._backlog_delivery(session, backlog, row, topics[tid], found,
                                              messages)
            if delivery is not None:
                buffer.append(delivery)
        backlog.after = max(after, min(end, until))

    @staticmethod
    def _backlog_matching(session: Session, backlog: Backlog,
                          topic: str) -> list[tuple[int, int | None, SubscriptionRecord]]:
        """The session's reader filters that match `topic`: (since, until, subscription);
        until None: no upper bound."""
        out: list[tuple[int, int | None, SubscriptionRecord]] = []
        subscriptions = session.subscriptions
        for topic_filter, since in backlog.since.items():
            record = subscriptions.get(topic_filter)
            if record is not None and topic_matches(topic_filter, topic):
                out.append((since, None, record))
        for topic_filter, ranges in backlog.closing.items():
            if topic_matches(topic_filter, topic):
                out += ranges
        return out

    def _backlog_delivery(self, session: Session, backlog: Backlog, row: StoredRow,
                          topic: str,
                          matching: list[tuple[int, int | None, SubscriptionRecord]],
                          messages: dict[int, Message]) -> Delivery | None:
        """The delivery a row becomes for this session, as `_targets` would have made it."""
        offset: int = row[0]
        origin: str = row[7]
        qos = -1
        as_published = False
        ids: tuple[int, ...] = ()
        for since, until, record in matching:
            if offset <= since or (until is not None and offset > until):
                continue
            if record.no_local and origin == session.client_id:
                continue  # [MQTT-3.8.3-3] (5.0)
            # One copy, at the highest QoS of its matching subscriptions, with every matching
            # subscription identifier [MQTT-3.3.5-1] (3.1.1), 3.3.4 (5.0).
            if record.qos > qos:
                qos = record.qos
            as_published = as_published or record.retain_as_published
            if record.subscription_id:
                ids += (record.subscription_id,)
        if qos < 0:
            return None
        qos = min(qos, row[3])
        if qos == 0 and offset <= backlog.online_from and not self.settings.queue_qos0_messages:
            return None  # a QoS 0 message published while it was offline
        retain = bool(row[4])
        message = messages.get(offset)
        if message is None:  # one per row, shared by the sessions reading it
            message = messages[offset] = Message(
                self._next_message_id, topic, row[5], row[3], retain,
                stored_properties(row[6]), row[1], row[8], origin, offset)
            self._next_message_id += 1
        delivery = Delivery(0, message, qos, retain and as_published, ids, 0)
        delivery.from_log = True
        return delivery

    def _backlog_take(self, session: Session, now: float) -> Delivery | None:
        """For `pull`: the next backlog delivery to send, taken from the buffer (None: none
        may go now). Moves the cursor; the caller records the in-flight entry."""
        backlog = session.backlog
        assert backlog is not None
        buffer = backlog.buffer
        if len(buffer) <= REFILL_AT and self._shared_pages:
            self._backlog_shared_fill(session, backlog, now)
        while buffer:
            delivery = buffer[0]
            offset = delivery.message.offset
            assert offset is not None
            send = False
            if backlog.skip:
                backlog.skip -= 1  # dropped by drop-oldest (counted then)
                self._backlog_touched.add(session.client_id)
            else:
                expires_at = delivery.message.expires_at
                if expires_at is not None and expires_at <= now:
                    self.stats.messages_expired += 1
                elif delivery.qos and len(session.inflight) >= session.inflight_max:
                    return None
                else:
                    send = True
                    if delivery.qos == 0 and backlog.outstanding:
                        # The cursor cannot pass the QoS 1 rows before it: a marker keeps
                        # it from being sent again after a crash (stored before it is sent).
                        backlog.markers.add(offset)
                        self._changes.append(InflightSaved(
                            backlog.reader, -offset, offset, 0, delivery.retain, (), DONE,
                            False))
                self._backlog_uncount(session, delivery)
            buffer.popleft()
            backlog.taken += 1
            if backlog.qos0 and backlog.qos0[0][1] <= offset:
                self._backlog_qos0_left(backlog, offset)
            if send and delivery.qos == 1:
                backlog.outstanding[offset] = None
                self._backlog_moved(backlog, offset, lazy=True)
            else:
                self._backlog_moved(backlog, offset)
            if send:
                delivery.id = self._next_delivery_id
                self._next_delivery_id += 1
                return delivery
        if backlog.sent < backlog.after:
            self._backlog_moved(backlog, backlog.after, lazy=True)  # rows not for it
        if (not backlog.fetching and backlog.after >= backlog.last
                and _seam_copy_fits(session)):
            self._backlog_close(session)
        return None

    @staticmethod
    def _backlog_qos0_left(backlog: Backlog, offset: int) -> None:
        """The QoS 0 deliveries counted while connected up to `offset` left the sequence."""
        qos0 = backlog.qos0
        while qos0 and qos0[0][1] <= offset:
            size = qos0.popleft()[2]
            if backlog.qos0_skipped:
                backlog.qos0_skipped -= 1
            else:
                backlog.qos0_bytes -= size

    def _backlog_moved(self, backlog: Backlog, offset: int, *, lazy: bool = False) -> None:
        backlog.sent = offset
        self._backlog_sync(backlog, lazy=lazy)
        excluded = backlog.excluded
        if len(excluded) > EXCLUDED_PRUNE_AT:
            backlog.excluded = {o for o in excluded if o > offset}

    @staticmethod
    def _backlog_uncount(session: Session, delivery: Delivery) -> None:
        if session.backlog_count > 0:
            session.backlog_count -= 1
        session.backlog_bytes = max(0, session.backlog_bytes - len(delivery.message.payload))

    # -- in flight ------------------------------------------------------------------------

    def _backlog_sync(self, backlog: Backlog, *, lazy: bool = False) -> None:
        """Move the durable cursor as far as it may go: below the oldest outstanding QoS 1
        row, else to what was handed out; markers it passed are no longer needed. `lazy`
        (the move passes only QoS 1 rows sent or acknowledged, and rows not for it): the
        record may wait, up to CURSOR_SAVE_EVERY such moves (see the module docstring)."""
        outstanding = backlog.outstanding
        durable = next(iter(outstanding)) - 1 if outstanding else backlog.sent
        if durable <= backlog.durable:
            return
        if lazy:
            backlog.unsaved += 1
            if backlog.unsaved < CURSOR_SAVE_EVERY:
                return
        backlog.unsaved = 0
        backlog.durable = durable
        # The session's counts are written with its cursor (one ReaderCounted per batch).
        self._backlog_touched.add(backlog.reader[len(SESSION_READER_PREFIX):])
        changes = self._changes
        last = changes[-1] if changes else None
        if isinstance(last, ReaderMoved) and last.reader == backlog.reader:
            last.offset = durable  # moved again by the next PUBACK of the batch: one record
        else:
            changes.append(ReaderMoved(backlog.reader, durable))
        if backlog.markers:
            passed = [o for o in backlog.markers if o <= durable]
            for offset in passed:
                backlog.markers.discard(offset)
                self._changes.append(InflightCleared(backlog.reader, -offset))
        if backlog.closing:
            self._backlog_forget_closed(backlog)

    def _backlog_save_inflight(self, session: Session, delivery: Delivery) -> None:
        backlog = session.backlog
        offset = delivery.message.offset
        if (backlog is None or delivery.packet_id is None or offset is None
                or offset in backlog.outstanding):
            return  # a QoS 1 row in flight is not stored (the cursor stays below it)
        self._changes.append(_inflight_record(backlog, delivery, offset))

    def _backlog_clear_inflight(self, session: Session, delivery: Delivery) -> None:
        backlog = session.backlog
        offset = delivery.message.offset
        if backlog is None or delivery.packet_id is None or offset is None:
            return
        lazy = offset in backlog.outstanding
        if lazy:
            del backlog.outstanding[offset]
        else:
            self._changes.append(InflightCleared(backlog.reader, delivery.packet_id))
            if offset > backlog.durable:  # finished above the durable cursor: remember it
                backlog.markers.add(offset)
                self._changes.append(InflightSaved(
                    backlog.reader, -offset, offset, delivery.qos, delivery.retain, (), DONE,
                    False))
        self._backlog_sync(backlog, lazy=lazy)


def _page_filters(backlog: Backlog) -> frozenset[tuple[str, int]]:
    """A shared page's key with its start: the filters, each since below `after` as `after`
    (it selects the same rows)."""
    after = backlog.after
    return frozenset((f, since if since > after else after)
                     for f, since in backlog.since.items())


def _seam_copy_fits(session: Session) -> bool:
    """Going live copies at most SEAM_COPY_MAX_BYTES of bodies (the seam, module docstring)."""
    size = 0
    for delivery in session.inflight.values():
        if delivery.from_log:
            message = delivery.message
            size += len(message.payload) + len(message.topic)
            if size > SEAM_COPY_MAX_BYTES:
                return False
    return True


def _second(item: tuple[str, int]) -> int:
    return item[1]


def _inflight_record(backlog: Backlog, delivery: Delivery, offset: int) -> InflightSaved:
    assert delivery.packet_id is not None
    return InflightSaved(backlog.reader, delivery.packet_id, offset, delivery.qos,
                         delivery.retain, delivery.subscription_ids, delivery.state,
                         delivery.dup)
