"""Bridges inside the broker: start them with it, stop them with it, show how they are doing.

Theory of operation (docs/bridges.md "Inside the broker" is the short form for users).

*Uplink.* Each enabled bridge is a reader of the store's log named `bridge:<name>` whose
filters are its uplink filters (store/log/bridges.py). `setup()` (in `BrokerApp.__init__`)
gives the core those filters (core/downlink.py `set_uplinks`): every message they match is
recorded in the log in the batch that accepted it, QoS 0 included, and a QoS 1/2 message
that only a bridge takes is acknowledged 0x00 after that batch committed. `start()` (after
the store opened) makes or updates the readers and runs one `Forwarder` per bridge
(bridge/forward.py) over a `StoreLogReader` (server/bridge_log.py): pages are read on the
store's thread, the wait for new rows is woken by the store's group commits, and the cursor
is committed only after the remote side acknowledged, so it survives restarts and crashes
(at least once; JetStream and Kafka consumers recognise a resend by its message id
`<gateway_id>-<store_id>-<offset>`). A bridge whose backlog exceeds `max_backlog_bytes` has
its oldest rows skipped (counted in `dropped`, logged at most every 10 s); so has a bridge
whose backlog gives way to the store budget (`[storage] max_store_bytes`: ranked by size with
the offline drop-oldest sessions, store/log/budget.py; `backlogs_giving_way`, `gave_way`).
Retention never deletes a row a bridge has not passed otherwise.

*Downlink.* Messages from the remote side (JetStream durable pull consumer, Kafka consumer
group, MQTT subscriptions) are published locally as the client id `downlink_identity`
(default `bridge-<name>`) with the username `bridge:<name>`, which is what an ACL file names
(`user bridge:central` / `topic write cmd/#`); a message the ACL refuses is acknowledged
remotely, counted (`downlink_denied`) and logged, not published. The remote position goes
into the same batch as the message (a `DownlinkPosition` change), so one transaction stores
both; only then is the remote side acknowledged. After a crash between the two the remote
redelivers: a position not above the stored one is acknowledged and not published again.
MQTT QoS 2: the packet identifier is stored with the message and forgotten at PUBREL; QoS 1
over MQTT is at least once (the protocol gives no position to compare).

*Visibility.* `status()` gives one `BridgeStatus` per bridge (`to_dict()` for the admin
socket command `bridges`), `sys_topics()` the `$SYS/broker/bridges/<name>/...` values and
`families()` the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from ..bridge.base import Backoff, Sink
from ..bridge.config import BridgeConfig, require_extras
from ..bridge.forward import Forwarder
from ..core.downlink import set_uplinks
from ..errors import StoreError
from ..store.log.bridges import READER_PREFIX, reader_name
from .bridge_downlink import DownlinkSide
from .bridge_lane import LaneHub, add_lane_figures
from .bridge_log import OldestRow, StoreLogReader
from .bridge_proc import ProcessForwarder
from .bridge_status import BridgeStatus, bridge_families, bridge_sys_topics
from .droplog import DropLog
from .prometheus import Family

if TYPE_CHECKING:
    from ..bridge.mqtt_upstream import MqttUpstream
    from ..store.log.bridge_store import BridgeStoreSide
    from .app import BrokerApp

log = logging.getLogger("edge_broker.bridges")

NOT_STARTED_NO_SQLITE = ('not started: bridges need [storage] persistence = "sqlite" '
                         "(the uplink is a cursor over the store's log)")
RATE_WINDOW_S = 5.0  # forwarded per second: averaged over at least this long

__all__ = ["Bridge", "BridgeManager", "BridgeStatus"]


class Bridge(DownlinkSide):
    """One configured bridge: its forwarder, its downlink (bridge_downlink.py), its figures
    (bridge_status.py)."""

    def __init__(self, manager: BridgeManager, config: BridgeConfig) -> None:
        self.manager = manager
        self.config = config
        self.status = BridgeStatus(config.name, config.kind, config.enabled)
        self.reader: StoreLogReader | None = None
        self.oldest_row: OldestRow | None = None  # the backlog's oldest, from the store
        self.forwarder: Forwarder | ProcessForwarder | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.username = f"bridge:{config.name}"
        self._mqtt_downlink: asyncio.Task[None] | None = None
        self._last_upstream: MqttUpstream | None = None  # the mqtt kind's last sink
        self._rate_sample = (time.monotonic(), 0)
        self._dropping = False
        self._drop_log = DropLog()
        self._bound_skipped = 0  # rows max_backlog_bytes skipped since start (the log line)
        self.budget_dropped = 0  # rows skipped for the store budget since start (gave_way)
        # What `dropped` shows: rows drops skipped that were not in flight, and those given
        # up since (server/bridge_drops.py); from the store's count at start.
        self.dropped = 0

    # -- start, stop ----------------------------------------------------------------------

    def start(self, side: BridgeStoreSide, cursor: int) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        forwarding = bool(config.uplink) or config.kind == "mqtt"
        stored = side.reader(config.name)
        self.dropped = stored.dropped if stored is not None else 0
        if forwarding and config.separate_process:
            # The uplink in a process of its own (server/bridge_proc.py); the downlink and
            # the backlog bound stay here.
            self.forwarder = ProcessForwarder(
                config, side, path=str(getattr(self.manager.app.store, "path", "")),
                gateway_id=self.manager.gateway_id, store_id=self.manager.store_id,
                cursor=cursor, dropped=self._count_dropped)
            self.forwarder.lanes = self.manager.lanes  # the QoS 0 lane (bridge_lane.py)
            self.tasks.append(loop.create_task(self.forwarder.run(),
                                               name=f"bridge {config.name} uplink process"))
            side.listen(self._check_backlog)
            self._check_backlog(0)
        elif forwarding:
            self.reader = StoreLogReader(side, config.name, config.downlink_identity,
                                         dropped=self._count_dropped)
            backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
            self.forwarder = Forwarder(self._make_sink, self.reader, cursor=cursor,
                                       window=config.window, backoff=backoff,
                                       name=config.name)
            if config.mqtt is not None and config.mqtt.local_state_topic:
                self.forwarder.on_connected = self._state_changed
            self.tasks.append(loop.create_task(self._run_forwarder(self.forwarder),
                                               name=f"bridge {config.name} uplink"))
            side.listen(self._check_backlog)
            self._check_backlog(0)
        if self.forwarder is not None:  # for the status when no page of the uplink says it
            uplink = self.forwarder
            self.oldest_row = OldestRow(side, config.name, lambda: uplink.status.connected)
        if config.downlink and config.kind != "mqtt":
            self.tasks.append(loop.create_task(self._downlink_loop(),
                                               name=f"bridge {config.name} downlink"))

    async def close(self) -> None:
        side = self.manager.side
        if side is not None:
            side.unlisten(self._check_backlog)
        if self.oldest_row is not None:
            self.oldest_row.close()
        process = self.forwarder if isinstance(self.forwarder, ProcessForwarder) else None
        if process is not None:  # first: it closes its remote connection, sends its last ack
            with contextlib.suppress(Exception):
                await process.stop()
        tasks = [t for t in (*self.tasks, self._mqtt_downlink) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.reader is not None:
            # The cursor the remote side acknowledged last, stored before the store closes
            # (after a crash the resend is recognised by its message id instead).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader.flush()
            self.reader.close()
        if process is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await process.flush()
            process.close()
        self._log_drops(every=True)  # those still inside the interval: not left unlogged

    # -- uplink ---------------------------------------------------------------------------

    async def _run_forwarder(self, forwarder: Forwarder) -> None:
        """The forwarder handles remote failures itself; a local one (the store failing to
        read a page or to commit the cursor) is logged and the forwarder starts again from
        its cursor after a backoff delay, instead of the uplink stopping silently."""
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            try:
                await forwarder.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("bridge %s: uplink failed locally", self.config.name)
                self._error(exc, "uplink")
            await asyncio.sleep(backoff.next_delay())

    def _state_changed(self, connected: bool) -> None:
        """The local state topic, at once (as mosquitto's bridge does), not only with the
        next $SYS values: a short outage between two of those would not show."""
        assert self.config.mqtt is not None
        self.status.connected = connected
        self.manager.app.publish_state(self.config.mqtt.local_state_topic,
                                       "1" if connected else "0")

    def _make_sink(self) -> Sink:
        config = self.config
        manager = self.manager
        if config.kind == "jetstream":
            from ..bridge.jetstream import JetStreamSink

            return JetStreamSink(config, gateway_id=manager.gateway_id,
                                 store_id=manager.store_id)
        if config.kind == "kafka":
            from ..bridge.kafka import KafkaSink

            return KafkaSink(config, gateway_id=manager.gateway_id, store_id=manager.store_id)
        from ..bridge.mqtt_upstream import MqttUpstream

        upstream = MqttUpstream(config)
        if self._last_upstream is not None:  # the forwarder's last one, closed: its in-flight
            upstream.resume_from(self._last_upstream)
        self._last_upstream = upstream
        upstream.on_release = lambda packet_id: self._mqtt_released(upstream, packet_id)
        # One connection carries both directions: its downlink is read while it is the
        # forwarder's sink (the next one replaces it after a reconnect).
        if self._mqtt_downlink is not None:
            self._mqtt_downlink.cancel()
        if config.downlink:
            self._mqtt_downlink = asyncio.get_running_loop().create_task(
                self._consume_upstream(upstream), name=f"bridge {config.name} downlink")
        return upstream

    def _check_backlog(self, _offset: int) -> None:
        """After a commit: over `max_backlog_bytes`, skip the oldest rows (one task at once)."""
        limit = self.config.max_backlog_bytes
        side = self.manager.side
        if not limit or self._dropping or side is None:
            return
        reader = side.reader(self.config.name)
        if reader is None or reader.backlog_bytes - self.unstored()[1] <= limit:
            return  # (a cursor acknowledged but not stored yet does not make it drop)
        self._dropping = True
        task = asyncio.get_running_loop().create_task(self._drop(side, limit))
        self.tasks.append(task)
        task.add_done_callback(self._dropped_done)

    def _dropped_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self.tasks.remove(task)

    async def _drop(self, side: BridgeStoreSide, limit: int) -> None:
        try:
            while True:
                # The rows acknowledged so far are passed (forwarded) before the drop,
                # queued after that write, decides which rows to skip (and count as dropped).
                self.store_acked()
                skipped = await side.drop(self.config.name, limit)
                if skipped.count:
                    self._bound_skipped += skipped.count
                    self._settle(skipped.after, skipped.through, skipped.count)
                reader = side.reader(self.config.name)
                if not skipped.count or reader is None or reader.backlog_bytes <= limit:
                    break
        except StoreError as error:
            log.error("bridge %s: cannot drop the oldest of its backlog: %s",
                      self.config.name, error)
        finally:
            self._dropping = False
        self._log_drops()
        self._check_backlog(0)  # appends committed while this ran were not looked at

    def unstored(self) -> tuple[int, int]:
        """(rows, bytes) the remote side acknowledged whose cursor is not stored yet."""
        forwarder = self.forwarder
        return forwarder.unstored if isinstance(forwarder, ProcessForwarder) else (0, 0)

    def store_acked(self) -> None:
        """A separate uplink process's acknowledged cursor: its write queued for the store's
        thread now (bridge_proc.py `store_acked`), ahead of a drop queued next. (In-process,
        server/bridge_log.py queues each cursor write as soon as the one under way ends.)"""
        forwarder = self.forwarder
        if isinstance(forwarder, ProcessForwarder):
            forwarder.store_acked()

    def _count_dropped(self, count: int) -> None:
        self.dropped += count

    def _settle(self, after: int, through: int, count: int) -> None:
        """A drop skipped `count` rows, this bridge's in (after, through]: those the uplink
        holds (in flight) count as dropped only if it gives them up (bridge_drops.py)."""
        forwarder = self.forwarder
        if isinstance(forwarder, ProcessForwarder):
            forwarder.skipped(after, through, count)
        elif self.reader is not None:
            self.reader.skipped(after, through, count)
        else:
            self.dropped += count

    def _log_drops(self, *, every: bool = False) -> None:
        # Drops for the store budget are logged by the store (keeper.py), not here.
        dropped = self._bound_skipped
        new = self._drop_log.due(dropped, every=every)  # `every`: closing
        if new:
            log.warning("bridge %s: backlog over max_backlog_bytes (%d): %d oldest message(s) "
                        "dropped (%d since start)", self.config.name,
                        self.config.max_backlog_bytes, new, dropped)

    def gave_way(self, offset: int, count: int, after: int) -> None:
        """The store budget (store/log/budget.py, tier 2) moved this bridge's reader past its
        `count` oldest rows, from `after` up to `offset`, as a `max_backlog_bytes` drop does
        (`drop_to_bound`: counted in `Reader.dropped`; those in flight only once given up,
        `_settle`); the store logged it. The forwarder's pages start after the reader's
        offset (store/log/bridges.py `page`), and its cursor stays what the remote side
        acknowledged, as after a `max_backlog_bytes` drop: a window in flight with skipped
        rows goes on (it used to be moved past them, and a window failing then was read again
        from there, so its skipped rows were neither given up nor sent). A window read before
        the skip and acknowledged after it does not move the store's cursor back
        (cursors.advance); `bridges status` shows the later of the two cursors."""
        self.budget_dropped += count
        self._settle(after, offset, count)

    # -- figures --------------------------------------------------------------------------

    def refresh(self) -> BridgeStatus:
        status = self.status
        side = self.manager.side
        forwarder = self.forwarder
        if forwarder is not None:
            fs = forwarder.status
            status.connected = fs.connected
            status.cursor = fs.cursor
            status.forwarded = fs.forwarded
            status.expired = fs.expired
            status.refused = fs.refused
            status.unrouted = fs.unrouted
            if fs.last_error_at is not None and (
                    status.last_error_at is None or fs.last_error_at >= status.last_error_at):
                status.last_error = fs.last_error
                status.last_error_at = fs.last_error_at
            status.failures = max(status.failures, fs.failures)
            if isinstance(forwarder, ProcessForwarder):
                status.uplink_process = forwarder.pid
                status.uplink_process_starts = forwarder.starts
        else:
            status.connected = status.downlink_connected
        reader = side.reader(self.config.name) if side is not None else None
        if reader is not None:
            status.cursor = max(status.cursor, reader.offset)
            # Less what the remote side acknowledged meanwhile (stored within 25 ms).
            count, size = self.unstored()
            status.backlog_messages = max(0, reader.backlog_count - count)
            status.backlog_bytes = max(0, reader.backlog_bytes - size)
        status.dropped = self.dropped
        if reader is not None and isinstance(forwarder, ProcessForwarder):
            add_lane_figures(status, forwarder)
        oldest = (self.reader.oldest_at if self.reader is not None
                  else forwarder.oldest_at if isinstance(forwarder, ProcessForwarder)
                  else None)
        if self.oldest_row is not None:  # the store's first row after the cursor is older
            oldest = self.oldest_row.oldest_at(oldest)
        status.backlog_oldest_age_s = (max(0.0, time.time() - oldest)
                                       if oldest is not None and status.backlog_messages
                                       else 0.0)
        now = time.monotonic()
        then, count = self._rate_sample
        if now - then >= RATE_WINDOW_S:
            status.forwarded_per_s = (status.forwarded - count) / (now - then)
            self._rate_sample = (now, status.forwarded)
        self._log_drops()
        return status


class BridgeManager:
    """Every configured bridge of a broker (see the module docstring)."""

    def __init__(self, app: BrokerApp) -> None:
        self.app = app
        self.configs = app.config.bridges
        self.gateway_id = app.config.broker.gateway_id
        self.store_id = ""
        self.side: BridgeStoreSide | None = None
        self.bridges: dict[str, Bridge] = {c.name: Bridge(self, c) for c in self.configs}
        # (bridge, source) -> the last remote position published locally
        self.positions: dict[tuple[str, str], int] = {}
        self.lanes: LaneHub | None = None  # the QoS 0 lanes of separate_process bridges

    def setup(self) -> None:
        """Tell the core the uplink filters of the enabled bridges (BrokerApp.__init__)."""
        enabled = [c for c in self.configs if c.enabled]
        if not enabled:
            return
        if getattr(self.app.store, "bridges", None) is None:
            log.warning("[[bridges]] need [storage] persistence = \"sqlite\": %d bridge(s) "
                        "not started", len(enabled))
            for config in enabled:  # `bridges status` says why, not "(connecting)"
                status = self.bridges[config.name].status
                status.last_error = NOT_STARTED_NO_SQLITE
                status.last_error_at = time.time()
            return
        set_uplinks(self.app.core, [(reader_name(c.name), c.uplink) for c in enabled])
        store = self.app.store
        self.app.core.stream_full = lambda: store.full  # QoS 0: not recorded, counted

    async def start(self) -> None:
        """After the store opened: import the extras, make the readers, start the bridges."""
        app = self.app
        enabled = [c for c in self.configs if c.enabled]
        side: BridgeStoreSide | None = getattr(app.store, "bridges", None)
        if side is None:
            return
        # One line naming the `pip install` when nats-py / aiokafka is missing.
        require_extras(self.configs, file=app.config.source)
        self.side = side
        self.store_id = side.store_id
        cursors = await side.setup([(c.name, c.uplink) for c in enabled])
        self.positions = await side.positions()
        if any(c.separate_process for c in enabled):
            self.lanes = LaneHub(app.core, asyncio.get_running_loop())
        for config in enabled:
            self.bridges[config.name].start(side, cursors[config.name])
            log.info("bridge %s (%s) started: cursor %d, servers %s", config.name, config.kind,
                     cursors[config.name], ", ".join(config.servers))

    async def close(self) -> None:
        for bridge in self.bridges.values():
            await bridge.close()

    # -- the store budget (store/log/budget.py, tier 2) -----------------------------------

    def backlogs_giving_way(self) -> list[tuple[str, int]]:
        """The readers of the running bridges whose oldest rows may give way to
        `max_store_bytes`, with their backlog bytes: every bridge with a backlog (a bridge's
        policy is drop-oldest, as for `max_backlog_bytes`). Rows acknowledged whose cursor
        is not stored yet do not count as backlog here; the caller has their writes queued
        (`store_acked`) right before it queues the step, so the step skips none of them."""
        side = self.side
        out: list[tuple[str, int]] = []
        if side is None:
            return out
        for name, bridge in self.bridges.items():
            reader = side.reader(name) if bridge.forwarder is not None else None
            if reader is None:
                continue
            backlog = reader.backlog_bytes - bridge.unstored()[1]
            if backlog > 0:
                out.append((reader_name(name), backlog))
        return out

    def store_acked(self) -> None:
        """Every bridge's acknowledged cursor not stored yet: its write queued now
        (`Bridge.store_acked`), ahead of a store budget step queued next."""
        for bridge in self.bridges.values():
            bridge.store_acked()

    def backlog_gave_way(self, reader: str, offset: int, count: int, after: int) -> bool:
        """After the store moved `reader` past its oldest rows for the budget: False when it
        is not a bridge's (a session's: the core counts those)."""
        if not reader.startswith(READER_PREFIX):
            return False
        bridge = self.bridges.get(reader[len(READER_PREFIX):])
        if bridge is not None:
            bridge.gave_way(offset, count, after)
        return True

    @property
    def budget_dropped(self) -> int:
        """Rows bridges skipped for the store budget since start (in `dropped` too, but
        those that were in flight and then acknowledged: bridge_drops.py)."""
        return sum(bridge.budget_dropped for bridge in self.bridges.values())

    # -- figures --------------------------------------------------------------------------

    def status(self) -> list[BridgeStatus]:
        return [bridge.refresh() for bridge in self.bridges.values()]

    def to_dict(self) -> dict[str, Any]:
        """The admin socket's `bridges` answer (what `edge-broker bridges status` shows)."""
        return {"gateway_id": self.gateway_id, "store_id": self.store_id,
                "bridges": [s.to_dict() for s in self.status()]}

    def sys_topics(self) -> dict[str, str]:
        """$SYS/broker/bridges/<name>/... (retained, published with the other $SYS values)."""
        return bridge_sys_topics([b.config for b in self.bridges.values()], self.status())

    def families(self) -> list[Family]:
        return bridge_families(self.status())
