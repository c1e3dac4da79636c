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
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..bridge.base import BridgeMessage
from ..store.log.bridge_store import BridgeStoreSide
from ..store.log.log import LogRow


def bridge_message(row: LogRow) -> BridgeMessage:
    props = row.properties
    return BridgeMessage(
        offset=row.offset, topic=row.topic, payload=row.payload, qos=row.qos,
        retain=row.retain, publish_time=row.at, client_id=row.origin,
        content_type=props.content_type, payload_utf8=props.payload_format_indicator == 1,
        user_properties=tuple(props.user_properties), size=row.size)


class StoreLogReader:
    """`LogReader` for the bridge `name` (see the module docstring)."""

    def __init__(self, side: BridgeStoreSide, name: str, skip_origin: str = "") -> None:
        self.side = side
        self.name = name
        self.skip_origin = skip_origin  # the bridge's downlink identity: not sent back up
        self.scanned = 0  # every row of this bridge up to here was handed out
        self.oldest_at: float | None = None  # publish time of the first row of the last page
        self._rows: list[LogRow] = []  # the last page, for commit_cursor's backlog counts
        self._wakeup = asyncio.Event()
        side.listen(self._committed)

    def close(self) -> None:
        self.side.unlisten(self._committed)

    def _committed(self, _last_offset: int) -> None:
        self._wakeup.set()

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        page = await self.side.page(self.name, cursor, limit)
        self._rows = page.rows
        self.oldest_at = page.rows[0].at if page.rows else None
        # Loop prevention: what this bridge's downlink published locally is not sent back.
        taken = [row for row in page.rows if row.origin != self.skip_origin]
        if not taken:
            if page.rows:  # only its own: the cursor moves past them at once
                await self.side.commit(self.name, page.end, page.rows)
            self.scanned = max(self.scanned, page.end, cursor)
        return [bridge_message(row) for row in taken]

    async def wait_after(self, cursor: int) -> None:
        mark = max(cursor, self.scanned)
        while self.side.last_committed <= mark:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def commit_cursor(self, cursor: int) -> None:
        consumed = [row for row in self._rows if row.offset <= cursor]
        await self.side.commit(self.name, cursor, consumed)
        self.scanned = max(self.scanned, cursor)
