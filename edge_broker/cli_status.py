"""`edge-broker status`: one screen with what /metrics says, for an operator on the box.

It asks the running broker over its admin socket (no HTTP listener needed) for the same
figures /metrics exposes and its status page shows, and prints them on one screen (or as JSON
with `--json`). With no broker running on the data directory it says so and exits 3, the
LSB status code for "not running".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .errors import EdgeBrokerError
from .server import admin

EXIT_NOT_RUNNING = 3
TOP_BACKLOGS = 5


def run_status(config: Config, args: argparse.Namespace) -> int:
    data_dir = Path(config.broker.data_dir)
    if not admin.broker_running(data_dir):
        print(f"edge-broker: no broker is running with the data directory {data_dir}",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    try:
        reply = asyncio.run(admin.admin_request(data_dir, {"command": "status.show"}))
    except (OSError, TimeoutError, EdgeBrokerError) as error:
        print(f"edge-broker: error: the broker on {data_dir} does not answer on its admin "
              f"socket: {error}", file=sys.stderr)
        return 2
    if "error" in reply:
        print(f"edge-broker: {reply['error']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
    else:
        print(render(reply["status"], reply["metrics"]))
    return 0


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def render(status: dict[str, Any], metrics: dict[str, float]) -> str:
    """The screen; `metrics` is /metrics flattened to `name{label=value}` -> number."""
    def m(name: str, default: float = 0.0) -> float:
        return metrics.get(name, default)

    health = "healthy" if status["healthy"] else "UNHEALTHY (the store does not answer)"
    if status["health"].get("store_full"):
        health += ", store FULL: new QoS 1/2 messages refused"
    family = "edge_broker_dropped_messages_total{reason="
    dropped = {key[len(family):-1]: value for key, value in sorted(metrics.items())
               if key.startswith(family)}  # every reason the broker counts
    refused = sum(value for key, value in metrics.items()
                  if key.startswith("edge_broker_publish_refused_total"))
    lines = [
        f"edge-broker {status['version']}, up {_duration(status['uptime_s'])}: {health}",
        f"clients connected {_n(m('edge_broker_clients_connected'))}   "
        f"connections {_n(m('edge_broker_connections'))}   "
        f"sessions {_n(m('edge_broker_sessions'))}   "
        f"subscriptions {_n(m('edge_broker_subscriptions'))}   "
        f"retained {_n(m('edge_broker_retained_messages'))}",
        f"messages received {_n(m('edge_broker_publish_received_total'))}   "
        f"sent {_n(m('edge_broker_publish_sent_total'))}   "
        f"refused {_n(refused)}   dropped {_n(sum(dropped.values()))} ("
        + ", ".join(f"{reason} {_n(count)}" for reason, count in dropped.items()) + ")",
        f"queued {_n(m('edge_broker_queued_messages'))} messages, "
        f"{_bytes(m('edge_broker_queued_bytes'))}, oldest "
        f"{_duration(m('edge_broker_oldest_queued_age_seconds'))}; queue memory "
        f"{_bytes(m('edge_broker_queued_memory_bytes'))}",
    ]
    if "edge_broker_store_file_bytes" in metrics:
        count = m("edge_broker_commit_latency_seconds_count")
        mean = (m("edge_broker_commit_latency_seconds_sum") / count) if count else 0.0
        lines.append(
            f"store: file {_bytes(m('edge_broker_store_file_bytes'))}, in use "
            f"{_bytes(m('edge_broker_store_used_bytes'))}, commits "
            f"{_n(m('edge_broker_store_commits_total'))}, fsyncs "
            f"{_n(m('edge_broker_store_fsyncs_total'))}, mean commit {mean * 1000:.1f} ms")
    lines.append(f"process: RSS {_bytes(m('process_resident_memory_bytes'))}, CPU "
                 f"{m('process_cpu_seconds_total'):,.1f} s")
    if status.get("streams"):
        lines.append("streams: " + ", ".join(
            f"{s['name']} {_n(s['messages'])} messages, {_bytes(s['bytes'])}"
            for s in status["streams"]))
    if status.get("bridges"):
        lines.append("bridges: " + ", ".join(
            f"{b['name']} {'connected' if b['connected'] else 'down'}, backlog "
            f"{_n(b['backlog_messages'])}" for b in status["bridges"]))
    backlogs = [s for s in status["sessions"] if s["queued"]][:TOP_BACKLOGS]
    if backlogs:
        lines.append("largest backlogs:")
        for s in backlogs:
            lines.append(f"  {s['client_id']} ({'online' if s['online'] else 'offline'}): "
                         f"{_n(s['queued'])} queued, {_bytes(s['queued_bytes'])}, "
                         f"{_n(s['dropped'])} dropped")
    return "\n".join(lines)
