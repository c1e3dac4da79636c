"""Replay of named streams for `$stream/` subscriptions: the server's half.

The core never awaits (core/streams.py): it lists the history pages its `$stream/`
subscriptions need (`take_stream_fetches`), and this reads each from the store on the store's
thread, hands the rows back (`stream_page`) and pumps the client's connection, which sends
them under its normal flow control. A subscription has at most one page in flight, and a next
page is asked for only when fewer than `REFILL_BELOW` are buffered, so memory per replaying
subscription is bounded by a page or two, however long its history. `fetch()` runs after
every commit (the commit pipeline's last step) and after every page.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..core.changes import Message
from ..core.streams import StreamFetch
from ..errors import StoreError
from ..mqtt.types import ReasonCode

if TYPE_CHECKING:
    from .app import BrokerApp

log = logging.getLogger("edge_broker")


class StreamReplay:
    def __init__(self, app: BrokerApp) -> None:
        self.app = app
        self._tasks: set[asyncio.Task[None]] = set()

    def setup(self) -> None:
        """Tell the core the configured streams, when the store keeps a log."""
        app = self.app
        streams = app.config.streams
        if not streams:
            return
        if not hasattr(app.store, "read_stream"):
            log.warning("[[streams]] need [storage] persistence = \"sqlite\": %d stream(s) "
                        "ignored", len(streams))
            return
        app.core.set_streams((s.name, s.filter) for s in streams)
        store = app.store
        app.core.stream_full = lambda: store.full

    def fetch(self) -> None:
        fetches = self.app.core.take_stream_fetches()
        for fetch in fetches:
            task = asyncio.get_running_loop().create_task(self._page(fetch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _page(self, fetch: StreamFetch) -> None:
        app = self.app
        read = getattr(app.store, "read_stream")  # noqa: B009 - SqliteStore only
        try:
            rows, end = await read(fetch.stream, fetch.topic_filter, fetch.position,
                                   fetch.after, fetch.until, fetch.limit)
        except StoreError as error:
            log.error("client %s: cannot read stream %r: %s", fetch.client_id, fetch.stream,
                      error)
            handler = app.clients.get(fetch.client_id)
            if handler is not None:
                handler.kick(ReasonCode.UNSPECIFIED_ERROR)
            return
        messages = [Message(0, r.topic, r.payload, r.qos, r.retain, r.properties, r.at,
                            r.expires_at, r.origin, r.offset) for r in rows]
        app.core.stream_page(fetch, messages, end, now=time.time())
        handler = app.clients.get(fetch.client_id)
        if handler is not None:
            handler.pump()
        self.fetch()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
