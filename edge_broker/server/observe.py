"""What an operator sees: Prometheus families, the status page's JSON, health, history.

`Observer` belongs to the `BrokerApp` and reads its core, metrics and store; it keeps only
what no other part keeps: the commit latency histogram, the time of the store's last answer
(`/healthz` and the systemd watchdog use it) and one hour of throughput and queue-depth
samples for the status page's charts (one every `HISTORY_STEP_S`, 360 at most).

Health: the broker is healthy while its event loop turns (this code runs on it, so an
answer at all says so) and the store's writer answered a ping within `STORE_STALE_S`. A full
store is healthy: it is a state the broker reports and survives, and a health failure would
make systemd restart a broker that is doing the right thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import resource
import stat
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config, is_loopback_host
from ..errors import ConfigError, StoreError
from . import systemd
from .http import HttpServer, Response
from .prometheus import CONTENT_TYPE, Family, Histogram, render
from .streams import stats_json

if TYPE_CHECKING:
    from .app import BrokerApp

HISTORY_STEP_S = 10.0
HISTORY_POINTS = 360  # one hour
STORE_PING_EVERY_S = 2.0
STORE_STALE_S = 10.0  # no answer from the store's writer for this long: unhealthy
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Observer:
    def __init__(self, app: BrokerApp) -> None:
        self.app = app
        self.commit_latency = Histogram(COMMIT_BUCKETS_S)
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY_POINTS)
        self.store_answered_at = time.monotonic()
        self._last_sample: tuple[float, int, int] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- background -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._ping_store()),
                       asyncio.ensure_future(self._sample())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _ping_store(self) -> None:
        ping = getattr(self.app.store, "ping", None)
        while True:
            if ping is not None:
                await ping()
            self.store_answered_at = time.monotonic()
            await asyncio.sleep(STORE_PING_EVERY_S)

    async def _sample(self) -> None:
        while True:
            self.take_sample()
            await asyncio.sleep(HISTORY_STEP_S)

    def take_sample(self) -> dict[str, float]:
        core = self.app.core
        now = time.time()
        received = core.stats.publish_received
        sent = core.stats.publish_sent
        rate_in = rate_out = 0.0
        if self._last_sample is not None:
            then, last_received, last_sent = self._last_sample
            span = max(now - then, 1e-6)
            rate_in = (received - last_received) / span
            rate_out = (sent - last_sent) / span
        self._last_sample = (now, received, sent)
        queued, _ = self._queued()
        point = {"time": now, "in_per_s": rate_in, "out_per_s": rate_out, "queued": queued,
                 "clients": core.stats.clients_connected}
        self.history.append(point)
        return point

    def commit_observed(self, seconds: float) -> None:
        self.commit_latency.observe(seconds)

    # -- health ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        store = self.app.store
        silent_s = time.monotonic() - self.store_answered_at
        healthy = silent_s < STORE_STALE_S
        return healthy, {
            "healthy": healthy,
            "event_loop": "turning",
            "store_answered_s_ago": round(silent_s, 3),
            "store_full": bool(store.full),
        }

    # -- figures --------------------------------------------------------------------------

    def _queued(self) -> tuple[int, int]:
        messages = bytes_ = 0
        for session in self.app.core.sessions.values():
            messages += session.queued_count + len(session.inflight) + session.backlog_count
            bytes_ += session.queued_bytes + session.backlog_bytes
        return messages, bytes_

    def _oldest_queued_age(self, now: float) -> float:
        oldest = None
        for session in self.app.core.sessions.values():
            queue = session.queue
            if queue:
                at = queue[0].message.received_at
                if oldest is None or at < oldest:
                    oldest = at
        return max(0.0, now - oldest) if oldest is not None else 0.0

    def _store_counters(self) -> dict[str, Any]:
        store = self.app.store
        names = ("commits", "batches", "fsyncs", "rows_written", "vacuum_steps",
                 "budget_stream_rows")
        counters = {name: getattr(store, name, None) for name in names}
        used = getattr(store, "used_bytes", None)
        counters["used_bytes"] = used
        path = getattr(store, "path", None)
        file_bytes = None
        if path is not None:
            file_bytes = 0
            for suffix in ("", "-wal"):
                with contextlib.suppress(OSError):
                    file_bytes += os.stat(f"{path}{suffix}").st_size
        counters["file_bytes"] = file_bytes
        return counters

    def families(self) -> list[Family]:
        app = self.app
        core = app.core
        stats = core.stats
        metrics = app.metrics
        now = time.time()
        queued, queued_bytes = self._queued()
        families = [
            Family("edge_broker_up", "gauge", "1 while the broker serves.").add(1),
            Family("edge_broker_start_time_seconds", "gauge",
                   "Unix time the broker started.").add(app.started_at),
            Family("edge_broker_connections", "gauge",
                   "Open network connections.").add(len(app.connections)),
            Family("edge_broker_clients_connected", "gauge",
                   "Clients with a session attached.").add(stats.clients_connected),
            Family("edge_broker_sessions", "gauge",
                   "Sessions, connected or not.").add(len(core.sessions)),
            Family("edge_broker_subscriptions", "gauge",
                   "Subscriptions.").add(core.router.count),
            Family("edge_broker_retained_messages", "gauge",
                   "Retained messages.").add(len(core.retained)),
            Family("edge_broker_publish_received_total", "counter",
                   "PUBLISH packets accepted from clients.").add(stats.publish_received),
            Family("edge_broker_publish_sent_total", "counter",
                   "PUBLISH packets sent to clients, resends included.").add(stats.publish_sent),
            Family("edge_broker_packets_received_total", "counter",
                   "MQTT packets received.").add(metrics.packets_received),
            Family("edge_broker_packets_sent_total", "counter",
                   "MQTT packets sent.").add(metrics.packets_sent),
            Family("edge_broker_received_bytes_total", "counter",
                   "Bytes received from clients.").add(metrics.bytes_received),
            Family("edge_broker_sent_bytes_total", "counter",
                   "Bytes sent to clients.").add(metrics.bytes_sent),
            self._drops(),
            Family("edge_broker_publish_refused_total", "counter",
                   "QoS 1/2 PUBLISH refused (0x97 or no acknowledgement), by reason.")
            .add(metrics.refused_store_full, reason="store_full")
            .add(stats.refused_queue_full, reason="queue_full"),
            Family("edge_broker_queued_memory_bytes", "gauge",
                   "Estimated memory held by all queues (max_queued_memory_bytes bounds it).")
            .add(core.memory.used),
            Family("edge_broker_protocol_errors_total", "counter",
                   "Connections closed for breaking the protocol.").add(
                       metrics.protocol_errors),
            Family("edge_broker_throttled_seconds_total", "counter",
                   "Seconds clients spent throttled by their publish quota ([quotas]).").add(
                       metrics.throttled_s),
            self._security(),
            Family("edge_broker_queued_messages", "gauge",
                   "Messages queued or in flight for sessions.").add(queued),
            Family("edge_broker_queued_bytes", "gauge",
                   "Payload bytes queued for sessions.").add(queued_bytes),
            Family("edge_broker_oldest_queued_age_seconds", "gauge",
                   "Age of the oldest queued message.").add(self._oldest_queued_age(now)),
            Family("edge_broker_store_full", "gauge",
                   "1 while the store refuses new QoS 1/2 work.").add(int(app.store.full)),
        ]
        counters = self._store_counters()
        if counters["used_bytes"] is not None:
            families.append(Family("edge_broker_store_used_bytes", "gauge",
                                   "Bytes of pages in use in the store file.").add(
                                       counters["used_bytes"]))
        if counters["file_bytes"] is not None:
            families.append(Family("edge_broker_store_file_bytes", "gauge",
                                   "Store file plus its WAL on disk.").add(
                                       counters["file_bytes"]))
        for name, text in (("commits", "Group commits of the store."),
                           ("fsyncs", "Commits that waited for an fsync.")):
            if counters[name] is not None:
                families.append(Family(f"edge_broker_store_{name}_total", "counter",
                                       text).add(counters[name]))
        if counters["budget_stream_rows"] is not None:
            released = Family(
                "edge_broker_store_budget_released_total", "counter",
                "Stored rows given up early to keep the store under max_store_bytes, by "
                "kind (stream: a stream's oldest rows no reader needed; bridge: a bridge's "
                "oldest, also in edge_broker_bridge_dropped_total unless in flight and "
                "then acknowledged).").add(
                    counters["budget_stream_rows"], kind="stream")
            if app.bridges.bridges:
                released.add(app.bridges.budget_dropped, kind="bridge")
            families.append(released)
        families.append(self.commit_latency.family(
            "edge_broker_commit_latency_seconds",
            "From handing a batch to the store to its commit."))
        families.extend(app.bridges.families())
        cpu = os.times()
        families.append(Family("process_cpu_seconds_total", "counter",
                               "User and system CPU time.").add(cpu.user + cpu.system))
        families.append(Family("process_resident_memory_bytes", "gauge",
                               "Resident set size.").add(_rss_bytes()))
        return families

    def _security(self) -> Family:
        metrics = self.app.metrics
        family = Family("edge_broker_refused_total", "counter",
                        "Refused by the security checks: CONNECT by reason, operations "
                        "denied by the ACL, connections over a connection limit.")
        for reason in ("bad_credentials", "not_authorized", "server_busy"):
            family.add(metrics.auth_refused[reason], kind="connect", reason=reason)
        for operation in ("publish", "subscribe", "delivery", "will"):
            family.add(metrics.acl_denied[operation], kind="acl", reason=operation)
        family.add(metrics.connections_refused, kind="connection", reason="limit")
        return family

    def _drops(self) -> Family:
        stats = self.app.core.stats
        return (Family("edge_broker_dropped_messages_total", "counter",
                       "Queued messages dropped, by reason (queue_full_policy and expiry), "
                       "and QoS 0 messages not recorded in streams (the store was full).")
                .add(stats.dropped_queue_full, reason="queue_full")
                .add(stats.dropped_memory_full, reason="memory_full")
                .add(stats.dropped_store_full, reason="store_full")
                .add(stats.messages_expired, reason="expired")
                .add(stats.stream_dropped, reason="stream_store_full"))

    def status(self) -> dict[str, Any]:
        app = self.app
        core = app.core
        now = time.time()
        healthy, health = self.health()
        queued, queued_bytes = self._queued()
        sessions: list[dict[str, Any]] = []
        for session in core.sessions.values():
            backlog = session.queued_count + len(session.inflight) + session.backlog_count
            sessions.append({
                "client_id": session.client_id,
                "online": session.online,
                "protocol": {3: "3.1", 4: "3.1.1", 5: "5.0"}.get(session.protocol_level, "?"),
                "persistent": session.persistent,
                "subscriptions": len(session.subscriptions),
                "queued": backlog,
                "queued_bytes": session.queued_bytes + session.backlog_bytes,
                "dropped": session.dropped,
            })
        sessions.sort(key=lambda s: (-s["queued"], s["client_id"]))
        return {
            "version": getattr(app, "_version", "?"),
            "uptime_s": now - app.started_at,
            "healthy": healthy,
            "health": health,
            "clients_connected": core.stats.clients_connected,
            "sessions_total": len(core.sessions),
            "queued_messages": queued,
            "queued_bytes": queued_bytes,
            "publish_received": core.stats.publish_received,
            "publish_sent": core.stats.publish_sent,
            "sessions": sessions[:200],
            "streams": [],
            "bridges": [],
            "history": list(self.history),
        }

    def flat_metrics(self) -> dict[str, float]:
        """/metrics as `name{label=value,...}` -> value (histogram buckets left out)."""
        flat: dict[str, float] = {}
        for family in self.families():
            if family.type == "histogram":
                for labels, value in family.samples:
                    suffix = dict(labels).get("__suffix__")
                    if suffix is not None:
                        flat[family.name + suffix] = value
                continue
            for labels, value in family.samples:
                key = family.name
                if labels:
                    key += "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"
                flat[key] = value
        return flat

    async def full_status(self) -> dict[str, Any]:
        """`status()` with the streams (their figures read from the store) and the bridges:
        what the status page shows (/status.json)."""
        status = self.status()
        app = self.app
        read = getattr(app.store, "stream_stats", None)  # a store that keeps a log
        if read is not None and app.config.streams:
            try:
                status["streams"] = [stats_json(s) for s in await read()]
            except StoreError as error:
                status["streams_error"] = str(error)
        status["bridges"] = app.bridges.to_dict()["bridges"]
        return status

    async def status_json(self) -> bytes:
        return json.dumps(await self.full_status(), separators=(",", ":")).encode()


# -- HTTP routes ------------------------------------------------------------------------------

_PAGE = "status_page.html"


def build_http_server(observer: Observer) -> HttpServer:
    """The operator's HTTP listener: /metrics, /healthz, / (status page), /status.json."""
    page = (Path(__file__).parent / _PAGE).read_bytes()

    async def metrics() -> Response:
        return Response(200, render(observer.families()).encode(), CONTENT_TYPE)

    async def healthz() -> Response:
        healthy, body = observer.health()
        return Response(200 if healthy else 503, json.dumps(body).encode() + b"\n",
                        "application/json")

    async def status_page() -> Response:
        return Response(200, page, "text/html; charset=utf-8")

    async def status_json() -> Response:
        return Response(200, await observer.status_json(), "application/json")

    routes = {"/metrics": metrics, "/healthz": healthz, "/": status_page,
              "/status.json": status_json}
    if is_loopback_host(observer.app.config.http.host):
        return HttpServer(routes)

    async def authorize(username: str, password: bytes) -> bool:
        # Exposed beyond this machine: only a user of the broker's password file gets in
        # (config.py refuses such a host without one). Checked off the event loop.
        verifier = observer.app.gate.verifier
        if verifier is None or b"\0" in password:
            return False
        return await verifier.verify(username, password)

    return HttpServer(routes, authorize=authorize)


# -- systemd ----------------------------------------------------------------------------------


async def watchdog(observer: Observer) -> None:
    """Ping systemd's watchdog (WatchdogSec=) at half its interval, but only while the broker
    is healthy: a stuck store stops the pings and systemd restarts the service. Also keeps
    the unit's STATUS= line current. Returns at once outside systemd."""
    interval = systemd.watchdog_interval_s()
    if interval is None and not os.environ.get("NOTIFY_SOCKET"):
        return
    step = interval / 2 if interval is not None else HISTORY_STEP_S
    last_status = 0.0
    while True:
        healthy, _ = observer.health()
        if interval is not None and healthy:
            systemd.watchdog()
        now = time.monotonic()
        if now - last_status >= HISTORY_STEP_S:
            last_status = now
            core = observer.app.core
            queued, _ = observer._queued()
            systemd.status(f"{core.stats.clients_connected} clients connected, "
                           f"{len(core.sessions)} sessions, {queued} queued messages"
                           + ("" if healthy else "; UNHEALTHY: the store does not answer"))
        await asyncio.sleep(min(step, HISTORY_STEP_S))


# -- start-up checks --------------------------------------------------------------------------

_STATE_FILES = ("edge-broker.db", "edge-broker.db-wal", "edge-broker.db-shm",
                "edge-broker.lock", "admin.sock")


def prepare_data_dir(config: Config) -> None:
    """Create the data directory (its last component only: a mistyped path must not grow a
    tree) and check that this process may write it and the files in it, so that a directory
    left owned by root is one clear line and exit status 2, not a traceback and a restart
    loop."""
    data_dir = Path(config.broker.data_dir)
    try:
        data_dir.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise ConfigError(
            f"cannot create the data directory {str(data_dir)!r}: its parent "
            f"{str(data_dir.parent)!r} does not exist (only the last component is created; "
            "check the path, or create the parent first)",
            file=config.source, table="broker", key="data_dir") from None
    except OSError as error:
        raise ConfigError(f"cannot create the data directory {str(data_dir)!r}: "
                          f"{error.strerror}", file=config.source, table="broker",
                          key="data_dir") from None
    for path in (data_dir, *(data_dir / name for name in _STATE_FILES)):
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise ConfigError(_not_writable(path, data_dir), file=config.source,
                              table="broker", key="data_dir")


def _not_writable(path: Path, data_dir: Path) -> str:
    info = path.stat()
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = str(os.geteuid())
    return (f"{path} is owned by {owner} (mode {stat.S_IMODE(info.st_mode):04o}) and this "
            f"process runs as {me}, who cannot write it; fix it with: "
            f"sudo chown -R {me}: {data_dir}")
