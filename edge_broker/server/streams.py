"""Replay of named streams for `$stream/` subscriptions: the server's half.

The core never awaits (core/streams.py): it lists the history pages its `$stream/`
subscriptions need (`take_stream_fetches`), and this reads each from the store on the store's
thread, hands the rows back (`stream_page`) and pumps the client's connection, which sends
them under its normal flow control. A subscription has at most one page in flight, and a next
page is asked for while at most `REFILL_AT` (a page) are buffered, so the next read overlaps
the sending and memory per replaying subscription is two pages at most, however long its
history. `fetch()` runs after every commit (the commit pipeline's last step), after every
page, and on the loop turn after sending brought a buffer down to `REFILL_AT`
(`core.stream_refill`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..core.backlog import BacklogFetch
from ..core.streams import StreamFetch
from ..errors import StoreError
from ..mqtt.properties import Properties, expiry_left
from ..mqtt.types import ReasonCode
from ..store.log.log import LogRow
from ..store.log.replay import StreamStats
from .droplog import DropLog

if TYPE_CHECKING:
    from .interface import AdminHost

log = logging.getLogger("edge_broker")




class StreamReplay:
    def __init__(self, app: AdminHost) -> None:
        self.app = app
        self._tasks: set[asyncio.Task[None]] = set()
        self._drop_log = DropLog()  # of core.stats.stream_dropped
        self._giving_way = False  # a tier-2 step of the store budget is running
        self._refill_soon = False  # a fetch() is scheduled for the next loop turn
        self._passed = 0  # log offsets that streams' retention removed before replays read them
        self._passed_log = DropLog()

    def setup(self) -> None:
        """Tell the core the configured streams, when the store keeps a log; and that
        persistent sessions' backlogs are read from it (core/backlog.py)."""
        app = self.app
        app.core.log_backlogs = hasattr(app.store, "read_backlog")
        app.core.stream_refill = self._refill
        if hasattr(app.store, "give_way_backlogs"):
            store_side: Any = app.store
            store_side.on_room_wanted = self._room_wanted
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

    def _refill(self) -> None:
        """The core (`pull`): a replaying subscription's buffer came down to a page; its
        next page is asked for on the next loop turn, once, however many ask meanwhile."""
        if not self._refill_soon:
            self._refill_soon = True
            asyncio.get_running_loop().call_soon(self._refill_now)

    def _refill_now(self) -> None:
        self._refill_soon = False
        self.fetch()

    def _log_drops(self, *, every: bool = False) -> None:
        """`every`: closing (server/droplog.py)."""
        dropped = self.app.core.stats.stream_dropped
        new = self._drop_log.due(dropped, every=every)
        if new:
            log.warning("the store is full: %d QoS 0 message(s) not recorded in streams "
                        "(delivered to subscribers; %d since start)", new, dropped)

    def fetch(self) -> None:
        core = self.app.core
        self._log_drops()
        fetches = core.take_stream_fetches()
        for fetch in fetches:
            task = asyncio.get_running_loop().create_task(self._page(fetch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for backlog_fetch in core.take_backlog_fetches():
            task = asyncio.get_running_loop().create_task(self._backlog_page(backlog_fetch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _room_wanted(self, excess: int) -> None:
        """The store is near `max_store_bytes` and streams could not give way: the core
        names the sessions' backlogs that may (offline, drop-oldest) and the bridges theirs
        (server/bridges.py), largest first; the store moves their cursors; the core counts
        the sessions' drops, a bridge its own (store/log/budget.py, tier 2)."""
        if self._giving_way:
            return
        app = self.app
        # Offline drop-oldest sessions and bridges (drop-oldest by nature), largest first.
        ranked = app.core.backlogs_giving_way() + app.bridges.backlogs_giving_way()
        ranked.sort(key=lambda pair: pair[1], reverse=True)
        readers = [name for name, _ in ranked]
        if not readers:
            return  # nothing can give way: new QoS 1/2 work stays refused
        self._giving_way = True
        task = asyncio.get_running_loop().create_task(self._give_way(readers, excess))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_way(self, readers: list[str], excess: int) -> None:
        app = self.app
        store: Any = app.store
        # Bridges' acknowledged cursors stored first, here, right before the step is queued
        # (acknowledgements may come after `_room_wanted`): it then skips none of their rows.
        app.bridges.store_acked()
        try:
            gave = await store.give_way_backlogs(readers, excess)
        except Exception:  # StoreError, or a bug: the next step asks again
            log.exception("the store budget: backlogs could not give way")
            return
        finally:
            self._giving_way = False
        sessions = False
        for name, offset, count, _, after in gave:
            if not app.bridges.backlog_gave_way(name, offset, count, after):
                app.core.backlog_gave_way(name, offset, count)
                sessions = True
        if sessions:
            await app.commit()  # the sessions' counters (ReaderCounted)

    async def _backlog_page(self, fetch: BacklogFetch) -> None:
        """A page of a persistent session's backlog (core/backlog.py), as `_page`."""
        app = self.app
        read = getattr(app.store, "read_backlog")  # noqa: B009 - SqliteStore only
        page = fetch.page
        try:
            if page is not None and page.rows is not None:  # read for another session
                rows, topics, end = page.rows, page.topics, page.end
            else:
                rows, topics, end = await read(fetch.reader, fetch.filters, fetch.after,
                                               fetch.until, fetch.limit)
        except Exception as error:  # StoreError, or a bug: the client reads it again later
            if isinstance(error, StoreError):
                log.error("client %s: cannot read its queued messages: %s", fetch.client_id,
                          error)
            else:
                log.exception("client %s: reading its queued messages failed",
                              fetch.client_id)
            app.core.backlog_fetch_failed(fetch)  # and the sessions waiting for that page
            handler = app.clients.get(fetch.client_id)
            if handler is not None:  # no gap: the cursor did not move
                handler.kick(ReasonCode.UNSPECIFIED_ERROR)
            return
        woken = app.core.backlog_rows(fetch, rows, topics, end, now=time.time())
        self.fetch()
        for client_id in (fetch.client_id, *woken):
            handler = app.clients.get(client_id)
            if handler is not None:
                handler.pump()

    async def _page(self, fetch: StreamFetch) -> None:
        app = self.app
        read = getattr(app.store, "read_stream")  # noqa: B009 - SqliteStore only
        try:
            rows, topics, end, passed = await read(fetch.stream, fetch.topic_filter,
                                                   fetch.position, fetch.after, fetch.until,
                                                   fetch.limit)
        except Exception as error:  # StoreError, or a bug: the replay cannot go on
            if isinstance(error, StoreError):
                log.error("client %s: cannot read stream %r: %s", fetch.client_id,
                          fetch.stream, error)
            else:
                log.exception("client %s: reading stream %r failed", fetch.client_id,
                              fetch.stream)
            fetch.sub.fetching = False
            handler = app.clients.get(fetch.client_id)
            if handler is not None:  # no gap: the client reconnects and replays again
                handler.kick(ReasonCode.UNSPECIFIED_ERROR)
            return
        if passed:
            self._retention_passed(fetch, passed)
        app.core.stream_rows(fetch, rows, topics, end, now=time.time())
        self.fetch()  # the next page is read while this one is sent
        handler = app.clients.get(fetch.client_id)
        if handler is not None:
            handler.pump()

    def _retention_passed(self, fetch: StreamFetch, passed: int) -> None:
        """The stream's retention (max_bytes, max_age) or the store budget removed rows this
        replay had not read yet: it goes on after them. Logged, not silent: a line every 10 s
        at most, naming the last such replay and counting the log offsets passed since
        start-up."""
        self._passed += passed - fetch.after
        if self._passed_log.due(self._passed):
            log.warning("client %s: its replay of stream %r fell behind what the stream "
                        "keeps (its max_bytes / max_age, or the store budget's early release): "
                        "the log offsets %d-%d were removed before it read them, so it may have "
                        "missed messages there; it goes on from offset %d (%d offsets passed "
                        "by replays since start-up)",
                        fetch.client_id, fetch.stream, fetch.after + 1, passed, passed + 1,
                        self._passed)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._log_drops(every=True)


# -- the admin socket: `edge-broker streams ...` and `edge-broker replay` -----------------

REPLAY_PAGE_MAX = 1000  # rows per `streams.replay` answer (the CLI asks page after page)
REPLAY_PAGE_BYTES = 4 << 20  # and messages' bytes per answer (at least one message)


def stats_json(stats: StreamStats) -> dict[str, Any]:
    return {"name": stats.name, "first_offset": stats.first_offset,
            "last_offset": stats.last_offset, "messages": stats.count, "bytes": stats.bytes,
            "oldest_at": stats.oldest_at, "dropped_for_budget": stats.budget_dropped}


def row_json(row: LogRow) -> dict[str, Any]:
    """One stored message as `edge-broker replay` prints it (NDJSON). Its properties are
    those it was published with, the Message Expiry Interval included (the log keeps it as
    the time it expires)."""
    try:
        payload, encoding = row.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(row.payload).decode("ascii"), "base64"
    moment = datetime.fromtimestamp(row.at, UTC)
    properties = properties_json(row.properties)
    if row.expires_at is not None:
        properties["message_expiry_interval"] = max(0, round(row.expires_at - row.at))
    return {"offset": row.offset,
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "topic": row.topic, "qos": row.qos, "retain": row.retain, "payload": payload,
            "payload_encoding": encoding, "properties": properties}


def properties_json(properties: Properties) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in dataclasses.asdict(properties).items():
        if value is None or value == () or value == []:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")  # correlation data
        elif name == "user_properties":
            value = [list(pair) for pair in value]
        out[name] = value
    return out


async def stream_request(app: AdminHost, command: str, request: dict[str, Any]) -> dict[str, Any]:
    store = app.store
    if not hasattr(store, "read_stream"):
        return {"error": "streams need [storage] persistence = \"sqlite\""}
    sqlite_store: Any = store
    if command == "streams.list":
        return {"streams": [stats_json(s) for s in await sqlite_store.stream_stats()]}
    name = str(request.get("stream"))
    if name not in {s.name for s in app.config.streams}:
        return {"error": f"no stream {name!r}"}
    if command == "streams.show":
        found = [s for s in await sqlite_store.stream_stats() if s.name == name]
        return {"stream": stats_json(found[0])} if found else {"error": f"no stream {name!r}"}
    if command == "streams.delete":
        return {"deleted": await sqlite_store.delete_stream(name)}
    if command in ("streams.replay", "streams.republish"):
        position = request.get("position")
        if not isinstance(position, str | int | float) or isinstance(position, bool):
            return {"error": f"not a replay position: {position!r}"}
        limit = min(int(request.get("limit") or REPLAY_PAGE_MAX), REPLAY_PAGE_MAX)
        topic = request.get("topic")
        until = request.get("until")  # inclusive: the stream's last offset when a CLI began
        if until is not None and (not isinstance(until, int) or isinstance(until, bool)):
            return {"error": f"not an offset: {until!r}"}
        rows = await sqlite_store.replay_stream(name, position, topic if topic else None,
                                                limit, until, REPLAY_PAGE_BYTES)
        if command == "streams.replay":
            return {"rows": [row_json(r) for r in rows]}
        prefix = str(request.get("prefix") or "")
        if not prefix or "+" in prefix or "#" in prefix or prefix.startswith("$"):
            return {"error": f"--republish: not a topic prefix: {prefix!r}"}
        now = time.time()
        expired = 0
        for row in rows:
            properties = row.properties
            if row.expires_at is not None:
                if row.expires_at <= now:  # [MQTT-3.3.2-5] (5.0): not published again
                    expired += 1
                    continue
                properties = dataclasses.replace(  # the interval left [MQTT-3.3.2-6]
                    properties, message_expiry_interval=expiry_left(row.expires_at, now))
            app.core.republish(f"{prefix.rstrip('/')}/{row.topic}", row.payload, row.qos,
                               properties, now=now)
        await app.commit()  # durable (and delivered) before the answer
        return {"republished": len(rows) - expired, "expired": expired,
                "last_offset": rows[-1].offset if rows else None}
    return {"error": f"unknown command {command!r}"}
