"""Reading a persistent session's backlog back from the log and sending it: a mixin of
`BrokerCore`, the base of `BacklogRouting` (core/backlog.py, which has the rest of the
theory of operation; the state is in core/backlog_state.py).

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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from ..mqtt.topics import topic_matches
from .backlog_state import (
    CURSOR_SAVE_EVERY,
    DONE,
    EXCLUDED_PRUNE_AT,
    SHARED_PAGES_MAX,
    SHARED_PAGES_MAX_BYTES,
    Backlog,
    BacklogFetch,
    SharedPage,
    inflight_record,
    page_filters,
    seam_copy_fits,
)
from .changes import (
    SESSION_READER_PREFIX,
    InflightCleared,
    InflightSaved,
    Message,
    ReaderClosed,
    ReaderFilterDeleted,
    ReaderFilterSaved,
    ReaderMoved,
    ReaderRangesSaved,
    SubscriptionRecord,
)
from .replay import StoredRow, rows_of, stored_properties
from .session import Delivery, Session
from .streams import PAGE_SIZE, REFILL_AT, StreamRouting


class BacklogReading(StreamRouting):
    """Mixin of BrokerCore (which provides the state declared in the bases)."""

    # -- provided by BrokerCore --------------------------------------------------------------

    def _save_message(self, message: Message) -> None:
        raise NotImplementedError

    def _save_delivery(self, session: Session, delivery: Delivery) -> None:
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------

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

    # -- reading pages -----------------------------------------------------------------------

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
                filters = page_filters(backlog)
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
        page = self._shared_page(backlog.after, page_filters(backlog))
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

    # -- sending -----------------------------------------------------------------------------

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
                and seam_copy_fits(session)):
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

    # -- the durable cursor and what is in flight --------------------------------------------

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
        self._changes.append(inflight_record(backlog, delivery, offset))

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

    # -- the seam, and ranges the cursor passed ----------------------------------------------

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
