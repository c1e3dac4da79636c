"""A persistent session's backlog as a reader of the log. A mixin of `BrokerCore`.

Theory of operation (reading it back, its durability, the seam and shared pages:
core/backlog_read.py; the state: core/backlog_state.py).

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

*Shared subscriptions* stay on the per-delivery path: a message for a member of a shared
group is queued in memory with a delivery row, even in backlog mode (it may then reach the
session before older backlog rows of its other subscriptions).
"""

from __future__ import annotations

from ..mqtt.topics import topic_matches
from .backlog_read import BacklogReading
from .backlog_state import (
    CURSOR_SAVE_EVERY,
    DONE,
    SEAM_COPY_MAX_BYTES,
    SHARED_PAGES_MAX,
    SHARED_PAGES_MAX_BYTES,
    TAKES_CACHE_SIZE,
    Backlog,
    BacklogFetch,
    SharedPage,
    inflight_record,
    is_log_filter,
)
from .changes import (
    SESSION_READER_PREFIX,
    LogAppended,
    Message,
    ReaderClosed,
    ReaderCounted,
    ReaderFilterDeleted,
    ReaderFilterSaved,
    ReaderOpened,
    Snapshot,
    SubscriptionRecord,
    reader_name,
)
from .queues import DROP_OLDEST, QUEUE_FULL, STORE_FULL
from .session import Delivery, Session

__all__ = ["CURSOR_SAVE_EVERY", "DONE", "SEAM_COPY_MAX_BYTES", "SHARED_PAGES_MAX",
           "SHARED_PAGES_MAX_BYTES", "Backlog", "BacklogFetch", "BacklogRouting", "SharedPage",
           "is_log_filter"]


class BacklogRouting(BacklogReading):
    """Mixin of BrokerCore (which provides the state declared in the bases)."""

    # -- batches -----------------------------------------------------------------------------

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

    # -- modes -------------------------------------------------------------------------------

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
                    self._changes.append(inflight_record(backlog, delivery, offset))
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

    # -- publishing --------------------------------------------------------------------------

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

    # -- the store budget (store/log/budget.py) ----------------------------------------------

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

    # -- subscriptions -----------------------------------------------------------------------

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

    def _reader_filters(self, backlog: Backlog) -> dict[str, int]:
        """The filters the store holds for the reader: the subscriptions' and the closing
        ones', each with its lowest since."""
        filters = dict(backlog.since)
        for topic_filter, ranges in backlog.closing.items():
            for since, _, _ in ranges:
                filters[topic_filter] = min(since, filters.get(topic_filter, since))
        return filters


def _second(item: tuple[str, int]) -> int:
    return item[1]
