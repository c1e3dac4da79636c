"""The composition root: builds the broker from a Config, runs it, stops it.

`BrokerApp` owns the core, the store, the listeners and the registry of connected clients,
and runs the commit pipeline every connection shares (`finish_batch`): drain the core's
changes, let the store commit them, then send the acknowledgements and wake the clients that
have deliveries. Running it as a process (signals, systemd, the event loop) is
server/run.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..config import Config
from ..core.broker import BrokerCore, ConnectResult, CoreSettings
from ..core.changes import Change, LogAppended, Snapshot
from ..core.queues import DROP_LOG_INTERVAL_S
from ..dist import installed_version
from ..errors import EdgeBrokerError, StoreDamagedError, StoreError
from ..mqtt.packets import Connect, Packet, Publish, Will
from ..mqtt.types import ReasonCode
from ..store.base import DONE, SessionStore
from ..store.memory import NullStore
from .admin import AdminServer, DataDirLock
from .client import ClientHandler
from .client_close import how_it_ended
from .gate import Gate
from .http import HttpServer
from .metrics import Metrics, SysLoad, heap_topics, load_counts, sys_topics
from .observe import Observer, build_http_server, prepare_data_dir
from .streams import StreamReplay

log = logging.getLogger("edge_broker")

SHUTDOWN_GRACE_S = 1.0  # how long stop() waits for clients to take their DISCONNECT


def broker_version() -> str:
    # not importlib.metadata: its import is a tenth of the start-up (edge_broker/dist.py)
    return installed_version() or "0+unknown"  # None: a checkout that was not installed


def uuid4_text() -> str:
    """A random (version 4) UUID as text, as `str(uuid.uuid4())`, without importing `uuid`
    at start-up (it loads `platform` and `_uuid` for the other UUID versions)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def core_settings(config: Config) -> CoreSettings:
    mqtt = config.mqtt
    return CoreSettings(
        max_inflight_messages=mqtt.max_inflight_messages,
        max_queued_messages=mqtt.max_queued_messages,
        max_queued_bytes=mqtt.max_queued_bytes,
        max_queued_memory_bytes=mqtt.max_queued_memory_bytes,
        queue_full_policy=mqtt.queue_full_policy,
        queue_qos0_messages=mqtt.queue_qos0_messages,
        max_qos=mqtt.max_qos,
        retain_available=mqtt.retain_available,
        persistent_client_expiration=mqtt.persistent_client_expiration_s,
        max_session_expiry_interval=mqtt.max_session_expiry_interval_s,
    )


STORE_FILE = "edge-broker.db"
# Batches of only QoS 0 log records (`_submit`) the store may hold before they are waited for.
MAX_UNAWAITED_QOS0 = 16


def _only_qos0_appends(changes: list[Change]) -> bool:
    return all(type(change) is LogAppended and not change.message.qos for change in changes)


def store_path(config: Config) -> Path:
    return Path(config.broker.data_dir) / STORE_FILE


def build_store(config: Config) -> SessionStore:
    storage = config.storage
    if storage.persistence == "memory":
        return NullStore()
    from ..store.sqlite import SqliteStore  # the only importer of aiosqlite

    return SqliteStore(store_path(config), durability=storage.durability,
                       max_store_bytes=storage.max_store_bytes, streams=config.streams)


class BrokerApp:
    def __init__(self, config: Config, store: SessionStore | None = None, *,
                 recover: bool = False) -> None:
        self.config = config
        self.recover = recover  # move a damaged store aside instead of refusing to start
        self.core = BrokerCore(core_settings(config))
        self.store = store if store is not None else build_store(config)
        self.metrics = Metrics()
        self.gate = Gate(self)  # authentication, ACL, quotas (files read in start())
        self.core.will_check = self.gate.will_allowed
        self.clients: dict[str, ClientHandler] = {}  # connected client id -> its connection
        self.connections: set[ClientHandler] = set()  # every open connection
        # id(packet) -> (packet, bytes) per protocol level, for QoS 0 fan-out (client.pump)
        self.qos0_encodings: dict[int, dict[int, tuple[Publish, bytes]]] = {3: {}, 4: {}, 5: {}}
        self.servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []  # bound (host, port) per listener
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._drop_timer: asyncio.TimerHandle | None = None
        self._tick_at: float | None = None  # wall-clock time the tick handle fires
        self._sys_handle: asyncio.TimerHandle | None = None
        self._sys_last: dict[str, str] = {}
        self._sys_load: SysLoad | None = None  # made at the first $SYS publication
        self._version = broker_version()
        self._stopped = False
        self._all_closed: asyncio.Event | None = None
        self._full_logged = False  # a "store full" warning was logged for this episode
        # Batches with changes the store has not committed yet, oldest first (the store
        # resolves them in order), and the number of the last batch drained from the core.
        self._pending: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._unawaited = 0  # batches of only QoS 0 log records in the store's queue
        self._drained = 0
        self.incomplete_bytes = 0  # bytes buffered in all connections for unhandled packets
        self._lock = DataDirLock(config.broker.data_dir)
        self._admin = AdminServer(self, config.broker.data_dir)
        self.observer = Observer(self)
        self.http: HttpServer | None = None
        self.http_address: tuple[str, int] | None = None
        self.streams = StreamReplay(self)  # named streams: history pages for $stream/ subs
        self.streams.setup()
        from .bridges import BridgeManager  # here: keeps the import block to its owners

        self.bridges = BridgeManager(self)  # [[bridges]]: uplink readers, downlink (bridges.py)
        self.bridges.setup()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "BrokerApp.start() first"
        return self._loop

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        prepare_data_dir(self.config)
        self._lock.acquire()
        failed: BaseException | None = None
        try:
            self.gate.load()
            await self._open_store()
            await self.bridges.start()  # readers before listeners: no message escapes them
            await self._admin.start()
            await self._listen()
            await self._start_http()
        except BaseException as exc:
            failed = exc
        if failed is not None:
            # Undone after the `except`, not in it: compiled, an `await` in a handler leaves
            # the exception behind as the thread's "handled" one (docs/compiled.md).
            await self.bridges.close()
            await self._close_servers()
            if self.http is not None:
                await self.http.close()
            await self._admin.close()
            await self.store.close()
            self.gate.close()
            self._lock.release()
            raise failed
        self.observer.start()
        self._run_tick()
        if self.config.broker.sys_interval_s:
            self._publish_sys()
        log.info("edge-broker %s started (persistence=%s, %d stored sessions)", self._version,
                 self.config.storage.persistence, len(self.core.sessions))

    async def _start_http(self) -> None:
        http = self.config.http
        if http.port is None:
            return
        self.http = build_http_server(self.observer)
        try:
            host, port = await self.http.start(http.host, http.port)
        except OSError as error:
            raise EdgeBrokerError(
                f"cannot listen for HTTP on {http.host}:{http.port}: {error.strerror}"
            ) from None
        self.http_address = (host, port)
        log.info("HTTP on %s:%d (/metrics, /healthz, status page at /)", host, port)

    async def _listen(self) -> None:
        """Open every [[listeners]] entry (server/listeners.py): self.servers gets one server
        per listener, self.addresses every bound (host, port); self.listeners answers which
        listener a connection came through and reloads TLS files."""
        from .listeners import open_listeners

        self.listeners = await open_listeners(self)

    async def _open_store(self) -> None:
        started = time.monotonic()
        snapshot: Snapshot | None = None
        try:
            snapshot = await self.store.open()
        except StoreError as error:
            path = getattr(self.store, "path", None)
            # Only a damaged file is moved aside: one that cannot be opened for another
            # reason (disk full, I/O error, permissions, a newer schema) is kept as it is.
            if not self.recover or path is None or not isinstance(error, StoreDamagedError):
                raise
            from ..store.sqlite import SqliteStore

            moved = SqliteStore.move_aside(path)
            log.warning("%s; moved it aside to %s and starting with an empty store (--recover)",
                        error, moved)
        if snapshot is None:  # opened again after the `except`, not in it (see `start`)
            snapshot = await self.store.open()
        self.core.restore(snapshot, now=time.time())
        if snapshot.sessions or snapshot.retained:
            queued = len(snapshot.deliveries) + sum(  # delivery rows, and the log's backlogs
                r.backlog_count for r in snapshot.readers.values())
            log.info("restored %d sessions, %d queued messages, %d retained messages in %.2f s",
                     len(snapshot.sessions), queued, len(snapshot.retained),
                     time.monotonic() - started)

    def note_refused_for_full_store(self, client_id: str) -> None:
        """Count a QoS 1/2 PUBLISH refused because the store is full; log once per episode."""
        self.metrics.refused_store_full += 1
        if not self._full_logged:
            self._full_logged = True
            log.warning("the store is full (max_store_bytes or the disk): refusing new QoS 1/2 "
                        "messages (first from %s; MQTT 5 clients get 0x97, 3.1.1 clients get "
                        "no acknowledgement) until space returns", client_id)

    def log_status(self) -> None:
        """SIGUSR1: one line with what the broker holds, for an operator on the box."""
        core = self.core
        sessions = core.sessions.values()
        queued = sum(s.queued_count + len(s.inflight) + s.backlog_count for s in sessions)
        log.info("status: %d clients connected, %d sessions, %d queued messages, "
                 "%d retained, store %s", core.stats.clients_connected, len(core.sessions),
                 queued, len(core.retained), "FULL" if self.store.full else "ok")

    def note_buffered(self, delta: int) -> None:
        """A connection's unhandled input grew or shrank by `delta` bytes. Beyond
        `[mqtt] max_incomplete_bytes` for all connections together, the connections holding
        the most are closed (MQTT 5: DISCONNECT 0x97 Quota exceeded, 3.1.1: a bare close)
        until the total is within the bound again."""
        self.incomplete_bytes += delta
        limit = self.config.mqtt.max_incomplete_bytes
        if delta <= 0 or not limit:
            return
        while self.incomplete_bytes > limit:
            victim = max(self.connections, key=_buffered_bytes, default=None)
            if victim is None or not victim.buffered_bytes:
                return
            log.warning("closing %s (%s): %d bytes of unfinished packets, %d for all clients "
                        "above max_incomplete_bytes (%d)", victim.client_id or "client",
                        victim.peer, victim.buffered_bytes, self.incomplete_bytes, limit)
            victim.kick(ReasonCode.QUOTA_EXCEEDED)  # 0x97, 3.14.2.1 (5.0)

    async def commit(self) -> None:
        """Commit what the core changed and wait until it is durable (admin requests)."""
        future = self._submit()
        if future is None and self._pending:
            future = self._pending[-1][1]
        if future is not None:
            await future
        self._committed(None, [], False)

    async def store_stats(self) -> dict[str, object]:
        """Sessions and queues as the core sees them, plus the store's own figures."""
        core = self.core
        sessions = core.sessions.values()
        stats: dict[str, object] = {
            "persistence": self.config.storage.persistence,
            "sessions": len(core.sessions),
            "connected": core.stats.clients_connected,
            "queued_messages": sum(s.queued_count + len(s.inflight) + s.backlog_count
                                   for s in sessions),
            "queued_bytes": sum(s.queued_bytes + s.backlog_bytes for s in sessions),
            "retained_messages": len(core.retained),
            "oldest_message_at": min(
                (d.message.received_at for s in sessions
                 for d in (*s.inflight.values(), *s.queue)), default=None),
        }
        store_stats = getattr(self.store, "stats", None)
        if store_stats is not None:
            figures = await store_stats()
            stats["store"] = dataclasses.asdict(figures)
            oldest = figures.oldest_message_at  # the log's backlogs too
            mine = stats["oldest_message_at"]
            if oldest is not None and (not isinstance(mine, float) or oldest < mine):
                stats["oldest_message_at"] = oldest
            stats["path"] = str(getattr(self.store, "path", ""))
        return stats

    async def stop(self) -> None:
        """Stop accepting, tell every client (v5: DISCONNECT 0x8B), commit, close the store."""
        if self._stopped:
            return
        self._stopped = True
        for handle in (self._tick_handle, self._sys_handle, self._drop_timer):
            if handle is not None:
                handle.cancel()
        for server in self.servers:
            server.close()
        # Clients with a will first, and their wills delivered to the clients still
        # connected before those are told (as mosquitto does); then the rest.
        with_will: list[ClientHandler] = []
        others: list[ClientHandler] = []
        for handler in self.connections:
            (others if self._will_of(handler) is None else with_will).append(handler)
        for handler in with_will:
            handler.kick(ReasonCode.SERVER_SHUTTING_DOWN, linger=False)
        if with_will:
            delivered = asyncio.Event()
            if not self.commit_now_or_later(delivered.set):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(delivered.wait(), SHUTDOWN_GRACE_S)
        for handler in others:
            handler.kick(ReasonCode.SERVER_SHUTTING_DOWN, linger=False)
        self.finish_batch(None, [])
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), SHUTDOWN_GRACE_S)
        for handler in list(self.connections):
            if handler.transport is not None:
                handler.transport.abort()
        await self._close_servers()
        await self.observer.close()
        if self.http is not None:
            await self.http.close()
        await self._admin.close()
        await self.streams.close()
        await self.bridges.close()
        # Drops still inside their log interval (those of the wills of connections aborted
        # above included: their connection_lost ran during the awaits): not left unlogged.
        self._log_drops(every=True)
        await self.store.close()
        self.gate.close()
        self._lock.release()
        log.info("edge-broker stopped")

    def _will_of(self, handler: ClientHandler) -> Will | None:
        """The will of this connection's session (None: none, or no session of its own)."""
        session = self.core.sessions.get(handler.client_id or "")
        return session.will if session is not None and session.epoch == handler.epoch \
            else None

    async def _close_servers(self) -> None:
        for server in self.servers:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.5)

    def connection_closed(self, handler: ClientHandler) -> None:
        self.connections.discard(handler)
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    # -- sessions -------------------------------------------------------------------------

    def new_client_id(self) -> str:
        return f"{self.config.mqtt.auto_id_prefix}{uuid4_text()}"

    def attach(self, handler: ClientHandler, packet: Connect, client_id: str,
               receive_maximum: int, now: float, username: str | None = None) -> ConnectResult:
        result = self.core.connect(packet, client_id=client_id, now=now,
                                   receive_maximum=receive_maximum, username=username)
        old = self.clients.get(client_id)
        if old is not None and old is not handler:
            log.info("client %s: session taken over by a new connection from %s", client_id,
                     handler.peer)
            old.taken_over()  # [MQTT-3.1.4-3] (5.0)
        self.clients[client_id] = handler
        return result

    def detach(self, handler: ClientHandler, *, reason_code: int | None,
               session_expiry_interval: int | None) -> None:
        client_id = handler.client_id
        if client_id is None:
            return
        if self.clients.get(client_id) is handler:
            del self.clients[client_id]
            log.info("%s", how_it_ended(client_id, reason_code, self._will_of(handler)))
        self.core.disconnect(client_id, handler.epoch, now=time.time(), reason_code=reason_code,
                             session_expiry_interval=session_expiry_interval)
        self._reschedule_tick()

    # -- the commit pipeline ----------------------------------------------------------------

    def _submit(self) -> asyncio.Future[None] | None:
        """Drain the core's changes into the store. Returns the future to wait for, or None
        when this batch needs nothing from the store (no changes, or a store that promises
        no durability answered DONE).

        An empty batch does not wait for other clients' pending commits: its replies
        acknowledge nothing that is stored, and its deliveries are still held by the commit
        watermark (`_watermark`) until every batch before them is durable.
        """
        batch = self.core.drain()
        self._drained = batch.number
        if not batch.changes:
            return None
        waiter = self.store.apply(batch.changes)
        if waiter is DONE:
            return None
        future = asyncio.ensure_future(waiter)
        if self._unawaited < MAX_UNAWAITED_QOS0 and _only_qos0_appends(batch.changes):
            # Only QoS 0 messages recorded in the log (for a bridge or a stream): nothing
            # acknowledged depends on them and no delivery needs them durable, so neither the
            # publisher nor the subscribers wait for this commit (bounded: beyond
            # MAX_UNAWAITED_QOS0 such batches in the store's queue, they wait as any other).
            # The batch still holds the watermark (log readers - streams, backlogs, bridges -
            # read only what is committed); only its deliveries go out at once.
            self._unawaited += 1
            self.core.free(batch.number)
            self._pending.append((batch.number, future))
            future.add_done_callback(partial(self._store_done, self.loop.time()))
            future.add_done_callback(self._unawaited_done)
            return None
        self._pending.append((batch.number, future))
        # Registered first, so it runs before the callbacks waiting for this batch.
        future.add_done_callback(partial(self._store_done, self.loop.time()))
        return future

    def _unawaited_done(self, future: asyncio.Future[None]) -> None:
        self._unawaited -= 1
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("store commit of QoS 0 log records failed: %s", future.exception())
            return
        self._committed(None, [], False)  # readers of the log may read what it recorded

    def _store_done(self, submitted_at: float, _future: asyncio.Future[None]) -> None:
        self.observer.commit_observed(self.loop.time() - submitted_at)
        pending = self._pending
        while pending and pending[0][1].done():
            future = pending[0][1]
            if not future.cancelled() and future.exception() is not None:
                return  # a failed batch holds the watermark: what follows it is not durable
            pending.popleft()

    def _watermark(self) -> int:
        """The highest batch number such that it and every batch before it are durable."""
        if self._pending:
            return self._pending[0][0] - 1
        return self._drained

    def finish_batch(self, handler: ClientHandler | None, replies: list[Packet | int], *,
                     close: bool = False) -> None:
        """Commit what the core changed; once durable, send `replies` to `handler` (then close
        it if `close`) and wake the clients that have deliveries.

        A handler's own batches complete in order: a batch that needs no storage is answered
        at once unless the same handler still waits for a commit, then it goes behind that one
        (its replies keep their order). It never waits for other clients' commits.
        """
        if self.core.has_unlogged_drops:
            self._log_drops()
        future = self._submit()
        if handler is not None and future is None and handler.commits_pending:
            future = handler.last_commit
        if future is None:
            self._committed(handler, replies, close)
            return
        if handler is not None:
            handler.commit_started(future)
        future.add_done_callback(partial(self._after_commit, handler, replies, close))

    def commit_now_or_later(self, then: Callable[[], None]) -> bool:
        """Commit pending changes. True when they need no waiting; otherwise `then` runs
        once they are durable, and False is returned."""
        future = self._submit()
        if future is None:
            self._committed(None, [], False)
            return True
        future.add_done_callback(partial(self._after_commit_then, then))
        return False

    def _after_commit(self, handler: ClientHandler | None, replies: list[Packet | int],
                      close: bool, future: asyncio.Future[None]) -> None:
        if handler is not None:
            handler.commit_finished()
        if self._commit_failed(future, handler):
            return
        self._committed(handler, replies, close)
        if handler is not None:
            handler.resume_after_commit()

    def _after_commit_then(self, then: Callable[[], None], future: asyncio.Future[None]) -> None:
        if self._commit_failed(future, None):
            return
        self._committed(None, [], False)
        then()

    def _commit_failed(self, future: asyncio.Future[None], handler: ClientHandler | None) -> bool:
        error = future.exception()
        if error is None:
            return False
        log.error("store commit failed: %s", error)
        if handler is not None:
            handler.kick(ReasonCode.UNSPECIFIED_ERROR)  # no acknowledgement without durability
        return True

    def _committed(self, handler: ClientHandler | None, replies: list[Packet | int],
                   close: bool) -> None:
        woken = self.core.committed(self._watermark())
        if self._full_logged and not self.store.full:
            self._full_logged = False
            log.warning("the store has room again: accepting QoS 1/2 messages")
        if handler is not None:
            handler.write_replies(replies, close=close)
            handler.pump()
        clients = self.clients
        for client_id in woken:
            other = clients.get(client_id)
            if other is not None and other is not handler:
                other.pump()
        self.streams.fetch()

    # -- timers -----------------------------------------------------------------------------

    def _log_drops(self, *, every: bool = False) -> None:
        """Log the queue drops (rate-limited per session by the core) whatever caused them: a
        client's PUBLISH, a will, $SYS, the memory bound. Drops still inside a session's
        interval are logged by a timer at its end, so none waits for the next publish, and
        all of them when the broker stops (`every`)."""
        self._drop_timer = None
        core = self.core
        for client_id, count in core.take_drop_reports(time.time(), every=every):
            log.warning("queue of client %r full: %d message(s) dropped (queue_full_policy "
                        "%s)", client_id, count, core.settings.queue_full_policy)
        if core.has_unlogged_drops and self._drop_timer is None and not self._stopped:
            self._drop_timer = self.loop.call_later(DROP_LOG_INTERVAL_S, self._log_drops)

    def _run_tick(self) -> None:
        self._tick_handle = None
        self._tick_at = None
        deadline = self.core.tick(time.time())
        self.finish_batch(None, [])
        if deadline is not None and not self._stopped:
            self._tick_handle = self.loop.call_later(max(0.0, deadline - time.time()),
                                                     self._run_tick)
            self._tick_at = deadline

    def _reschedule_tick(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is None or self._stopped or self._loop is None:
            return
        if self._tick_at is not None and self._tick_at <= deadline:
            return
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._tick_handle = self.loop.call_later(max(0.0, deadline - time.time()),
                                                 self._run_tick)
        self._tick_at = deadline

    def publish_state(self, topic: str, value: str) -> None:
        """A retained state value (a bridge's local state topic) published now, not at the
        next $SYS round; that round repeats it only if it changed again."""
        self.core.publish_internal(topic, value.encode(), now=time.time(), retain=True)
        if topic in self._sys_last:
            self._sys_last[topic] = value
        self.finish_batch(None, [])

    def _publish_sys(self) -> None:
        """Publish the $SYS/broker values that changed since last time (retained, QoS 0)."""
        self._sys_handle = None
        now = time.time()
        values = sys_topics(self.core, self.metrics, version=self._version,
                            uptime_s=now - self.started_at)
        counts = load_counts(self.core, self.metrics)
        elapsed = time.monotonic()  # not the wall clock: NTP may set it on a gateway's boot
        if self._sys_load is None:  # from the start: every count began at 0
            self._sys_load = SysLoad((0,) * len(counts), self._started_monotonic)
        values.update(self._sys_load.topics(counts, elapsed))
        values.update(heap_topics())
        values.update(self.bridges.sys_topics())
        for topic, value in values.items():
            if self._sys_last.get(topic) != value:
                self.core.publish_internal(topic, value.encode(), now=now, retain=True)
        self._sys_last = values
        self.finish_batch(None, [])
        if not self._stopped:
            self._sys_handle = self.loop.call_later(self.config.broker.sys_interval_s,
                                                    self._publish_sys)


def _buffered_bytes(handler: ClientHandler) -> int:
    return handler.buffered_bytes
