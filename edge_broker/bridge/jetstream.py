"""The JetStream sink and downlink source (nats-py). Imported only for a "jetstream" bridge.

Uplink: `JetStreamSink.send(batch)` publishes the whole window at once, each message with
a reply subject on the sink's inbox where its PubAck comes (like nats-py's `publish_async`,
lighter: no round trip per message, no yield to the loop between messages: one socket
write per window), each message to `<prefix>.<escaped topic>`
with the documented headers and `Nats-Msg-Id` = the message id, then waits for the acks in
order. It returns how many from the start of the window were stored (a PubAck, duplicate or
not): the cursor moves past exactly those. A message whose ack does not come within
`ack_timeout` ends the count there; the rest are resent next time with the same ids, and the
server drops the ones it already has (within the stream's duplicate window).

Stream: `start()` looks the stream up. Missing: it is created with the configured subjects,
retention, storage, replicas, limits and duplicate window. Present (typically shared by many
gateways): it must capture `<prefix>.>`, else a BridgeError says so; it is never modified.

Downlink: `JetStreamDownlink` binds a durable pull consumer (created when missing, with
explicit acks and the configured filter subjects) and yields each message with its stream
sequence as position; `ack(message)` acknowledges it after the local commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from edge_broker.errors import BridgeError

from .base import (
    H_QOS,
    H_RETAIN,
    H_USER_PROPERTIES,
    NATS_MSG_ID,
    BridgeMessage,
    DownlinkMessage,
    decode_user_properties,
    message_id,
    ssl_context,
)
from .config import BridgeConfig, JetStreamOptions
from .jetstream_frames import FrameBuilder
from .topic_map import subject_to_topic, topic_to_subject

log = logging.getLogger(__name__)

_RETENTION = {"limits": api.RetentionPolicy.LIMITS, "interest": api.RetentionPolicy.INTEREST,
              "workqueue": api.RetentionPolicy.WORK_QUEUE}
SUBJECT_CACHE = 4096  # topics whose subject is remembered by a sink

_STORAGE = {"file": api.StorageType.FILE, "memory": api.StorageType.MEMORY}


def filter_covers(stream_filter: str, prefix: str) -> bool:
    """Does the subject filter `stream_filter` capture every subject `<prefix>.>` can be?"""
    tokens = stream_filter.split(".")
    wanted = prefix.split(".")
    if tokens[-1] != ">" or len(tokens) - 1 > len(wanted):
        return False
    return all(t in ("*", w) for t, w in zip(tokens[:-1], wanted, strict=False))


def connect_options(config: BridgeConfig) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` from the bridge's credentials and TLS."""
    js = _js(config)
    options: dict[str, Any] = {
        # nats-py reconnects by itself (and follows a cluster's other servers) a few times;
        # past that, or when the first connection fails, the bridge's own loop takes over
        # with its backoff. (-1, "forever", would also make the first connect hang.)
        "servers": list(config.servers), "allow_reconnect": True,
        "max_reconnect_attempts": 3, "reconnect_time_wait": config.backoff_initial_s,
        "connect_timeout": 5, "name": f"edge-broker bridge {config.name}",
    }
    if js.creds_file is not None:
        options["user_credentials"] = js.creds_file
    if js.nkey_seed_file is not None:
        options["nkeys_seed"] = js.nkey_seed_file
    if js.token is not None:
        options["token"] = js.token
    if config.username is not None:
        options["user"] = config.username
        options["password"] = config.password
    context = ssl_context(config.tls)
    if context is not None:
        options["tls"] = context
        if config.tls.server_name is not None:
            options["tls_hostname"] = config.tls.server_name
    return options


async def connect(config: BridgeConfig) -> Any:
    """A nats-py connection; BridgeError naming the server's last complaint on failure
    (e.g. "Authorization Violation"), not only nats-py's "no servers available"."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text not in errors:
            errors.append(text)
            log.warning("bridge %s: NATS: %s", config.name, text)

    try:
        return await nats.connect(**connect_options(config), error_cb=on_error)
    except Exception as exc:
        detail = f" (errors seen: {'; '.join(errors)})" if errors else ""
        raise BridgeError(f"bridge {config.name!r}: cannot connect to "
                          f"{list(config.servers)}: {exc}{detail}") from exc


def _js(config: BridgeConfig) -> JetStreamOptions:
    if config.jetstream is None:
        raise BridgeError(f"bridge {config.name!r} is not a jetstream bridge")
    return config.jetstream


class JetStreamSink:
    """Uplink to a JetStream stream. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, gateway_id: str, store_id: str,
                 ack_timeout: float = 10.0) -> None:
        self.config = config
        self.options = _js(config)
        self.gateway_id = gateway_id
        self.store_id = store_id
        self.ack_timeout = ack_timeout
        self.duplicates = 0
        """Acks the server marked duplicate (resends it had stored already)."""
        self.created_stream = False
        self._nc: Any = None
        self._js: Any = None
        self._subjects: dict[str, str] = {}
        self._reply_prefix = ""
        self._acks: dict[str, asyncio.Future[bool]] = {}  # token -> duplicate?
        self._token = 0
        self._frames: FrameBuilder | None = None

    async def start(self) -> None:
        self._nc = await connect(self.config)
        self._js = self._nc.jetstream(timeout=self.ack_timeout)
        # The PubAcks come to one inbox subscription, `<inbox>.<n>` per message (as nats-py's
        # publish_async does, without its per-message semaphore, random token and PubAck
        # dataclass: those were a large share of the uplink's time per message).
        inbox = self._nc.new_inbox()
        self._reply_prefix = inbox + "."
        await self._nc.subscribe(inbox + ".*", cb=self._on_ack)
        await self.ensure_stream()
        # nats-py's connection takes the window's bytes in one command when it has the
        # (private) methods its own publish uses; otherwise publish message by message.
        if all(callable(getattr(self._nc, name, None))
               for name in ("_send_command", "_flush_pending")):
            with contextlib.suppress(ValueError):  # an id nats-py would have to clean
                self._frames = FrameBuilder(self.gateway_id, self.store_id, self.subject)

    async def _write(self, data: bytes) -> None:
        """Hand a window's HPUB commands to the connection, as `nc.publish` does with one:
        refused when closed; buffered (up to nats-py's pending limit) while reconnecting."""
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not nc.is_connected and (nc._max_pending_size <= 0 or len(data)
                                    + nc._pending_data_size > nc._max_pending_size):
            raise nats.errors.OutboundBufferLimitError
        await nc._send_command(data)
        await nc._flush_pending()

    async def _on_ack(self, msg: Any) -> None:
        future = self._acks.pop(msg.subject[len(self._reply_prefix):], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":  # no stream captures it
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        data = msg.data
        # A PubAck is `{"stream":"S","seq":7}` (nats-server 2.x), read here without json;
        # one with any other member (`"duplicate": true`, `"error"`, a domain) goes through
        # json.
        if data.startswith(b'{"stream":"') and data.count(b'"') == 6 and b'"seq":' in data:
            future.set_result(False)
            return
        try:
            response = json.loads(data)
        except ValueError as exc:
            future.set_exception(BridgeError(f"JetStream: unreadable ack {data!r}: {exc}"))
            return
        if not isinstance(response, dict):
            future.set_exception(BridgeError(f"JetStream: unreadable ack {data!r}"))
        elif "error" in response:
            future.set_exception(nats.js.errors.APIError.from_error(response["error"]))
        else:
            future.set_result(bool(response.get("duplicate")))

    async def ensure_stream(self) -> None:
        opts = self.options
        try:
            info = await self._js.stream_info(opts.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(api.StreamConfig(
                name=opts.stream, subjects=list(opts.stream_subjects),
                retention=_RETENTION[opts.stream_retention],
                storage=_STORAGE[opts.stream_storage], num_replicas=opts.stream_replicas,
                max_age=float(opts.stream_max_age_s) if opts.stream_max_age_s else None,
                max_bytes=opts.stream_max_bytes or -1,
                duplicate_window=float(opts.duplicate_window_s)))
            self.created_stream = True
            return
        subjects = info.config.subjects or []
        if not any(filter_covers(s, opts.subject_prefix) for s in subjects):
            raise BridgeError(
                f"bridge {self.config.name!r}: the existing stream {opts.stream!r} captures "
                f"{subjects}, not {opts.subject_prefix}.>; the bridge never modifies an "
                "existing stream: add the subject to it, or change subject_prefix")

    def subject(self, message: BridgeMessage) -> str:
        subjects = self._subjects  # topic -> subject: escaping each level costs per message
        subject = subjects.get(message.topic)
        if subject is None:
            if len(subjects) >= SUBJECT_CACHE:
                subjects.clear()
            subject = subjects[message.topic] = topic_to_subject(self.options.subject_prefix,
                                                                 message.topic)
        return subject

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        """Publish the window; the number acknowledged from its start (see module doc)."""
        if not batch:
            return 0
        if self._js is None:
            raise BridgeError("send before start")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bool]] = []
        tokens: list[str] = []
        acks = self._acks
        nc = self._nc
        if self._frames is not None:
            # The window as one HPUB blob (jetstream_frames.py), handed to the connection
            # at once: no per-message publish, one socket write.
            frames: list[bytes] = []
            frame = self._frames.frame
            reply_prefix = self._reply_prefix
            max_payload = nc.max_payload
            too_big: Exception | None = None
            for message in batch:
                if len(message.payload) > max_payload:  # as nc.publish refuses it
                    too_big = nats.errors.MaxPayloadError()
                    break
                self._token += 1
                token = str(self._token)
                frames.append(frame(message, reply_prefix + token))
                future: asyncio.Future[bool] = loop.create_future()
                acks[token] = future
                tokens.append(token)
                futures.append(future)
            try:
                if not frames:
                    raise too_big or BridgeError("nothing to send")
                await self._write(b"".join(frames))
            except Exception:
                for token in tokens:
                    acks.pop(token, None)
                raise
        else:
            try:
                # No yield to the loop between messages (nc.publish only appends to
                # nats-py's buffer): the window goes out in one socket write.
                for message in batch:
                    mid = message_id(self.gateway_id, self.store_id, message.offset)
                    headers = message.headers(mid)
                    headers[NATS_MSG_ID] = mid
                    self._token += 1
                    token = str(self._token)
                    future = loop.create_future()
                    acks[token] = future
                    tokens.append(token)
                    futures.append(future)
                    await nc.publish(self.subject(message), message.payload,
                                     reply=self._reply_prefix + token, headers=headers)
            except Exception:
                if len(futures) == len(tokens) and futures:  # the last one was not sent
                    acks.pop(tokens.pop(), None)
                    futures.pop().cancel()
                if not futures:
                    raise
        try:
            await asyncio.wait(futures, timeout=self.ack_timeout)
        finally:
            for token in tokens:
                acks.pop(token, None)
        acknowledged = 0
        first_error: BaseException | None = None
        for future in futures:
            if not future.done() or future.cancelled():
                first_error = TimeoutError(f"no ack within {self.ack_timeout} s")
                break
            if (error := future.exception()) is not None:
                first_error = error
                break
            if future.result():
                self.duplicates += 1
            acknowledged += 1
        for future in futures[acknowledged:]:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved, so asyncio does not log it
        if acknowledged == 0 and first_error is not None:
            raise BridgeError(f"JetStream publish failed: {first_error!r}") from first_error
        return acknowledged

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await asyncio.wait_for(nc.close(), 5)


class JetStreamDownlink:
    """Durable pull consumer on the downlink subjects. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, batch: int = 64, fetch_timeout: float = 1.0,
                 ack_wait: float = 30.0) -> None:
        self.config = config
        self.ack_wait = ack_wait
        """Seconds before the server redelivers a message not acknowledged (set when the
        durable consumer is created; an existing one keeps its own)."""
        self.options = _js(config)
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self._nc: Any = None
        self._sub: Any = None

    async def start(self) -> None:
        opts = self.options
        self._nc = await connect(self.config)
        js = self._nc.jetstream()
        subjects = list(self.config.downlink)
        consumer = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT,
                                      deliver_policy=api.DeliverPolicy.ALL,
                                      ack_wait=self.ack_wait,
                                      filter_subjects=subjects if len(subjects) > 1 else None)
        self._sub = await js.pull_subscribe(subjects[0], durable=opts.downlink_durable,
                                            stream=opts.downlink_stream, config=consumer)

    async def messages(self) -> AsyncIterator[DownlinkMessage]:
        if self._sub is None:
            raise BridgeError("messages before start")
        prefix = self.options.subject_prefix
        while True:
            try:
                batch = await self._sub.fetch(self.batch, timeout=self.fetch_timeout)
            except nats.errors.TimeoutError:
                continue
            for msg in batch:
                headers = msg.headers or {}
                try:
                    topic = subject_to_topic(prefix, msg.subject)
                except ValueError:
                    await msg.term()  # cannot be a local topic: never redeliver it
                    continue
                props: tuple[tuple[str, str], ...] = ()
                if H_USER_PROPERTIES in headers:
                    try:
                        props = decode_user_properties(headers[H_USER_PROPERTIES])
                    except ValueError:
                        props = ()
                qos = headers.get(H_QOS, "1")
                yield DownlinkMessage(
                    topic=topic, payload=msg.data, source=self.options.downlink_stream,
                    position=msg.metadata.sequence.stream,
                    qos=int(qos) if qos in ("0", "1", "2") else 1,
                    retain=headers.get(H_RETAIN) == "1", user_properties=props, handle=msg)

    async def ack(self, message: DownlinkMessage) -> None:
        msg: Any = message.handle
        await msg.ack_sync()

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._sub = self._nc, None, None
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await asyncio.wait_for(nc.close(), 5)
