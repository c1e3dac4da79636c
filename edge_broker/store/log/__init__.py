"""The append-only log: messages stored once, readers as cursors, named streams (issue 8).

Theory of operation (docs/log.md is the long form, with the measurements)
-----------------------------------------------------------------------
*One log.* Every message something durable needs (a persistent session, a stream, later a
bridge) is one row of the `log` table, appended once however many readers want it. Its
offset is the rowid: one sequence for the whole broker, starting at 1, assigned by `Log`
from `log_state.last_offset`, so deleting the tail never makes an offset come back. `at` is
the publish time, the wall clock made non-decreasing at append (`max(now, last at)`): along
the offsets it never decreases, so "the first message at or after T" is a binary search over
the primary key and retention by age walks rows in offset order.

*Topics are interned* (`log_topics`: id, name, and the counters rows, bytes, first and last
offset per topic, updated in the same transaction as the append or delete). The log stores
a small integer per row; the index `log_by_topic (topic_id, offset)` lets a reader with
narrow filters read only its topics. A reader's filters are mapped to the set of matching
topic ids in memory (matched again only when a topic is new, which is rare), and
`Log.read_page` picks a plan from the counters: when the selected topics hold at least 30%
of the rows, it scans by offset and filters in Python; otherwise it reads index ranges of
those topics over an offset window sized from their share of the traffic (doubled while
short). Either way a page is at most `limit` rows in offset order, and `Page.end` says how
far the reader may move when it consumed them all (past rows that were not its own).

*Readers* (cursors.py): an offset (the last one handed out) plus a few in-flight entries
(packet id, offset, QoS 2 state) and filters each with the offset at which it was made
(`since`): a subscription added later never sees older messages, a replay gives an older
since. Backlog rows and bytes per reader are counted at append and advance, never scanned.
A reader over its own bound is moved forward with `drop_to_bound`, the skipped rows counted.

*Streams* (streams.py, retention.py, replay.py): a named topic filter with max_age,
max_bytes and last_value. A stream owns no rows: a message belongs to every stream whose
filter matches its topic, and a stream's offsets are the log's (with gaps). Each stream keeps
a floor (`log_streams.first_offset`) with the rows and bytes it holds above it. Retention
moves stream floors by age and size, then deletes per topic the rows below the lowest floor
of the topic's holders (streams and readers), in small steps; last-value streams hold only
the newest row of each topic. Time-based retention uses `TrustedClock`, which does not
follow a wall clock stepped forward while running (see retention.py).

*Transactions.* Everything here is synchronous and runs on the store's single writer thread
with its connection, inside the transaction the caller opened (the group commit); nothing
here begins or commits, except `ensure_schema` and `transaction` for standalone use. After a
rollback the caller reloads the in-memory state with `Log.load(conn)`; start-up reads the
counter tables only, never the rows.
"""

from __future__ import annotations

from .log import Log, LogMessage, LogRow, Page, Reader, StreamState, TopicStats, transaction
from .retention import RetentionReport, TrustedClock, retention_due, retention_step
from .schema import MIGRATION, ensure_schema
from .streams import StreamConfig, parse_streams

__all__ = [
    "MIGRATION",
    "Log",
    "LogMessage",
    "LogRow",
    "Page",
    "Reader",
    "RetentionReport",
    "StreamConfig",
    "StreamState",
    "TopicStats",
    "TrustedClock",
    "ensure_schema",
    "parse_streams",
    "retention_due",
    "retention_step",
    "transaction",
]
