"""`edge-broker bridges status` and `edge-broker replay --bridge NAME`.

`bridges status` asks the running broker over its admin socket (command `bridges`) for each
bridge's status and prints one block per bridge: connected or not and why, the cursor and the
backlog behind it (messages, bytes, age of the oldest), forwarded per second, drops, the
messages skipped (refused by the remote side's limits, unrouted, expired) and the last
error. `--json` prints the broker's answer as it is. With no broker running on the data
directory it says so and exits 3 (the LSB code for "not running"), like `edge-broker status`.

`replay --bridge NAME` reads the history a jetstream or kafka bridge wrote to its central log
(cli_bridges_replay) and prints it as `replay --stream` does (NDJSON), or with `--republish
PREFIX` publishes it into the running broker under `PREFIX/<topic>` through the admin socket
(command `publish`), page by page, each page committed before the next is read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

from .config import Config
from .errors import BridgeError, ConfigError, EdgeBrokerError
from .server import admin

EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 3
REPUBLISH_PAGE: Final = 256
REQUEST_MAX_BYTES: Final = 60_000
"""The admin socket reads lines of up to 64 KiB: a `publish` request stays below."""


def add_subcommands(commands: Any, add_admin_flags: Any) -> None:
    bridges = commands.add_parser(
        "bridges", help="bridges to JetStream, Kafka and MQTT: status (asks the running "
                        "broker)",
        description="Each bridge of the broker running on the data directory: connection, "
                    "cursor, backlog, rate, drops, last error; exit 3 if none runs.")
    add_admin_flags(bridges)
    actions = bridges.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="one block per bridge")
    status.add_argument("bridge", metavar="NAME", nargs="?", help="only this bridge")
    add_admin_flags(status, suppress=True)


# --------------------------------------------------------------------------- status


def run_command(config: Config, args: argparse.Namespace) -> int:
    data_dir = Path(config.broker.data_dir)
    if not admin.broker_running(data_dir):
        print(f"edge-broker: no broker is running with the data directory {data_dir} "
              "(bridges status asks the running broker; start it, or give its --config "
              "or --data-dir)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    try:
        reply = asyncio.run(admin.admin_request(data_dir, {"command": "bridges"}))
    except (OSError, TimeoutError, EdgeBrokerError) as error:
        print(f"edge-broker: error: the broker on {data_dir} does not answer on its admin "
              f"socket: {error}", file=sys.stderr)
        return EXIT_USAGE
    if "error" in reply:
        print(f"edge-broker: {reply['error']}", file=sys.stderr)
        return EXIT_USAGE
    bridges: list[dict[str, Any]] = list(reply.get("bridges", []))
    if args.bridge is not None:
        bridges = [b for b in bridges if b.get("name") == args.bridge]
        if not bridges:
            print(f"edge-broker: no bridge {args.bridge!r} in the running broker",
                  file=sys.stderr)
            return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps(dict(reply, bridges=bridges), indent=2, default=str))
    elif not bridges:
        print("no bridges configured")
    else:
        head = (f"gateway {reply.get('gateway_id', '?')}, store id "
                f"{reply.get('store_id', '?')}\n\n")
        print(head + "\n\n".join(render(b) for b in bridges))
    return 0


def _first(status: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if status.get(key) is not None:
            return status[key]
    return None


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}" if isinstance(value, int | float) else str(
        value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GB"


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


_SHOWN: Final = {
    "name", "kind", "enabled", "connected", "cursor", "backlog_messages", "backlog_bytes",
    "backlog_oldest_age_s", "forwarded", "forwarded_per_s", "failures", "last_error",
    "last_error_at", "dropped", "downlink_connected", "downlink_published",
    "downlink_duplicates", "downlink_denied", "max_backlog_bytes", "refused", "unrouted",
    "expired",
}


def _ago(moment: Any) -> str:
    if not isinstance(moment, int | float):
        return ""
    return f" ({_age(max(0.0, time.time() - moment))} ago)"


def render(status: dict[str, Any]) -> str:
    """One bridge's block, from its entry in the `bridges` admin command's answer
    (server/bridges.py BridgeStatus)."""
    name = status.get("name", "?")
    error = status.get("last_error")
    if not status.get("enabled", True):
        link = "disabled (enabled = false)"
    elif status.get("connected"):
        link = "connected"
    else:
        link = "NOT connected" + (f": {error}" if error else " (connecting)")
    bound = status.get("max_backlog_bytes")
    backlog = (f"{_n(status.get('backlog_messages'))} messages, "
               f"{_bytes(status.get('backlog_bytes'))}"
               + (f" of {_bytes(bound)}" if bound else "")
               + f", oldest {_age(status.get('backlog_oldest_age_s'))}")
    rate = status.get("forwarded_per_s")
    lines = [
        f"bridge {name} ({status.get('kind', '?')})",
        f"  uplink      {link}",
        f"  cursor      {_n(status.get('cursor'))} (log offset acknowledged upstream)",
        f"  backlog     {backlog}",
        f"  forwarded   {_n(status.get('forwarded'))} total, "
        f"{'-' if rate is None else f'{rate:,.1f}'}/s",
        f"  dropped     {_n(status.get('dropped'))} messages (max_backlog_bytes)",
    ]
    skipped = _skipped(status)
    if skipped:
        lines.append(f"  skipped     {skipped}")
    lines += [
        f"  failures    {_n(status.get('failures'))} connection or send attempts failed",
        f"  last error  {error + _ago(status.get('last_error_at')) if error else 'none'}",
    ]
    if "downlink_connected" in status and (
            status.get("downlink_connected") or status.get("downlink_published")):
        lines.append(
            f"  downlink    {'connected' if status['downlink_connected'] else 'NOT connected'}"
            f", {_n(status.get('downlink_published'))} published locally, "
            f"{_n(status.get('downlink_duplicates'))} duplicates skipped, "
            f"{_n(status.get('downlink_denied'))} denied (by the ACL, or not a valid "
            "local topic)")
    in_process = status.get("uplink_process") is None
    for key in sorted(set(status) - _SHOWN):
        if status[key] is None or (in_process and key.startswith("uplink_process")):
            continue  # nothing to say (an uplink in the broker has no process)
        lines.append(f"  {key.replace('_', ' ')}: {status[key]}")
    return "\n".join(lines)


def _skipped(status: dict[str, Any]) -> str:
    """The messages the cursor passed without sending them, by reason (a broker before
    these figures: "")."""
    parts = []
    if "refused" in status:
        parts.append(f"{_n(status['refused'])} refused (the remote side can never take "
                     "them: too large, topic too long; logged)")
    if "unrouted" in status and (status.get("kind") != "jetstream" or status["unrouted"]):
        parts.append(f"{_n(status['unrouted'])} unrouted (no topic line or topic_map entry "
                     "sends them)")
    if "expired" in status and (status.get("kind") == "mqtt" or status["expired"]):
        parts.append(f"{_n(status['expired'])} expired (Message Expiry Interval)")
    return ", ".join(parts)


# --------------------------------------------------------------------------- replay


def _bridge(config: Config, name: str) -> Any:
    bridges = getattr(config, "bridges", ())
    for bridge in bridges:
        if bridge.name == name:
            return bridge
    names = ", ".join(b.name for b in bridges) or "none"
    source = config.source or "the built-in defaults"
    raise BridgeError(f"no bridge {name!r} in {source} (bridges: {names})")


def run_replay(config: Config, args: argparse.Namespace, position: str | int | float) -> int:
    from .cli_bridges_replay import rows

    if args.limit is not None and args.limit < 0:
        print("edge-broker: error: --limit: expected 0 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        bridge = _bridge(config, args.bridge)
        if bridge.kind not in ("jetstream", "kafka"):
            rows(bridge, position, args.topic, args.limit)  # raises the explanation
        _require_extra(config, bridge)
    except BridgeError as error:
        print(f"edge-broker: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except ConfigError as error:  # the line `run` and `check-config` print
        print(f"edge-broker: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    data_dir = Path(config.broker.data_dir)
    if args.republish is not None and not admin.broker_running(data_dir):
        print(f"edge-broker: --republish needs the broker running on {data_dir}",
              file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        out = sys.stdout
        page: list[dict[str, Any]] = []
        total = 0
        size = 0
        async for item in rows(bridge, position, args.topic, args.limit):
            if args.republish is None:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
                continue
            item_size = len(json.dumps(item)) + 16
            if item_size > REQUEST_MAX_BYTES:
                raise _Refused(f"--republish: message {item['offset']} ({item['topic']}) is "
                               "too large to go through the admin socket (60 KB at most)")
            if len(page) >= REPUBLISH_PAGE or size + item_size > REQUEST_MAX_BYTES:
                total += await _publish(data_dir, args.republish, page)
                page, size = [], 0
            page.append(item)
            size += item_size
        if args.republish is None:
            out.flush()
            return 0
        if page:
            total += await _publish(data_dir, args.republish, page)
        print(f"republished {total} message(s) of bridge {bridge.name} under "
              f"{args.republish.rstrip('/')}/")
        return 0

    try:
        return asyncio.run(main())
    except (BridgeError, _Refused) as error:
        print(f"edge-broker: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (OSError, TimeoutError, EdgeBrokerError) as error:
        print(f"edge-broker: error: {error}", file=sys.stderr)
        return EXIT_USAGE


class _Refused(Exception):
    pass


def _require_extra(config: Config, bridge: Any) -> None:
    """nats-py / aiokafka for `bridge`, also when it is disabled (`enabled = false`: replay
    reads it all the same): bridge/config.py `require_extras`, one line naming the `pip
    install` when missing, as `run` and `check-config` say it."""
    from dataclasses import replace

    from .bridge.config import require_extras

    require_extras(tuple(replace(b, enabled=b is bridge) for b in config.bridges),
                   file=config.source)


async def _publish(data_dir: Path, prefix: str, page: list[dict[str, Any]]) -> int:
    """Publish a page under `prefix/` through the broker's admin socket; committed when it
    answers."""
    messages = [{"topic": item["topic"], "payload": item["payload"],
                 "payload_encoding": item["payload_encoding"], "qos": item["qos"],
                 "properties": item["properties"]} for item in page]
    reply = await admin.admin_request(data_dir, {"command": "publish", "prefix": prefix,
                                                 "messages": messages})
    if "error" in reply:
        raise _Refused(reply["error"])
    return int(reply["published"])
