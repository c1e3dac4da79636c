"""Counters kept by the server, and the $SYS/broker topics built from them and the core."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    }
