"""`LogKeeper`: the log as the SQLite store runs it (store/sqlite/), on its writer thread.

The store owns one `LogKeeper` per open file. Everything here is synchronous and runs in the
store's single database thread with its connection:

- `load(conn)` after the migrations at open, and again after any rolled-back group (the
  in-memory state of `Log` is then ahead of the file);
- `append(conn, messages)` inside the group transaction, for the `LogAppended` records of the
  group, in order; the offsets the core assigned must be the ones the log assigns (checked);
- `retention(conn)` between groups, in its own short transaction: one bounded step (see
  retention.py); the store runs one at least every `RETENTION_INTERVAL_S`, and at once while
  `retention_due` or while the last step ran out of budget, so retention lags its bounds by
  at most about 10 s or 1% of max_bytes and never holds the writer for long;
- `page`, `stats`, `delete`: reads for replay (SUBSCRIBE `$stream/...`, `edge-broker replay`)
  and the admin commands, one hop each.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

from ...core.changes import ReaderChange, ReaderState
from . import backlogs
from .budget import GiveWay, backlogs_give_way, give_way_step
from .log import Appendable, Log, LogRow, RawRow
from .replay import Position, StreamStats, page_raw, replay, stream_start, stream_stats
from .retention import RetentionReport, TrustedClock, retention_due, retention_step
from .streams import StreamConfig

__all__ = ["RETENTION_INTERVAL_S", "LogKeeper"]

_T = TypeVar("_T")

log = logging.getLogger("edge_broker.store")

RETENTION_INTERVAL_S: Final = 5.0  # a step at least this often (the issue allows 10 s of lag)
RETENTION_BUDGET: Final = 2000  # rows per step and pass
GIVE_WAY_BUDGET: Final = 512  # rows per step of giving way to the store budget


class LogKeeper:
    def __init__(self, streams: Sequence[StreamConfig] = ()) -> None:
        self.log = Log(streams)
        self.clock = TrustedClock()
        self.retention_at = 0.0  # monotonic time of the last step
        self.retention_more = False  # the last step ran out of budget
        self.rows_deleted = 0
        self.mismatches = 0
        self.budget_stream_rows = 0  # rows streams released for the store budget (budget.py)
        self.budget_backlog_rows = 0  # rows backlogs skipped for it

    def load(self, conn: sqlite3.Connection) -> None:
        """(Re)read the log's state; writes only stream changes (run in a transaction)."""
        self.log.load(conn)

    @property
    def last_offset(self) -> int:
        return self.log.last_offset

    def append(self, conn: sqlite3.Connection, messages: Sequence[Appendable],
               expected: Sequence[int | None]) -> None:
        offsets = self.log.append(conn, messages, time.time())
        if offsets and list(offsets) != list(expected):
            # Never expected: the core and the log agree on offsets by construction. The
            # messages are stored; replay by offset would name them differently.
            self.mismatches += 1
            log.error("log offsets %d..%d differ from the core's %s..%s", offsets[0],
                      offsets[-1], expected[0], expected[-1])

    def retention_wanted(self, now_monotonic: float) -> bool:
        if not self.log.streams and not self.log.total_count:
            return False  # nothing to delete (session and bridge rows go once passed)
        if self.retention_more or now_monotonic - self.retention_at >= RETENTION_INTERVAL_S:
            return True
        return retention_due(self.log, self.clock.now())

    def retention(self, conn: sqlite3.Connection) -> RetentionReport:
        """One bounded retention step, in a transaction of its own."""
        self.retention_at = time.monotonic()
        report = self._own_transaction(conn, lambda: retention_step(
            self.log, conn, self.clock.now(), budget=RETENTION_BUDGET))
        self.retention_more = not report.done
        self.rows_deleted += report.rows_deleted
        return report

    def give_way(self, conn: sqlite3.Connection, excess: int) -> GiveWay:
        """One bounded step of giving way to the store budget (budget.py), in a transaction
        of its own."""
        report = self._own_transaction(conn, lambda: give_way_step(
            self.log, conn, self.clock.now(), excess, budget=GIVE_WAY_BUDGET))
        self.rows_deleted += report.rows_deleted
        self.budget_stream_rows += report.stream_rows
        if report.stream_rows:
            log.info("store budget: streams released their %d oldest row(s) (%d bytes)",
                     report.stream_rows, report.stream_bytes)
        return report

    def give_way_backlogs(self, conn: sqlite3.Connection, readers: Sequence[str],
                          excess: int) -> list[tuple[str, int, int, int, int]]:
        """Tier 2 of the store budget (budget.py), in a transaction of its own."""
        out = self._own_transaction(conn, lambda: backlogs_give_way(
            self.log, conn, readers, excess, self.clock.now(), budget=GIVE_WAY_BUDGET))
        for name, _, count, size, _ in out:
            self.budget_backlog_rows += count
            log.warning("store budget: %s gave way: its %d oldest message(s) (%d bytes) "
                        "dropped (store_full)", name, count, size)
        return out

    # -- persistent sessions' backlogs (backlogs.py) --------------------------------------

    def apply_readers(self, conn: sqlite3.Connection, changes: Sequence[ReaderChange]) -> None:
        """The group's reader records, in order, after its appends (in its transaction)."""
        backlogs.apply(self.log, conn, changes)

    def read_backlog(self, conn: sqlite3.Connection, name: str, filters: Mapping[str, int],
                     after: int, until: int,
                     limit: int) -> tuple[list[RawRow], dict[int, str], int]:
        return backlogs.read(self.log, conn, name, filters, after, until, limit)

    def readers(self, conn: sqlite3.Connection) -> dict[str, ReaderState]:
        return backlogs.load(self.log, conn)

    # -- reads ----------------------------------------------------------------------------

    def page(self, conn: sqlite3.Connection, name: str, topic_filter: str | None,
             position: Position | None, after: int, until: int,
             limit: int) -> tuple[list[RawRow], dict[int, str], int, int]:
        """Rows of stream `name` with `after < offset <= until` (from `position` when given:
        the first page), at most `limit`, in order, as SQLite returns them (`Log.read_raw`),
        with the names of their topic ids; the offset up to which the range was looked at
        (`until` when it is complete); and, when the stream's retention (max_bytes, max_age)
        or the store budget removed rows after `after` that this reader had not read yet,
        the last offset removed (the reader goes on after it), else 0. An unknown stream
        (removed from the configuration) gives ([], {}, until, 0)."""
        state = self.log.streams.get(name)
        if state is None:
            return [], {}, until, 0
        # Never past what the log holds: with durability "none" a batch counts as done
        # before the writer appended it; the caller asks again from `end`.
        asked = until
        until = min(until, self.log.last_offset)
        if position is not None:
            after = stream_start(self.log, conn, name, position) - 1
        passed = state.first_offset - 1 if position is None and 0 < after < \
            state.first_offset - 1 else 0
        if after >= until:
            return [], {}, min(max(after, until), asked), passed
        rows, end = page_raw(self.log, conn, name, after, until, topic_filter, limit)
        by_id = self.log.by_id
        return rows, {tid: by_id[tid].name for tid in {row[2] for row in rows}}, end, passed

    def stats(self, conn: sqlite3.Connection) -> list[StreamStats]:
        return [stream_stats(self.log, conn, name) for name in sorted(self.log.streams)]

    def delete(self, conn: sqlite3.Connection, name: str) -> bool:
        """Empty a stream: its floor moves past the log's last offset (retention then
        deletes its rows unless another holder keeps them). False if unknown."""
        state = self.log.streams.get(name)
        if state is None:
            return False
        def empty() -> None:
            state.first_offset = self.log.last_offset + 1
            state.first_at = None
            state.count = state.bytes = 0
            self.log.save_stream(conn, state)

        self._own_transaction(conn, empty)
        self.retention_more = True
        return True

    def replay_rows(self, conn: sqlite3.Connection, name: str, position: Position,
                    topic_filter: str | None, limit: int | None, until: int | None = None,
                    max_bytes: int | None = None) -> list[LogRow]:
        """For `edge-broker replay` through the admin socket: at most `limit` rows (the
        caller bounds it), from `position`, none after offset `until`, and no more once
        they hold `max_bytes` (at least one row)."""
        start = stream_start(self.log, conn, name, position)
        rows: list[LogRow] = []
        size = 0
        page_size = min(256, limit) if limit else 256
        for row in replay(self.log, conn, name, start, topic_filter, limit, page_size):
            if until is not None and row.offset > until:
                break
            rows.append(row)
            size += row.size
            if max_bytes is not None and size >= max_bytes:
                break
        return rows

    def _own_transaction(self, conn: sqlite3.Connection, work: Callable[[], _T]) -> _T:
        """`work()` in a write transaction of its own; if it fails, the transaction is rolled
        back and the in-memory state of the log is reloaded from the file."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            conn.commit()
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            self.log.load(conn)
            raise
        return result
