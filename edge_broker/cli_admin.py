"""`edge-broker sessions ...` and `edge-broker store stats`.

While a broker holds the data directory's lock, every request goes to it over its admin
socket, so what is shown is its live state and a deletion reaches both its memory and its
store. With no broker running, the commands read (or, for `delete`, change) the store file
directly; nothing else can be writing it then.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .core.changes import EXPIRY_NEVER, SessionDeleted
from .errors import EdgeBrokerError
from .server import admin
from .server.app import store_path

EXIT_NOT_FOUND = 1


def run_command(config: Config, args: argparse.Namespace) -> int:
    data_dir = Path(config.broker.data_dir)
    request: dict[str, Any] = {"command": f"{args.command}.{args.action}"}
    if getattr(args, "client_id", None) is not None:
        request["client_id"] = args.client_id
    try:
        if admin.broker_running(data_dir) or _store_held(config):
            reply = asyncio.run(_ask_broker(config, request))
            source = f"the broker running on {data_dir}"
        else:
            reply = asyncio.run(_from_store(config, request))
            source = f"{store_path(config)} (no broker is running)"
    except (OSError, EdgeBrokerError) as error:
        print(f"edge-broker: error: {error}", file=sys.stderr)
        return 2
    if "error" in reply:
        print(f"edge-broker: {reply['error']}", file=sys.stderr)
        return EXIT_NOT_FOUND
    missing = request["command"] == "sessions.delete" and not reply.get("deleted")
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
    elif missing:  # as `sessions show` of an unknown client id: an error
        print(f"edge-broker: no session {request['client_id']!r}", file=sys.stderr)
    else:
        print(_render(request["command"], reply, source, request.get("client_id")))
    return EXIT_NOT_FOUND if missing else 0


def _store_held(config: Config) -> bool:
    """A broker holds the store file although the lock file says nobody runs (it was
    removed): the file is not ours to read as if no broker ran."""
    if config.storage.persistence != "sqlite":
        return False
    from .store.sqlite.guard import store_in_use

    return store_in_use(store_path(config))


async def _ask_broker(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    data_dir = Path(config.broker.data_dir)
    try:
        return await admin.admin_request(data_dir, request)
    except (OSError, TimeoutError) as error:
        raise EdgeBrokerError(
            f"a broker holds {store_path(config)} but its admin socket "
            f"{data_dir / admin.SOCKET_NAME} does not answer ({error}); it may be another "
            f"broker's, or its lock file or socket was removed: restart that broker") from None


async def _from_store(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    """Answer a request from the store file, the broker being stopped."""
    path = store_path(config)
    command = request["command"]
    if config.storage.persistence != "sqlite":
        return {"error": "no broker runs with this data directory and its configuration keeps "
                         "sessions in memory (persistence = \"memory\"): there is nothing "
                         "stored to read"}
    missing = admin.missing_store_file(path)
    if missing is not None:  # not "0 sessions": that would read as "every session is lost"
        return {"error": missing}
    from .store import sqlite

    if command == "sessions.list":
        return {"sessions": [_stored_summary(info) for info in await sqlite.read_sessions(path)]}
    if command == "sessions.show":
        detail = await sqlite.read_session(path, request["client_id"])
        if detail is None:
            return {"error": f"no session {request['client_id']!r}"}
        return {"session": _stored_detail(detail)}
    if command == "sessions.delete":
        if await sqlite.read_session(path, request["client_id"]) is None:
            return {"deleted": False}
        store = sqlite.SqliteStore(path, durability=config.storage.durability)
        await store.open()
        try:
            await store.apply([SessionDeleted(request["client_id"])])
        finally:
            await store.close()
        return {"deleted": True}
    stats = await sqlite.read_stats(path)
    return {"stats": {"persistence": "sqlite", "path": str(path),
                      "sessions": stats.sessions, "queued_messages": stats.queued_messages,
                      "queued_bytes": stats.queued_bytes,
                      "oldest_message_at": stats.oldest_message_at,
                      "store": dataclasses.asdict(stats)}}


def _stored_summary(info: Any) -> dict[str, Any]:
    return {"client_id": info.client_id, "connected": False,
            "protocol_level": info.protocol_level, "expiry_interval": info.expiry_interval,
            "disconnected_at": info.disconnected_at, "subscriptions": info.subscriptions,
            "queued_messages": info.queued_messages, "queued_bytes": info.queued_bytes,
            "inflight": None, "dropped": None, "will_topic": None}


def _stored_detail(detail: Any) -> dict[str, Any]:
    summary = _stored_summary(detail.info)
    summary["will_topic"] = detail.record.will.topic if detail.record.will else None
    summary["subscription_list"] = [admin.subscription_info(s) for s in detail.subscriptions]
    summary["queue_preview"] = [
        {"topic": q.topic, "qos": q.delivery.qos, "bytes": q.payload_bytes,
         "packet_id": q.delivery.packet_id, "received_at": q.received_at}
        for q in detail.deliveries[:admin.QUEUE_PREVIEW]]
    return summary


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _expiry(seconds: int) -> str:
    return "never" if seconds == EXPIRY_NEVER else f"{seconds} s"


def _render(command: str, reply: dict[str, Any], source: str, client_id: str | None) -> str:
    if command == "sessions.list":
        rows = [("CLIENT", "STATE", "MQTT", "EXPIRY", "SUBS", "QUEUED", "BYTES", "DROPPED")]
        for s in sorted(reply["sessions"], key=lambda s: s["client_id"]):
            rows.append((s["client_id"], "connected" if s["connected"] else "offline",
                         {3: "3.1", 4: "3.1.1", 5: "5.0"}.get(s["protocol_level"], "?"),
                         _expiry(s["expiry_interval"]), str(s["subscriptions"]),
                         str(s["queued_messages"]), str(s["queued_bytes"]),
                         "-" if s.get("dropped") is None else str(s["dropped"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.append(f"{len(rows) - 1} sessions, from {source}")
        return "\n".join(lines)
    if command == "sessions.show":
        s = reply["session"]
        lines = [f"session {s['client_id']} ({source})",
                 f"  state: {'connected' if s['connected'] else 'offline'}"
                 f"{'' if s['connected'] else ' since ' + _when(s['disconnected_at'])}",
                 f"  protocol level: {s['protocol_level']}, session expiry: "
                 f"{_expiry(s['expiry_interval'])}",
                 f"  will: {s['will_topic'] or '-'}",
                 f"  queued: {s['queued_messages']} messages, {s['queued_bytes']} bytes"
                 + (f", inflight {s['inflight']}" if s.get("inflight") is not None else ""),
                 # Counted since the session began in this broker process (not stored).
                 f"  dropped by queue_full_policy: "
                 f"{'-' if s.get('dropped') is None else s['dropped']}",
                 "  subscriptions:"]
        for sub in s["subscription_list"]:
            lines.append(f"    {sub['topic_filter']}  qos {sub['qos']}"
                         + (f"  id {sub['subscription_id']}" if sub["subscription_id"] else ""))
        if s["queue_preview"]:
            lines.append("  next messages:")
            for q in s["queue_preview"]:
                lines.append(f"    {q['topic']}  qos {q['qos']}  {q['bytes']} bytes  "
                             f"received {_when(q['received_at'])}")
        return "\n".join(lines)
    if command == "sessions.delete":
        return f"session {client_id} deleted"
    st = reply["stats"]
    lines = [f"store stats ({source})",
             f"  persistence: {st['persistence']}",
             f"  sessions: {st['sessions']}",
             f"  queued messages: {st['queued_messages']} ({st['queued_bytes']} bytes)",
             f"  oldest queued message: {_when(st['oldest_message_at'])}"]
    store = st.get("store")
    if store:
        lines.append(f"  file: {st.get('path', '')}: {store['file_bytes']} bytes on disk, "
                     f"{store['used_bytes']} in use{', FULL' if store['full'] else ''}")
        if store.get("file_lost"):
            lines.append("  the file was DELETED OR REPLACED while the broker runs: new QoS 1/2 "
                         "messages are refused (see the broker's log)")
        lines.append(f"  quarantined rows: {store.get('quarantined', 0)}"
                     + (" (invalid rows found at start-up, kept in the table 'quarantine')"
                        if store.get("quarantined") else ""))
    return "\n".join(lines)
