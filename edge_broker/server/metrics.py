"""Counters kept by the server, and the $SYS/broker topics built from them and the core:
`sys_topics` (the counts), `SysLoad` (mosquitto's `load/...` moving averages) and
`heap_topics` (the process's memory, where mosquitto reports its heap)."""

from __future__ import annotations

import math
import os
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from ..core.broker import BrokerCore


@dataclass(slots=True)
class Metrics:
    bytes_received: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    packets_sent: int = 0
    protocol_errors: int = 0
    refused_store_full: int = 0  # QoS 1/2 PUBLISH refused while the store was full
    # Security (server/gate.py): CONNECT refusals by reason ("bad_credentials",
    # "not_authorized", "server_busy"), ACL denials by operation ("publish", "subscribe",
    # "delivery", "will"), connections closed at a connection limit, and the seconds
    # clients spent throttled by their publish quota (episodes that ended).
    auth_refused: Counter[str] = field(default_factory=Counter)
    acl_denied: Counter[str] = field(default_factory=Counter)
    connections_refused: int = 0
    throttled_s: float = 0.0
    sockets_opened: int = 0  # connections accepted (the socket, before any CONNECT)
    connects: int = 0  # CONNECTs accepted (CONNACK 0)


def sys_topics(core: BrokerCore, metrics: Metrics, *, version: str,
               uptime_s: float) -> dict[str, str]:
    """The $SYS/broker values, named as mosquitto names them."""
    stats = core.stats
    sessions = len(core.sessions)
    connected = stats.clients_connected
    return {
        "$SYS/broker/version": f"edge-broker version {version}",
        "$SYS/broker/uptime": f"{int(uptime_s)} seconds",
        "$SYS/broker/clients/connected": str(connected),
        "$SYS/broker/clients/active": str(connected),
        "$SYS/broker/clients/disconnected": str(sessions - connected),
        "$SYS/broker/clients/inactive": str(sessions - connected),
        "$SYS/broker/clients/total": str(sessions),
        "$SYS/broker/clients/maximum": str(stats.clients_maximum),
        "$SYS/broker/clients/expired": str(stats.clients_expired),
        "$SYS/broker/messages/received": str(metrics.packets_received),
        "$SYS/broker/messages/sent": str(metrics.packets_sent),
        "$SYS/broker/publish/messages/received": str(stats.publish_received),
        "$SYS/broker/publish/messages/sent": str(stats.publish_sent),
        "$SYS/broker/publish/messages/dropped": str(stats.publish_dropped),
        # Not in mosquitto: the drops by reason (docs/configuration.md, queue_full_policy):
        # a session's queue bound, or the memory bound of all queues.
        "$SYS/broker/publish/messages/dropped/queue_full": str(stats.dropped_queue_full),
        "$SYS/broker/publish/messages/dropped/memory_full": str(stats.dropped_memory_full),
        "$SYS/broker/publish/messages/dropped/store_full": str(stats.dropped_store_full),
        # Not in mosquitto: deliveries dropped because their message expiry interval ran out.
        "$SYS/broker/publish/messages/expired": str(stats.messages_expired),
        # Not in mosquitto either: QoS 1/2 PUBLISH refused while the store was full, and
        # connections closed for breaking the protocol.
        "$SYS/broker/publish/messages/refused": str(metrics.refused_store_full
                                                    + stats.refused_queue_full),
        "$SYS/broker/publish/messages/refused/store_full": str(metrics.refused_store_full),
        "$SYS/broker/publish/messages/refused/queue_full": str(stats.refused_queue_full),
        # Estimated memory held by all queues (max_queued_memory_bytes bounds it).
        "$SYS/broker/publish/messages/queued_memory": f"{core.memory.used} bytes",
        "$SYS/broker/clients/protocol_errors": str(metrics.protocol_errors),
        # Not in mosquitto: security (docs/security.md).
        "$SYS/broker/clients/refused": str(sum(metrics.auth_refused.values())),
        "$SYS/broker/clients/refused_connections": str(metrics.connections_refused),
        "$SYS/broker/clients/throttled_seconds": f"{metrics.throttled_s:.1f}",
        "$SYS/broker/publish/messages/denied": str(metrics.acl_denied["publish"]),
        "$SYS/broker/publish/messages/denied_deliveries": str(metrics.acl_denied["delivery"]),
        "$SYS/broker/bytes/received": str(metrics.bytes_received),
        "$SYS/broker/bytes/sent": str(metrics.bytes_sent),
        "$SYS/broker/retained messages/count": str(len(core.retained)),
        "$SYS/broker/subscriptions/count": str(core.router.count),
        "$SYS/broker/shared_subscriptions/count": str(core.router.shared_count),
    }


# `$SYS/broker/load/<name>/<window>`: what each average is taken of.
LOAD_SOURCES: Final = ("messages/received", "messages/sent", "bytes/received", "bytes/sent",
                       "publish/received", "publish/sent", "publish/dropped", "connections",
                       "sockets")
LOAD_WINDOWS: Final = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))


def load_counts(core: BrokerCore, metrics: Metrics) -> tuple[int, ...]:
    """The counters behind LOAD_SOURCES, in its order."""
    stats = core.stats
    return (metrics.packets_received, metrics.packets_sent, metrics.bytes_received,
            metrics.bytes_sent, stats.publish_received, stats.publish_sent,
            stats.publish_dropped, metrics.connects, metrics.sockets_opened)


class SysLoad:
    """mosquitto's load figures: per source and window, an exponentially weighted moving
    average of the rate per minute, updated at each $SYS publication from the counts' growth
    since the last one (weight of the old value: e^(-elapsed / window))."""

    def __init__(self, counts: tuple[int, ...], now: float) -> None:
        self._counts = counts
        self._at = now
        self._values = {f"$SYS/broker/load/{source}/{name}": 0.0
                        for source in LOAD_SOURCES for name, _ in LOAD_WINDOWS}

    def topics(self, counts: tuple[int, ...], now: float) -> dict[str, str]:
        elapsed = now - self._at
        if elapsed > 0:
            values = self._values
            for source, count, before in zip(LOAD_SOURCES, counts, self._counts, strict=True):
                per_minute = (count - before) * 60.0 / elapsed
                for name, window in LOAD_WINDOWS:
                    keep = math.exp(-elapsed / window)
                    topic = f"$SYS/broker/load/{source}/{name}"
                    values[topic] = keep * values[topic] + (1.0 - keep) * per_minute
            self._counts, self._at = counts, now
        return {topic: f"{value:.2f}" for topic, value in self._values.items()}


_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def heap_topics() -> dict[str, str]:
    """`$SYS/broker/heap/current` and `heap/maximum`, in bytes: the process's resident memory
    now and at its highest (mosquitto counts its own heap; a Python process has no such
    figure, and resident memory is what a gateway's RAM pays)."""
    # ru_maxrss is in KiB on Linux.
    values = {"$SYS/broker/heap/maximum": str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                              * 1024)}
    try:
        with open("/proc/self/statm", "rb") as statm:
            values["$SYS/broker/heap/current"] = str(int(statm.read().split()[1]) * _PAGE_SIZE)
    except (OSError, IndexError, ValueError):
        pass  # not Linux: only the maximum
    return values
