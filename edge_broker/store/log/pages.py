"""Reading the log: pages of rows in offset order for a selection of topics (the read
plan: one index range, index ranges per topic, or a scan filtered in Python), and the first
offset at a time. `LogPages` is the base class of `Log` (store/log/log.py), which keeps the
state it reads: the last offset, the row count and the topics by id."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .records import LOG_COLUMNS, LogRow, Page, RawRow, TopicStats, log_row

__all__ = ["MAX_IN_LIST", "MAX_SCAN_BATCH", "SCAN_FRACTION", "LogPages"]

# Read strategy: when the selected topics hold at least this share of the log's rows, scan
# the log in offset order and filter in Python; otherwise read index ranges per topic.
SCAN_FRACTION: Final = 0.3
MAX_IN_LIST: Final = 500  # more selected topics than this: scan
MAX_SCAN_BATCH: Final = 8192
_COLUMNS: Final = LOG_COLUMNS
_SCAN: Final = f"SELECT {_COLUMNS} FROM log WHERE offset > ? ORDER BY offset LIMIT ?"
_ONE_TOPIC: Final = (f"SELECT {_COLUMNS} FROM log WHERE topic_id = ? AND offset > ?"
                    " ORDER BY offset LIMIT ?")
_PROBE: Final = "SELECT offset, at FROM log WHERE offset >= ? ORDER BY offset LIMIT 1"


class LogPages:
    """The read side of `Log` (see the module docstring)."""

    last_offset: int
    total_count: int
    by_id: dict[int, TopicStats]

    def _row(self, raw: Sequence[Any]) -> LogRow:
        stats = self.by_id[raw[2]]
        return log_row(raw, stats.name, stats.name_size)

    def read_page(self, conn: sqlite3.Connection, after: int, selection: Mapping[int, int],
                  limit: int) -> Page:
        """Up to `limit` rows with offset > `after` whose topic id is in `selection` (topic id
        -> since) and whose offset is above that topic's since, in offset order."""
        raws, end = self.read_raw(conn, after, selection, limit)
        return Page([self._row(raw) for raw in raws], end)

    def read_raw(self, conn: sqlite3.Connection, after: int, selection: Mapping[int, int],
                 limit: int) -> tuple[list[RawRow], int]:
        """`read_page`'s rows as SQLite returns them (`_COLUMNS`: offset, at, topic id, qos,
        retain, payload, properties in wire form or None, origin, expires_at), and its
        `end`: for readers that make no `LogRow` (a replay builds packets from the bytes)."""
        last = self.last_offset
        if limit <= 0:
            return [], after
        if not selection or after >= last:
            return [], max(after, last)
        by_id = self.by_id
        if len(selection) >= len(by_id):  # every topic (`#` without `$` topics is close)
            return self._scan(conn, after, selection, limit, 1.0)
        matched = sum(by_id[t].count for t in selection if t in by_id)
        if matched == 0:
            return [], last
        fraction = matched / max(1, self.total_count)
        if fraction >= SCAN_FRACTION or len(selection) > MAX_IN_LIST:
            return self._scan(conn, after, selection, limit, fraction)
        if len(selection) == 1:  # one topic: its index range, no window needed
            ((tid, since),) = selection.items()
            raws = conn.execute(_ONE_TOPIC, (tid, max(after, since), limit)).fetchall()
            return raws, raws[-1][0] if len(raws) == limit else last
        return self._ranges(conn, after, selection, limit, fraction)

    def _scan(self, conn: sqlite3.Connection, after: int, selection: Mapping[int, int],
              limit: int, fraction: float) -> tuple[list[RawRow], int]:
        batch = min(MAX_SCAN_BATCH, int(limit / fraction) + 16)
        lo = after
        last = self.last_offset
        if fraction >= 1.0 and all(selection.get(t, after + 1) <= after for t in self.by_id):
            # Every topic, none with a since above `after`: every row is selected, the
            # page is one range of the primary key.
            raws = conn.execute(_SCAN, (lo, limit)).fetchall()
            return raws, raws[-1][0] if len(raws) == limit else last
        out: list[RawRow] = []
        while lo < last:
            raws = conn.execute(_SCAN, (lo, batch)).fetchall()
            if not raws:
                return out, last
            for raw in raws:
                since = selection.get(raw[2])
                if since is not None and raw[0] > since:
                    out.append(raw)
                    if len(out) == limit:
                        return out, raw[0]
            lo = raws[-1][0]
        return out, last

    def _ranges(self, conn: sqlite3.Connection, after: int, selection: Mapping[int, int],
                limit: int, fraction: float) -> tuple[list[RawRow], int]:
        groups: dict[int, list[int]] = {}
        for tid, since in selection.items():
            groups.setdefault(since, []).append(tid)
        window = int(limit / fraction * 1.5) + 64
        out: list[RawRow] = []
        lo = after
        last = self.last_offset
        while lo < last:
            hi = min(lo + window, last)
            raws: list[RawRow] = []
            for since, tids in groups.items():
                lower = max(lo, since)
                if lower >= hi:
                    continue
                marks = ", ".join("?" * len(tids))
                raws.extend(conn.execute(
                    f"SELECT {_COLUMNS} FROM log WHERE topic_id IN ({marks})"
                    " AND offset > ? AND offset <= ? ORDER BY offset", (*tids, lower, hi)))
            if len(groups) > 1:
                raws.sort(key=lambda r: r[0])
            need = limit - len(out)
            if len(raws) >= need:
                out.extend(raws[:need])
                return out, out[-1][0]
            out.extend(raws)
            lo = hi
            window *= 2
        return out, last

    # -- time -----------------------------------------------------------------------------

    def first_offset_at(self, conn: sqlite3.Connection, at: float) -> int:
        """The offset of the first row published at or after `at` (`last_offset + 1` if none).

        `at` never decreases along the offsets, so this is a binary search over the primary
        key: about log2(rows) probes, no index on time."""
        lo, hi = 1, self.last_offset + 1
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute(_PROBE, (mid,)).fetchone()
            if row is None or row[1] >= at:
                hi = mid
            else:
                lo = mid + 1
        row = conn.execute(_PROBE, (lo,)).fetchone()
        return int(row[0]) if row is not None else self.last_offset + 1
