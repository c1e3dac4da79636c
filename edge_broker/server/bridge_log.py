"""A bridge's uplink reader: the `LogReader` (bridge/forward.py) over the SQLite store's log.

`read_after` reads one page of the bridge's rows on the store's thread (never on the event
loop), `wait_after` sleeps until a group commit appends past what the bridge has looked at
(the store calls `BridgeStoreSide.committed` after each commit: no polling), and
`commit_cursor` stores the cursor in its own short transaction (not fsynced on its own:
store/log/bridge_store.py `commit`); the Forwarder calls it only
after the remote side acknowledged. The store's reader may be ahead of the Forwarder's cursor
when `max_backlog_bytes` dropped the oldest rows: pages start after the later of the two.
Messages the bridge's own downlink published (origin: its `downlink_identity`) are skipped,
so a command is not sent back up the bridge it came from (as mosquitto's bridges do).

A drop's rows that this reader holds (read, not yet passed by a stored cursor: in flight)
count as dropped only if they are given up (`skipped`, `rewind`; server/bridge_drops.py
explains why and what the uplink process does instead).

*The backlog's oldest message* (`backlog_oldest_age_s`): the first row this reader holds
(read, not passed by a stored cursor) while the uplink reads pages; `OldestRow` reads it from
the store when no page says it (the uplink down since boot or after an outage, a sink that
never starts, the uplink process's page a later one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ..bridge.base import BridgeMessage
from ..store.log.bridge_store import BridgeStoreSide
from ..store.log.log import LogRow
from ..store.log.schema import decode_props
from .bridge_drops import count_none


def bridge_message(row: LogRow) -> BridgeMessage:
    props = row.properties
    return BridgeMessage(
        offset=row.offset, topic=row.topic, payload=row.payload, qos=row.qos,
        retain=row.retain, publish_time=row.at, client_id=row.origin,
        content_type=props.content_type, payload_utf8=props.payload_format_indicator == 1,
        user_properties=tuple(props.user_properties), size=row.size,
        response_topic=props.response_topic, correlation_data=props.correlation_data,
        expires_at=row.expires_at)


def raw_bridge_message(raw: Sequence[Any], name: str, name_size: int) -> BridgeMessage:
    """`bridge_message(log_row(...))` of the same row, without the `LogRow` in between (a
    row factory for `LogFile.page_of`: the uplink process makes one per drained message).
    Columns: store/log/bridge_file.py `BRIDGE_COLUMNS` (offset, at, topic id * 8 + QoS * 2 +
    retain, payload, the origin or `<len(properties)>:<properties><origin>`); the size as
    `log_row` counts it. Not read: `expires_at` (left None; the sinks of the uplink process,
    JetStream and Kafka, do not use it)."""
    payload = raw[3]
    packed = raw[2]
    last = raw[4]
    if isinstance(last, str):  # no properties (the usual case): nothing to decode
        return BridgeMessage(raw[0], name, payload, (packed >> 1) & 3, bool(packed & 1),
                             raw[1], last, None, False, (), name_size + len(payload))
    head, _, rest = bytes(last).partition(b":")
    length = int(head)
    blob = rest[:length]
    origin = rest[length:].decode()
    size = name_size + len(payload) + length
    if not blob:
        return BridgeMessage(raw[0], name, payload, (packed >> 1) & 3, bool(packed & 1),
                             raw[1], origin, None, False, (), size)
    props = decode_props(blob)
    return BridgeMessage(raw[0], name, payload, (packed >> 1) & 3, bool(packed & 1), raw[1],
                         origin, props.content_type, props.payload_format_indicator == 1,
                         tuple(props.user_properties), size, props.response_topic,
                         props.correlation_data)


class StoreLogReader:
    """`LogReader` for the bridge `name` (see the module docstring).

    Cursor commits run in the background, one at a time and coalesced: `commit_cursor`
    records the acknowledged offset and returns; a task writes the latest one (with the
    rows it passes, for the backlog counts) while the forwarder already reads and sends the
    next window, so the store's thread is not waited for twice per window. A commit that
    fails is raised by the next `commit_cursor` or `read_after` (the forwarder then starts
    again from its cursor after a backoff delay); `flush()` waits for the last one.
    """

    def __init__(self, side: BridgeStoreSide, name: str, skip_origin: str = "",
                 dropped: Callable[[int], None] | None = None) -> None:
        self.side = side
        self.name = name
        self.skip_origin = skip_origin  # the bridge's downlink identity: not sent back up
        self.dropped = dropped if dropped is not None else count_none  # n more count dropped
        self.scanned = 0  # every row of this bridge up to here was handed out
        # Rows read and not yet passed by a stored cursor, in offset order: what a commit
        # passes (for the reader's backlog counts).
        self._rows: list[LogRow] = []
        self._committing: list[LogRow] = []  # those of the write under way
        self._held: set[int] = set()  # offsets of rows in _rows a drop skipped
        self._acked = -1  # the last cursor the forwarder gave (-1: none yet)
        self._target = 0  # the cursor to store
        self._stored = 0  # the cursor stored last (by this reader)
        self._committer: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()
        side.listen(self._committed)

    def close(self) -> None:
        self.side.unlisten(self._committed)
        if self._committer is not None and not self._committer.done():
            self._committer.cancel()

    def _committed(self, _last_offset: int) -> None:
        self._wakeup.set()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        self._raise_error()
        page = await self.side.page(self.name, cursor, limit)
        # A page read again (a resend from the cursor) replaces what was read after it.
        self.rewind(cursor)
        self._rows.extend(page.rows)
        # Loop prevention: what this bridge's downlink published locally is not sent back.
        taken = [row for row in page.rows if row.origin != self.skip_origin]
        if not taken:
            # Only its own (or nothing): the cursor moves past them at once - unless this
            # page was read ahead of a window still waiting for its acknowledgements.
            if page.rows and cursor <= max(self._acked, self._stored):
                self._request(page.end)
                await self.flush()
            self.scanned = max(self.scanned, page.end, cursor)
        return [bridge_message(row) for row in taken]

    @property
    def oldest_at(self) -> float | None:
        """The publish time of the first row read and not yet passed by a stored cursor
        (those a drop skipped aside), or None when none is held."""
        held = self._held
        for row in self._rows:
            if row.offset not in held:
                return row.at
        return None

    def rewind(self, cursor: int) -> None:
        """What was read after `cursor` is given up (the forwarder reads again from it):
        rows of it a drop skipped will not be read again, so they count as dropped now."""
        rows = self._rows
        if not rows or rows[-1].offset <= cursor:
            return
        kept = [row for row in rows if row.offset <= cursor]
        held = self._held
        if held:
            released = [row.offset for row in rows[len(kept):] if row.offset in held]
            if released:
                held.difference_update(released)
                self.dropped(len(released))
        rows[:] = kept

    def skipped(self, after: int, through: int, count: int) -> None:
        """A drop skipped `count` rows, this bridge's in (after, through]: those read here
        and not yet passed by a stored cursor are held (acknowledged, they were forwarded;
        the store takes them out of its count again, store/log/bridges.py `commit`), the
        rest count as dropped now. Rows of the write under way were acknowledged. (Drops do
        not overlap: each starts at the stored cursor, past the one before.)"""
        new = [row.offset for row in self._rows if after < row.offset <= through]
        self._held.update(new)
        acked = sum(1 for row in self._committing if after < row.offset <= through)
        self.dropped(count - len(new) - acked)

    async def wait_after(self, cursor: int) -> None:
        mark = max(cursor, self.scanned)
        while self.side.last_committed <= mark:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def commit_cursor(self, cursor: int) -> None:
        self._raise_error()
        self._acked = max(self._acked, cursor)
        self._request(cursor)
        self.scanned = max(self.scanned, cursor)

    async def flush(self) -> None:
        """Wait until the latest requested cursor is stored (raise if that failed)."""
        committer = self._committer
        if committer is not None and not committer.done():
            await asyncio.shield(committer)
        self._raise_error()

    def _request(self, cursor: int) -> None:
        if cursor <= self._target:
            return
        self._target = cursor
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_loop(), name=f"bridge {self.name} cursor")

    async def _commit_loop(self) -> None:
        while self._stored < self._target and self._error is None:
            target = self._target
            rows = self._rows
            cut = len(rows)
            for i, row in enumerate(rows):
                if row.offset > target:
                    cut = i
                    break
            consumed = rows[:cut]
            del rows[:cut]
            if self._held:  # acknowledged: they were forwarded
                self._held.difference_update(row.offset for row in consumed)
            self._committing = consumed
            try:
                await self.side.commit(self.name, target, consumed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                rows[:0] = consumed  # not passed: a later commit passes them
                self._error = exc
                self._target = self._stored
                return
            finally:
                self._committing = []
            self._stored = target


class OldestRow:
    """The publish time of the bridge `name`'s first row after its stored cursor, read from
    the store (a page of one row, on the store's thread: `BridgeStoreSide.page`) and kept
    until the cursor moves. Read when `oldest_at` finds it missing or out of date, and after
    each group commit while `reading()` is false (the uplink reads no pages: not connected),
    so that the status asked for once has it."""

    def __init__(self, side: BridgeStoreSide, name: str, reading: Callable[[], bool]) -> None:
        self.side = side
        self.name = name
        self.reading = reading
        # The store's page read, bound now: tests replace `side.page` afterwards to make the
        # uplink's reads fail (test_broker_downlink.py), not these.
        self._page = side.page
        self._at: float | None = None
        self._after = -1  # the stored cursor `_at` is the first row after (-1: none)
        self._task: asyncio.Task[None] | None = None
        side.listen(self._committed)
        self._committed(0)  # a backlog left by the last run: read now if no page will say

    def close(self) -> None:
        self.side.unlisten(self._committed)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _committed(self, _last_offset: int) -> None:
        if not self.reading():
            self._current()

    def oldest_at(self, held: float | None) -> float | None:
        """The older of `held` (what the uplink's pages say, None: nothing) and the store's
        first row after the stored cursor, if that was read for the cursor as it is now;
        else `held`, and a read starts."""
        at = self._current()
        if at is None:
            return held
        return at if held is None else min(at, held)

    def _current(self) -> float | None:
        reader = self.side.reader(self.name)
        if reader is None or reader.backlog_count <= 0:
            return None
        if self._after == reader.offset and self._at is not None:
            return self._at  # rows after a cursor stay until it passes them
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._read(reader.offset), name=f"bridge {self.name} oldest row")
        return None

    async def _read(self, after: int) -> None:
        try:
            page = await self._page(self.name, after, 1)
        except Exception:  # the store failing: no age shown (the uplink reports failures)
            return
        self._at = page.rows[0].at if page.rows else None
        self._after = after
