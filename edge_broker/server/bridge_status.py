"""What a bridge shows: `BridgeStatus` (the admin socket's `bridges` answer, `edge-broker
bridges status`), its `$SYS/broker/bridges/<name>/...` topics and its Prometheus metrics.

server/bridges.py fills the statuses (`Bridge.refresh`); this module only formats them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..bridge.config import BridgeConfig
from .prometheus import Family

__all__ = ["BridgeStatus", "bridge_families", "bridge_sys_topics"]


@dataclass(slots=True)
class BridgeStatus:
    """What `edge-broker bridges status`, $SYS and /metrics show for one bridge."""

    name: str
    kind: str
    enabled: bool
    connected: bool = False
    cursor: int = 0
    backlog_messages: int = 0
    backlog_bytes: int = 0
    backlog_oldest_age_s: float = 0.0
    forwarded: int = 0
    forwarded_per_s: float = 0.0
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    dropped: int = 0
    expired: int = 0  # MQTT upstream: not sent, their Message Expiry Interval over
    refused: int = 0  # passed: the remote side can never take them (too large, ...)
    unrouted: int = 0  # passed: no topic line (mqtt) / topic_map entry (kafka) sends them
    downlink_connected: bool = False
    downlink_published: int = 0
    downlink_duplicates: int = 0
    downlink_denied: int = 0
    uplink_process: int | None = None  # separate_process: the pid of the uplink process
    uplink_process_starts: int = 0  # ... and how often it was started (restarts + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failed(self, error: str) -> None:
        """Count one failure; `error` says what failed (shown until the next one)."""
        self.failures += 1
        self.last_error = error
        self.last_error_at = time.time()


def bridge_sys_topics(configs: Sequence[BridgeConfig],
                      statuses: Sequence[BridgeStatus]) -> dict[str, str]:
    """$SYS/broker/bridges/<name>/... (retained, published with the other $SYS values), for
    bridges and their statuses in the same order."""
    out: dict[str, str] = {}
    for config, status in zip(configs, statuses, strict=True):
        base = f"$SYS/broker/bridges/{status.name}"
        out.update({
            f"{base}/connected": "1" if status.connected else "0",
            f"{base}/cursor": str(status.cursor),
            f"{base}/backlog/messages": str(status.backlog_messages),
            f"{base}/backlog/bytes": str(status.backlog_bytes),
            f"{base}/backlog/oldest_age": f"{status.backlog_oldest_age_s:.0f} seconds",
            f"{base}/forwarded": str(status.forwarded),
            f"{base}/forwarded_per_second": f"{status.forwarded_per_s:.1f}",
            f"{base}/dropped": str(status.dropped),
            f"{base}/expired": str(status.expired),
            f"{base}/refused": str(status.refused),
            f"{base}/unrouted": str(status.unrouted),
            # "none", not "": an empty retained payload would clear the topic.
            f"{base}/last_error": status.last_error or "none",
            f"{base}/downlink/published": str(status.downlink_published),
        })
        mqtt = config.mqtt
        if mqtt is not None and mqtt.local_state_topic and status.enabled:
            out[mqtt.local_state_topic] = "1" if status.connected else "0"
    return out


def bridge_families(statuses: Sequence[BridgeStatus]) -> list[Family]:
    """The Prometheus metrics of the bridges (`edge_broker_bridge_...`, one sample each)."""
    if not statuses:
        return []
    specs: list[tuple[str, str, str, str]] = [
        ("connected", "gauge", "1 while the bridge's uplink is connected.", "connected"),
        ("cursor", "gauge", "Log offset up to which the remote side acknowledged.",
         "cursor"),
        ("backlog_messages", "gauge", "Messages in the log not forwarded yet.",
         "backlog_messages"),
        ("backlog_bytes", "gauge", "Bytes (topic + payload + properties) not forwarded.",
         "backlog_bytes"),
        ("backlog_oldest_age_seconds", "gauge", "Age of the oldest message not forwarded.",
         "backlog_oldest_age_s"),
        ("forwarded_total", "counter", "Messages acknowledged by the remote side.",
         "forwarded"),
        ("forwarded_per_second", "gauge", "Forwarding rate (a few seconds' average).",
         "forwarded_per_s"),
        ("dropped_total", "counter",
         "Oldest messages skipped because the backlog exceeded max_backlog_bytes or "
         "gave way to max_store_bytes.",
         "dropped"),
        ("expired_total", "counter",
         "Messages not sent because their Message Expiry Interval passed first (mqtt).",
         "expired"),
        ("refused_total", "counter",
         "Messages skipped because the remote side can never take them (larger than it "
         "allows, a topic too long for a NATS subject, refused for good in the ack).",
         "refused"),
        ("unrouted_total", "counter",
         "Messages skipped because no topic line (mqtt) or topic_map entry (kafka) sends "
         "them.", "unrouted"),
        ("failures_total", "counter", "Connection or send failures.", "failures"),
        ("downlink_published_total", "counter", "Downlink messages published locally.",
         "downlink_published"),
        ("downlink_duplicates_total", "counter",
         "Downlink messages redelivered after their local commit (not published again).",
         "downlink_duplicates"),
        ("downlink_denied_total", "counter", "Downlink messages the ACL refused.",
         "downlink_denied"),
    ]
    families: list[Family] = []
    for suffix, kind, text, attr in specs:
        family = Family(f"edge_broker_bridge_{suffix}", kind,  # type: ignore[arg-type]
                        text)
        for status in statuses:
            value = getattr(status, attr)
            family.add(float(value), bridge=status.name, kind=status.kind)
        families.append(family)
    return families
