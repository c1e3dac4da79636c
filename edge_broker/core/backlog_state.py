"""The state of a persistent session's backlog (core/backlog.py has the theory of
operation): its cursor over the log (`Backlog`), a page the server reads for it from the store
(`BacklogFetch`), a page shared by the sessions reading the same range (`SharedPage`,
core/backlog_read.py *Shared pages*), and the constants and small helpers of both mixins."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .changes import InflightSaved, Message, SubscriptionRecord
from .replay import StoredRow
from .session import Delivery, Session
from .streams import STREAM_PREFIX

DONE = 3  # the state of a stored marker: a QoS 2 row finished above the durable cursor
EXCLUDED_PRUNE_AT = 1024  # prune `Backlog.excluded` of handed-out offsets past this size
# Going live copies the in-flight log deliveries' bodies (topic + payload bytes) only up to
# this; above it the session waits in backlog mode for acknowledgements (the seam,
# core/backlog_read.py).
SEAM_COPY_MAX_BYTES = 64 * 1024
TAKES_CACHE_SIZE = 1024  # topics remembered per backlog by `_backlog_takes`
# A connected session's cursor moves over QoS 1 rows (sent, then acknowledged) are recorded
# once per this many (and whenever anything else moves it): core/backlog_read.py
# *Durability*.
CURSOR_SAVE_EVERY = 256
# Pages read for one session kept for the others reading the same range (*Shared pages*,
# core/backlog_read.py):
# at most this many, and this many bytes of payload.
SHARED_PAGES_MAX = 16
SHARED_PAGES_MAX_BYTES = 4 * 1024 * 1024


def is_log_filter(topic_filter: str) -> bool:
    """Whether a subscription is one of a session's reader filters (not shared, no stream)."""
    return not (topic_filter.startswith("$share/") or topic_filter.startswith(STREAM_PREFIX))


class Backlog:
    """A session's cursor over the log (core/backlog.py)."""

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
        # The count invariant (*Bounds* in core/backlog.py). The rows the session has
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
    """A backlog page that several sessions read (core/backlog_read.py *Shared pages*)."""

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


def page_filters(backlog: Backlog) -> frozenset[tuple[str, int]]:
    """A shared page's key with its start: the filters, each since below `after` as `after`
    (it selects the same rows)."""
    after = backlog.after
    return frozenset((f, since if since > after else after)
                     for f, since in backlog.since.items())


def seam_copy_fits(session: Session) -> bool:
    """Going live copies at most SEAM_COPY_MAX_BYTES of bodies (the seam, core/backlog_read.py)."""
    size = 0
    for delivery in session.inflight.values():
        if delivery.from_log:
            message = delivery.message
            size += len(message.payload) + len(message.topic)
            if size > SEAM_COPY_MAX_BYTES:
                return False
    return True


def inflight_record(backlog: Backlog, delivery: Delivery, offset: int) -> InflightSaved:
    assert delivery.packet_id is not None
    return InflightSaved(backlog.reader, delivery.packet_id, offset, delivery.qos,
                         delivery.retain, delivery.subscription_ids, delivery.state,
                         delivery.dup)
