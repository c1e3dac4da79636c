"""The data directory's lock and the running broker's admin socket.

A running broker holds an exclusive lock on `<data_dir>/edge-broker.lock` (with its pid in
it), so two brokers never share one store, and listens on `<data_dir>/admin.sock` (mode 0600)
for the `edge-broker sessions ...`, `store stats`, `streams ...` and `replay` commands (the
last two answered in server/streams.py): one JSON object per
line in, one per line out. Going through the broker keeps its in-memory state and the store in
agreement; the commands fall back to the files only when no broker holds the lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.changes import SubscriptionRecord
from ..core.session import Session
from ..errors import EdgeBrokerError
from ..mqtt.properties import Properties
from ..mqtt.topics import is_valid_topic_name
from ..mqtt.types import ReasonCode
from .streams import stream_request

if TYPE_CHECKING:
    from .interface import AdminHost

log = logging.getLogger("edge_broker.admin")

LOCK_NAME = "edge-broker.lock"
SOCKET_NAME = "admin.sock"
QUEUE_PREVIEW = 20  # queued messages listed by `sessions show`


class DataDirLock:
    """An exclusive advisory lock (flock) on the data directory, released at exit."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_lock_pid(self.path)
            raise EdgeBrokerError(
                f"another edge-broker (pid {pid or '?'}) is running with the data directory "
                f"{str(self.path.parent)!r}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def read_lock_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip() or 0) or None
    return None


def broker_running(data_dir: Path) -> bool:
    """Whether a broker holds the lock of this data directory right now."""
    path = Path(data_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def session_summary(session: Session) -> dict[str, Any]:
    return {
        "client_id": session.client_id,
        "connected": session.online,
        "protocol_level": session.protocol_level,
        "expiry_interval": session.expiry_interval,
        "disconnected_at": session.disconnected_at,
        "subscriptions": len(session.subscriptions),
        "queued_messages": session.queued_count + session.backlog_count,  # the log's too
        "queued_bytes": session.queued_bytes + session.backlog_bytes,
        "inflight": len(session.inflight),
        "dropped": session.dropped,
        "will_topic": session.will.topic if session.will else None,
    }


def subscription_info(record: SubscriptionRecord) -> dict[str, Any]:
    """A subscription as `sessions show` reports it (live or from the store file)."""
    return {"topic_filter": record.topic_filter, "qos": record.qos, "no_local": record.no_local,
            "retain_as_published": record.retain_as_published,
            "retain_handling": record.retain_handling,
            "subscription_id": record.subscription_id}


def session_detail(session: Session) -> dict[str, Any]:
    detail = session_summary(session)
    detail["subscription_list"] = [subscription_info(s) for s in session.subscriptions.values()]
    queued = list(session.inflight.values()) + list(session.queue)[:QUEUE_PREVIEW]
    detail["queue_preview"] = [
        {"topic": d.message.topic, "qos": d.qos, "bytes": len(d.message.payload),
         "packet_id": d.packet_id, "received_at": d.message.received_at}
        for d in queued[:QUEUE_PREVIEW]]
    return detail


async def backlog_preview(app: AdminHost, session: Session,
                          preview: list[dict[str, Any]]) -> None:
    """Complete `sessions show`'s preview with the first rows of the session's backlog in
    the log (core/backlog.py), read from the store."""
    backlog = session.backlog
    read = getattr(app.store, "read_backlog", None)
    if backlog is None or read is None or len(preview) >= QUEUE_PREVIEW:
        return
    # Rows as stored (store/log/log.py _COLUMNS): offset, at, topic id, qos, retain, payload...
    rows, topics, _ = await read(backlog.reader, dict(backlog.since), backlog.sent,
                                 backlog.last, QUEUE_PREVIEW - len(preview))
    preview.extend({"topic": topics[row[2]], "qos": row[3], "bytes": len(row[5]),
                    "packet_id": None, "received_at": row[1]} for row in rows)


class AdminServer:
    def __init__(self, app: AdminHost, data_dir: Path) -> None:
        self.app = app
        self.path = Path(data_dir) / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a broker that was killed (we hold the lock)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        if self._server is None:  # never started: the socket there is not ours
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 0.5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    reply = await self.handle(request)
                except Exception as error:  # a bad request must not hurt the broker
                    reply = {"error": f"{type(error).__name__}: {error}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        app = self.app
        core = app.core
        command = request.get("command")
        if command == "sessions.list":
            return {"sessions": [session_summary(s) for s in core.sessions.values()]}
        if command == "sessions.show":
            session = core.sessions.get(str(request.get("client_id")))
            if session is None:
                return {"error": f"no session {request.get('client_id')!r}"}
            detail = session_detail(session)
            await backlog_preview(app, session, detail["queue_preview"])
            return {"session": detail}
        if command == "sessions.delete":
            client_id = str(request.get("client_id"))
            handler = app.clients.get(client_id)
            if handler is not None:
                handler.kick(ReasonCode.ADMINISTRATIVE_ACTION)
            deleted = core.end_session(client_id, now=time.time())
            await app.commit()
            if deleted:
                log.info("session %s deleted by an administrator", client_id)
            return {"deleted": deleted}
        if command == "store.stats":
            return {"stats": await app.store_stats()}
        if command == "status.show":
            observer = app.observer
            return {"status": await observer.full_status(), "metrics": observer.flat_metrics()}
        if command == "bridges":
            return app.bridges.to_dict()
        if isinstance(command, str) and command.startswith("streams."):
            return await stream_request(app, command, request)
        if command == "publish":  # edge-broker replay --bridge NAME --republish PREFIX
            return await publish_request(app, request)
        return {"error": f"unknown command {command!r}"}


async def publish_request(app: AdminHost, request: dict[str, Any]) -> dict[str, Any]:
    """Publish `messages` (replay rows: topic, payload, payload_encoding, qos, properties'
    user_properties and content_type) under `prefix/`, as `streams.republish` does; committed
    before the answer."""
    prefix = str(request.get("prefix") or "")
    if not prefix or "+" in prefix or "#" in prefix or prefix.startswith("$"):
        return {"error": f"--republish: not a topic prefix: {prefix!r}"}
    messages = request.get("messages")
    if not isinstance(messages, list):
        return {"error": "publish: expected a list of messages"}
    parsed = []
    for item in messages:
        payload = (base64.b64decode(item["payload"]) if item.get("payload_encoding") == "base64"
                   else str(item["payload"]).encode())
        props = item.get("properties") or {}
        properties = Properties(
            content_type=props.get("content_type"),
            payload_format_indicator=props.get("payload_format_indicator"),
            user_properties=tuple((str(n), str(v)) for n, v in props.get("user_properties", ())))
        qos = int(item.get("qos", 0))
        topic = f"{prefix.rstrip('/')}/{item['topic']}"
        if not is_valid_topic_name(topic):
            return {"error": f"--republish: not a topic name: {topic!r}"}
        parsed.append((topic, payload,
                       qos if qos in (0, 1, 2) else 0, properties))
    now = time.time()
    for topic, payload, qos, properties in parsed:
        app.core.republish(topic, payload, qos, properties, now=now)
    await app.commit()
    return {"published": len(parsed)}


async def admin_request(data_dir: Path, request: dict[str, Any],
                        timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request to the broker running on `data_dir` and return its reply."""
    path = Path(data_dir) / SOCKET_NAME
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout_s)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(_read_reply(reader), timeout_s)
    finally:
        writer.close()
    if not line.endswith(b"\n"):
        raise EdgeBrokerError(f"the broker closed {path} without answering" if not line else
                              f"the broker closed {path} in the middle of its answer")
    reply: dict[str, Any] = json.loads(line)
    return reply


def missing_store_file(path: Path) -> str | None:
    """Why a command that reads the store file with no broker running (`sessions`, `store
    stats`, `streams`, `replay`) has nothing to read, if the file is not there: a mistyped
    --data-dir, not an empty store. Else None."""
    if path.exists():
        return None
    return (f"no store at {path}: no broker has run with this data directory "
            "(check --data-dir or --config)")


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    """One reply line, however long: `readline` stops at the reader's limit (64 KiB), and a
    page of `replay` or `sessions list` may be more (one message may be `max_packet_size`,
    its JSON several times that). Without the newline if the broker closed the socket first."""
    parts: list[bytes] = []
    while True:
        try:
            parts.append(await reader.readuntil(b"\n"))
            return b"".join(parts)
        except asyncio.LimitOverrunError as error:  # what is buffered is part of the line
            parts.append(await reader.readexactly(error.consumed))
        except asyncio.IncompleteReadError as error:
            parts.append(error.partial)
            return b"".join(parts)
