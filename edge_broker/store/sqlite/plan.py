"""The plan of a group commit: a group of batches coalesced into one transaction's statements.

`plan_group` takes the group the writer (writer.py) took off its queue and coalesces it per
key: later records win; `SessionDeleted` drops what the group saved earlier for that client
and becomes a cascading delete. The transaction it plans runs deletions first, then the prune
of the bodies they freed (so the inserts reuse those pages, which is what makes progress on a
full disk: acks make room; bodies the group refers to again are exempt, `protect`), then
inserts/updates, then the log's appends (writer.py), then a last prune for rows the updates
re-pointed. Coalescing skips writes that cannot matter: a delivery saved and deleted inside the
group is never written (a delete is only issued for delivery ids at or below `delivery_hwm`,
the highest id this store ever wrote or found at open), and a body saved in the group that
nothing refers to is not inserted (only updated, if its id is at or below `message_hwm` and it
may be in the file already). The sessions' backlog counts (`ReaderCounted`, one per session and
batch) are coalesced to the last per reader and written after the other reader records, in
one multi-row UPDATE (`Log.save_counted`): every statement is a step the writer thread runs
without the GIL and must then win it back from the event loop, so a group of an S4 ingest
(10 offline sessions) runs about 9 statements instead of about 30.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...core.changes import (
    Change,
    DeliveryDeleted,
    DeliveryRecord,
    DeliverySaved,
    DownlinkPosition,
    InflightCleared,
    InflightSaved,
    LogAppended,
    Message,
    MessageSaved,
    Qos2Received,
    Qos2Released,
    ReaderChange,
    ReaderClosed,
    ReaderCounted,
    ReaderFilterDeleted,
    ReaderFilterSaved,
    ReaderMoved,
    ReaderOpened,
    ReaderRangesSaved,
    RetainedDeleted,
    RetainedSaved,
    SessionDeleted,
    SessionRecord,
    SessionSaved,
    StreamCursorSaved,
    SubscriptionDeleted,
    SubscriptionRecord,
    SubscriptionSaved,
    reader_name,
)
from ..log import bridges as bridge_ops
from .sql import (
    _CASCADE,
    _CURSOR_DELETE,
    _CURSOR_PUT,
    _DELIVERY_DELETE,
    _DELIVERY_PUT,
    _MESSAGE_PUT,
    _MESSAGE_UPDATE,
    _QOS2_DELETE,
    _QOS2_PUT,
    _RETAINED_DELETE,
    _RETAINED_PUT,
    _SESSION_PUT,
    _SUBSCRIPTION_DELETE,
    _SUBSCRIPTION_PUT,
    _delivery_row,
    _message_row,
    _message_update_row,
    _session_row,
    _subscription_row,
)

# --------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class _Plan:
    """One group of batches, coalesced into the statements of one transaction."""

    deletes: list[tuple[str, list[tuple[Any, ...]]]]
    protect: list[tuple[int]]  # bodies the puts refer to: not pruned after the deletes
    puts: list[tuple[str, list[tuple[Any, ...]]]]
    prune_after_deletes: bool
    prune_after_puts: bool
    max_delivery_id: int
    max_message_id: int
    changes: int
    batches: int
    rows: int
    log: list[Message]  # LogAppended messages, in order
    readers: list[ReaderChange]  # sessions' reader records, in order (after the appends)
    # The last ReaderCounted of each reader, as (reader, count, bytes, skip): written after
    # `readers`, in one statement (see plan_group).
    counted: list[tuple[str, int, int, int]]

    @property
    def empty(self) -> bool:
        return (not self.deletes and not self.puts and not self.log and not self.readers
                and not self.counted)


_Pending = tuple[Sequence[Change], "asyncio.Future[None] | None"]
_READER_CHANGES = (ReaderOpened, ReaderFilterSaved, ReaderFilterDeleted, ReaderMoved,
                   ReaderClosed, InflightSaved, InflightCleared, ReaderRangesSaved)


def plan_group(group: list[_Pending], delivery_hwm: int, message_hwm: int) -> _Plan:
    """Coalesce a group of batches: the final state of every key the group touched."""
    sessions: dict[str, SessionRecord | None] = {}
    subscriptions: dict[str, dict[str, SubscriptionRecord | None]] = {}
    deliveries: dict[str, dict[int, DeliveryRecord | None]] = {}
    qos2: dict[str, dict[int, bool]] = {}
    messages: dict[int, Message] = {}
    retained: dict[str, int | None] = {}
    cascade: dict[str, None] = {}
    appended: list[Message] = []
    cursors: dict[tuple[str, str], str | None] = {}
    downlinks: dict[tuple[str, str], int] = {}  # DownlinkPosition (bridges), final value
    readers: list[ReaderChange] = []
    # ReaderCounted sets a reader's queued_* columns and nothing else: only the last one of
    # each reader counts, and it may be written after every other reader record of the group,
    # except when a ReaderOpened/ReaderClosed of that reader follows it (the row is made
    # again or deleted): then it goes into `readers` just before that record.
    counted: dict[str, ReaderCounted] = {}
    changes = batches = 0
    for batch, _ in group:
        if not batch:
            continue
        batches += 1
        changes += len(batch)
        for change in batch:
            if isinstance(change, LogAppended):  # the most frequent record of an ingest
                appended.append(change.message)
            elif isinstance(change, ReaderCounted):
                counted[change.reader] = change
            elif isinstance(change, DeliverySaved):
                saved = change.record
                per_client = deliveries.get(saved.client_id)
                if per_client is None:
                    per_client = deliveries[saved.client_id] = {}
                per_client[saved.delivery_id] = saved
            elif isinstance(change, MessageSaved):
                messages[change.message.id] = change.message
            elif isinstance(change, DeliveryDeleted):
                per_client = deliveries.get(change.client_id)
                if per_client is None:
                    per_client = deliveries[change.client_id] = {}
                per_client[change.delivery_id] = None
            elif isinstance(change, Qos2Received | Qos2Released):
                packets = qos2.get(change.client_id)
                if packets is None:
                    packets = qos2[change.client_id] = {}
                packets[change.packet_id] = isinstance(change, Qos2Received)
            elif isinstance(change, DownlinkPosition):
                downlinks[change.bridge, change.source] = change.position
            elif isinstance(change, _READER_CHANGES):
                if counted and isinstance(change, ReaderOpened | ReaderClosed):
                    earlier = counted.pop(change.reader, None)
                    if earlier is not None:
                        readers.append(earlier)
                readers.append(change)
            elif isinstance(change, StreamCursorSaved):
                cursors[change.client_id, change.topic_filter] = change.position
            elif isinstance(change, RetainedSaved):
                retained[change.topic] = change.message_id
            elif isinstance(change, RetainedDeleted):
                retained[change.topic] = None
            elif isinstance(change, SessionSaved):
                sessions[change.record.client_id] = change.record
            elif isinstance(change, SessionDeleted):
                cid = change.client_id
                sessions[cid] = None
                subscriptions.pop(cid, None)
                deliveries.pop(cid, None)
                qos2.pop(cid, None)
                cascade[cid] = None
                for key in [k for k in cursors if k[0] == cid]:
                    del cursors[key]
                earlier = counted.pop(reader_name(cid), None)
                if earlier is not None:
                    readers.append(earlier)
                readers.append(ReaderClosed(reader_name(cid)))
            elif isinstance(change, SubscriptionSaved):
                sub = change.record
                filters = subscriptions.get(sub.client_id)
                if filters is None:
                    filters = subscriptions[sub.client_id] = {}
                filters[sub.topic_filter] = sub
            elif isinstance(change, SubscriptionDeleted):
                filters = subscriptions.get(change.client_id)
                if filters is None:
                    filters = subscriptions[change.client_id] = {}
                filters[change.topic_filter] = None
                if change.topic_filter.startswith("$stream/"):
                    cursors[change.client_id, change.topic_filter] = None
            else:
                raise TypeError(f"not a change record: {change!r}")

    deletes: list[tuple[str, list[tuple[Any, ...]]]] = []
    puts: list[tuple[str, list[tuple[Any, ...]]]] = []
    if cascade:
        keys = [(cid,) for cid in cascade]
        deletes.extend((sql, keys) for sql in _CASCADE)

    sub_del = [(cid, f) for cid, filters in subscriptions.items()
               for f, sub in filters.items() if sub is None]
    sub_put = [_subscription_row(sub) for filters in subscriptions.values()
               for sub in filters.values() if sub is not None]

    hwm = delivery_hwm
    max_delivery_id = 0
    referenced: set[int] = set()
    repointable = False  # a put may re-point an existing row to another body
    del_del: list[tuple[str, list[int]]] = []  # per client
    del_put: list[tuple[Any, ...]] = []
    for cid, per_client in deliveries.items():
        gone: list[int] = []
        for did, record in per_client.items():
            if record is None:
                if did <= hwm:  # otherwise it was never written: nothing to delete
                    gone.append(did)
            else:
                del_put.append(_delivery_row(record))
                referenced.add(record.message_id)
                if did > max_delivery_id:
                    max_delivery_id = did
                if did <= hwm:
                    repointable = True
        if gone:
            del_del.append((cid, gone))

    q2_del = [(cid, p) for cid, packets in qos2.items() for p, on in packets.items() if not on]
    q2_put = [(cid, p) for cid, packets in qos2.items() for p, on in packets.items() if on]
    ret_del = [(topic,) for topic, mid in retained.items() if mid is None]
    ret_put = [(topic, mid) for topic, mid in retained.items() if mid is not None]
    referenced.update(mid for _, mid in ret_put)

    msg_put: list[tuple[Any, ...]] = []
    msg_update: list[tuple[Any, ...]] = []
    max_message_id = 0
    for mid, message in messages.items():
        if mid in referenced:
            msg_put.append(_message_row(message))
            if mid > max_message_id:
                max_message_id = mid
        elif mid <= message_hwm:  # may be in the file, referenced from earlier groups
            msg_update.append(_message_update_row(message))
        # else: a body nothing refers to and never written: skip it.

    # Deletions first, and the bodies they freed pruned right after them, so the puts can
    # reuse those pages (progress on a full disk: acks make room). Bodies the puts refer
    # to are protected from that early prune; the final state decides at the end.
    if sub_del:
        deletes.append((_SUBSCRIPTION_DELETE, sub_del))
    for cid, gone in del_del:
        for sql, rows in _DELIVERY_DELETE.statements([(did,) for did in gone]):
            deletes.append((sql, [(cid, *row) for row in rows]))
    for sql, rows in ((_QOS2_DELETE, q2_del), (_RETAINED_DELETE, ret_del)):
        if rows:
            deletes.append((sql, rows))
    prune_after_deletes = bool(cascade or del_del or ret_del)
    protect = ([(mid,) for mid in referenced if mid <= message_hwm]
               if prune_after_deletes else [])
    session_put = [_session_row(s) for s in sessions.values() if s is not None]
    cursor_del = [key for key, position in cursors.items() if position is None]
    cursor_put = [(*key, position) for key, position in cursors.items()
                  if position is not None]
    if cursor_del:
        deletes.append((_CURSOR_DELETE, cursor_del))
    if downlinks:  # a bridge's remote position, in the transaction of its message
        downlink_del, downlink_put = bridge_ops.downlink_statements(downlinks)
        deletes.extend(downlink_del)
        puts.extend(downlink_put)
    for sql, rows in ((_SESSION_PUT, session_put), (_SUBSCRIPTION_PUT, sub_put),
                      (_CURSOR_PUT, cursor_put)):
        if rows:
            puts.append((sql, rows))
    if msg_put:
        puts.extend(_MESSAGE_PUT.statements(msg_put))
    if msg_update:
        puts.append((_MESSAGE_UPDATE, msg_update))
    if del_put:
        puts.extend(_DELIVERY_PUT.statements(del_put))
    for sql, rows in ((_QOS2_PUT, q2_put), (_RETAINED_PUT, ret_put)):
        if rows:
            puts.append((sql, rows))
    row_count = (len(sub_del) + sum(len(g) for _, g in del_del) + len(q2_del) + len(ret_del)
                 + len(session_put) + len(sub_put) + len(msg_put) + len(msg_update)
                 + len(del_put) + len(q2_put) + len(ret_put))
    return _Plan(deletes, protect, puts, prune_after_deletes,
                 prune_after_puts=repointable or bool(ret_put),
                 max_delivery_id=max_delivery_id, max_message_id=max_message_id,
                 changes=changes, batches=batches,
                 rows=row_count + len(appended) + len(cursors) + len(downlinks)
                 + len(readers) + len(counted),
                 log=appended, readers=readers,
                 counted=[(c.reader, c.count, c.bytes, c.skip) for c in counted.values()])
