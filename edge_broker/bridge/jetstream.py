"""The JetStream sink (nats-py). Imported only for a "jetstream" bridge.

Uplink: `JetStreamSink.send(batch)` publishes the whole window at once, each message with
a reply subject on the sink's inbox where its PubAck comes (like nats-py's `publish_async`,
lighter: no round trip per message, no yield to the loop between messages: one socket
write per window), each message to `<prefix>.<escaped topic>`
with the documented headers (the message id as `Nats-Msg-Id`), then waits for the acks in
order. It returns how many from the start of the window were stored (a PubAck, duplicate or
not): the cursor moves past exactly those. A message whose ack does not come within
`ack_timeout` ends the count there; the rest are resent next time with the same ids, and the
server drops the ones it already has (within the stream's duplicate window).

Batches: on a stream that allows fast-ingest batches (`allow_batched`, nats-server 2.14+)
each window goes as one batch instead (bridge/jetstream_batch.py): about two replies per
window instead of one PubAck per message, the same count from the window's start, the same
ids (a resend is dropped by `Nats-Msg-Id` inside a batch too). A stream this sink creates
gets the flag; on an existing stream without it the sink keeps one PubAck per message and
says so once in the log.

A message the server or the stream can never take (bridge/jetstream_frames.py: control
line, `max_payload`, the stream's `max_msg_size` as `start()` read it, headers over 64 KiB)
is not sent: the window is cut before it (`written`); the window's first, `submit` raises
`Refused` (bridge/base.py: the forwarder skips it, counts it). A PubAck refusing a window's
first message for good (API error 10054 "message size exceeds maximum allowed", 10097: a
limit the sink did not know, the stream changed under it) is `Refused` too.

Stream: `start()` looks the stream up. Missing: it is created with the configured subjects,
retention, storage, replicas, limits and duplicate window (and `allow_batched`). Present
(typically shared by many gateways): it must capture `<prefix>.>`, else a BridgeError says
so; it is never modified.

The downlink source, `JetStreamDownlink`, is bridge/jetstream_downlink.py; it connects with
`connect` and reads its options with `js_options` from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.transport import TcpTransport
from nats.js import api

from edge_broker.errors import BridgeError

from .base import (
    NATS_MSG_ID,
    BridgeMessage,
    Refused,
    Resend,
    message_id,
    ssl_context,
)
from .config import BridgeConfig, JetStreamOptions
from .jetstream_acks import AckReader
from .jetstream_batch import BatchPublisher, BatchWindow
from .jetstream_frames import FrameBuilder, publish_over_limits
from .jetstream_frames import refusal_of as _refusal
from .topic_map import topic_to_subject

log = logging.getLogger(__name__)

_RETENTION = {"limits": api.RetentionPolicy.LIMITS, "interest": api.RetentionPolicy.INTEREST,
              "workqueue": api.RetentionPolicy.WORK_QUEUE}
SUBJECT_CACHE = 4096  # topics whose subject is remembered by a sink

_STORAGE = {"file": api.StorageType.FILE, "memory": api.StorageType.MEMORY}
_BATCH_FIELD = "allow_batched" in getattr(api.StreamConfig, "__dataclass_fields__", {})
_NOTED_UNBATCHED: set[tuple[str, str]] = set()  # (bridge, stream) logged without batches


def filter_covers(stream_filter: str, prefix: str) -> bool:
    """Does the subject filter `stream_filter` capture every subject `<prefix>.>` can be?"""
    tokens = stream_filter.split(".")
    wanted = prefix.split(".")
    if tokens[-1] != ">" or len(tokens) - 1 > len(wanted):
        return False
    return all(t in ("*", w) for t, w in zip(tokens[:-1], wanted, strict=False))


def connect_options(config: BridgeConfig) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` from the bridge's credentials and TLS."""
    js = js_options(config)
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


async def connect(config: BridgeConfig, **callbacks: Any) -> Any:
    """A nats-py connection; BridgeError naming the server's last complaint on failure
    (e.g. "Authorization Violation"), not only nats-py's "no servers available".
    `callbacks`: more of nats.connect's callbacks (disconnected_cb, ...)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text not in errors:
            errors.append(text)
            log.warning("bridge %s: NATS: %s", config.name, text)

    try:
        return await nats.connect(**connect_options(config), error_cb=on_error, **callbacks)
    except Exception as exc:
        detail = f" (errors seen: {'; '.join(errors)})" if errors else ""
        raise BridgeError(f"bridge {config.name!r}: cannot connect to "
                          f"{list(config.servers)}: {exc}{detail}") from exc


def js_options(config: BridgeConfig) -> JetStreamOptions:
    if config.jetstream is None:
        raise BridgeError(f"bridge {config.name!r} is not a jetstream bridge")
    return config.jetstream


def _ack_result(data: bytes, status: str | None) -> bool | BaseException:
    """A PubAck: stored (False), stored before (True: a duplicate), or the error. `status`:
    the NATS status of the reply, when it had one."""
    if status == "503":  # no responders: no stream captures it (now)
        return Resend("no responders (no stream, or its leader is being elected)")
    # A PubAck is `{"stream":"S","seq":7}` (nats-server 2.x), read here without json; one
    # with any other member (`"duplicate": true`, `"error"`, a domain) goes through json.
    if data.startswith(b'{"stream":"') and data.count(b'"') == 6 and b'"seq":' in data:
        return False
    try:
        response = json.loads(data)
    except ValueError as exc:
        return BridgeError(f"JetStream: unreadable ack {data!r}: {exc}")
    if not isinstance(response, dict):
        return BridgeError(f"JetStream: unreadable ack {data!r}")
    if "error" in response:
        return _api_error(response["error"])
    return bool(response.get("duplicate"))


def _failed(error: BaseException) -> BridgeError:
    """The BridgeError of a window none of which was stored (a server error says why in
    its str, not in its repr)."""
    detail = str(error) if isinstance(error, nats.js.errors.APIError) else repr(error)
    failure = BridgeError(f"JetStream publish failed: {detail}")
    failure.__cause__ = error
    return failure


def _api_error(error: object) -> BaseException:
    """The exception of a server error object (the `error` member of a reply). (nats-py's
    `APIError.from_error` raises it, it does not return it: raised here, in the reader's
    callback, it went into nats-py's read loop and the window waited for `ack_timeout`.)"""
    try:
        nats.js.errors.APIError.from_error(error)
    except nats.js.errors.APIError as exc:
        failure: BaseException = exc
        return failure
    except (TypeError, KeyError):
        pass
    return BridgeError(f"JetStream: unreadable error {error!r}")


def _status(headers: bytes | None) -> str | None:
    """The status of a raw NATS header block (`NATS/1.0 503` -> "503"), or None."""
    if not headers or headers[8:9] != b" ":
        return None
    return headers[9:12].decode(errors="replace")


class _Window:
    """One submitted window: each message's ack result (None until it comes), how many
    are still awaited, and `done`, resolved when none is (or the connection was lost)."""

    __slots__ = ("done", "lost", "pending", "results", "sent")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.results: list[bool | BaseException | None] = [None] * size
        self.pending = size
        self.sent = size
        self.done = done
        self.lost: BaseException | None = None

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class JetStreamSink:
    """Uplink to a JetStream stream. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, gateway_id: str, store_id: str,
                 ack_timeout: float | None = None) -> None:
        self.config = config
        self.options = js_options(config)
        self.gateway_id = gateway_id
        self.store_id = store_id
        self.ack_timeout = config.ack_timeout_s if ack_timeout is None else ack_timeout
        self.duplicates = 0
        """Acks the server marked duplicate (resends it had stored already). One PubAck per
        message only: a batch's PubAck counts its duplicates as stored, without a mark."""
        self.created_stream = False
        self.max_msg_size = -1
        """The stream's max_msg_size as `ensure_stream` read it (-1: no limit)."""
        self.written = 0
        """How many of the last window `submit` wrote: fewer than the window when it cut it
        before a message the server or the stream can never take (bridge/forward.py)."""
        self.batched = False
        """Windows go as fast-ingest batches (the stream allows them; see the docstring)."""
        self._nc: Any = None
        self._js: Any = None
        self._subjects: dict[str, str] = {}
        self._reply_prefix = ""
        self._acks: dict[int, tuple[_Window, int]] = {}  # token -> its window and index
        self._windows: set[_Window] = set()  # submitted, not yet collected
        self._token = 0
        self._frames: FrameBuilder | None = None
        self._batches: BatchPublisher | None = None

    async def start(self) -> None:
        self._nc = await connect(self.config, disconnected_cb=self._on_disconnect)
        self._js = self._nc.jetstream(timeout=self.ack_timeout)
        # The PubAcks come to one inbox subscription, `<inbox>.<n>` per message (as nats-py's
        # publish_async does, without its per-message semaphore, random token and PubAck
        # dataclass: those were a large share of the uplink's time per message).
        inbox = self._nc.new_inbox()
        self._reply_prefix = inbox + "."
        # (`>`: a batch's replies have more tokens: bridge/jetstream_batch.py.)
        subscription = await self._nc.subscribe(inbox + ".>", cb=self._on_ack)
        sid = getattr(subscription, "_id", None)
        if isinstance(sid, int):
            self._take_acks(sid)
        await self.ensure_stream()
        # nats-py's connection takes the window's bytes in one command when it has the
        # (private) methods its own publish uses; otherwise publish message by message.
        if all(callable(getattr(self._nc, name, None))
               for name in ("_send_command", "_flush_pending")):
            with contextlib.suppress(ValueError):  # an id nats-py would have to clean
                self._frames = FrameBuilder(self.gateway_id, self.store_id, self.subject,
                                            max_payload=self._nc.max_payload,
                                            max_msg_size=self.max_msg_size)
        self._batches = None
        if self._frames is not None and self.batched:
            self._batches = BatchPublisher(self._reply_prefix.encode(), _api_error)
        elif self.batched:
            self.batched = False
            log.info("bridge %s: nats-py has no raw publish here: one PubAck per message",
                     self.config.name)

    async def _write(self, data: bytes) -> None:
        """Hand a window's HPUB commands to the connection, as `nc.publish` does with one:
        refused when closed; buffered (up to nats-py's pending limit) while reconnecting.

        Connected, with nothing of nats-py's own waiting to be written (its pending
        buffer is empty), the window goes to the socket's transport at once, in order
        after everything nats-py wrote: through nats-py's pending buffer it was written
        only when its flusher task ran, after the forwarder had read its next page (the
        window waited in the buffer while the remote side had nothing to do). The
        transport buffers what the socket does not take; the forwarder's depth bounds it
        (bridge/forward.py)."""
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        transport = nc._transport
        if nc.is_connected and not nc._pending and isinstance(transport, TcpTransport):
            transport.write(data)
            return
        if not nc.is_connected and (nc._max_pending_size <= 0 or len(data)
                                    + nc._pending_data_size > nc._max_pending_size):
            raise nats.errors.OutboundBufferLimitError
        await nc._send_command(data)
        await nc._flush_pending()

    async def _on_ack(self, msg: Any) -> None:
        """A PubAck through nats-py's subscription (when `_process_msg` is not taken)."""
        self._ack(msg.subject[len(self._reply_prefix):].encode(), msg.data,
                  (msg.headers or {}).get("Status"))

    def _ack(self, token: bytes, data: bytes, status: str | None) -> None:
        try:
            entry = self._acks.pop(int(token), None)
        except ValueError:  # not `<n>`: a batch's reply, or nothing of ours
            if self._batches is not None:
                self._batches.on_reply(token, data, status)
            return
        if entry is None:
            return
        window, index = entry
        window.results[index] = _ack_result(data, status)
        window.pending -= 1
        if window.pending <= 0:
            window.finish()

    def _ack_plain(self, token: bytes, data: bytes) -> None:
        """An ack read by `AckReader` (a MSG without headers: no status)."""
        self._ack(token, data, None)

    def _take_acks(self, sid: int) -> None:
        """Read the PubAcks straight from nats-py's parser: its `_process_msg` (what the
        parser calls for every MSG/HMSG) is wrapped on this connection so that a message
        for the ack subscription `sid` goes to `_ack` at once, without nats-py's `Msg`
        object, header parsing, the subscription's queue and the task switch to its
        callback (those were most of the broker's time per ack). Anything else goes on to
        nats-py. Used only when the connection has the (private) method."""
        nc = self._nc
        original = getattr(nc, "_process_msg", None)
        if not callable(original):
            return
        skip = len(self._reply_prefix)
        ack = self._ack

        async def process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes,
                              headers: bytes | None) -> None:
            if msg_sid == sid:
                ack(subject[skip:], data, _status(headers))
                return
            await original(msg_sid, subject, reply, data, headers)

        nc._process_msg = process_msg
        # And before that: plain PubAck MSGs taken from the bytes read, before nats-py's
        # parser (jetstream_acks.py); it still gets everything else, in order.
        parser: Any = getattr(nc, "_ps", None)
        if (callable(getattr(parser, "parse", None)) and isinstance(getattr(parser, "buf", None),
                                                                   bytearray)
                and hasattr(parser, "state")):
            parser.parse = AckReader(parser, parser.parse, sid, self._reply_prefix,
                                     self._ack_plain).feed

    async def ensure_stream(self) -> None:
        """Create the stream (with `allow_batched`) or check the existing one; set
        `batched` when the stream, as the server reports it, allows batches."""
        opts = self.options
        try:
            info = await self._js.stream_info(opts.stream)
        except nats.js.errors.NotFoundError:
            config = api.StreamConfig(
                name=opts.stream, subjects=list(opts.stream_subjects),
                retention=_RETENTION[opts.stream_retention],
                storage=_STORAGE[opts.stream_storage], num_replicas=opts.stream_replicas,
                max_age=float(opts.stream_max_age_s) if opts.stream_max_age_s else None,
                max_bytes=opts.stream_max_bytes or -1,
                duplicate_window=float(opts.duplicate_window_s))
            if _BATCH_FIELD:
                config.allow_batched = True
            info = await self._js.add_stream(config)
            self.created_stream = True
            self.max_msg_size = int(getattr(info.config, "max_msg_size", None) or -1)
            # A server before 2.14 does not know the flag and does not report it back.
            self.batched = bool(getattr(info.config, "allow_batched", False))
            return
        subjects = info.config.subjects or []
        if not any(filter_covers(s, opts.subject_prefix) for s in subjects):
            raise BridgeError(
                f"bridge {self.config.name!r}: the existing stream {opts.stream!r} captures "
                f"{subjects}, not {opts.subject_prefix}.>; the bridge never modifies an "
                "existing stream: add the subject to it, or change subject_prefix")
        self.max_msg_size = int(getattr(info.config, "max_msg_size", None) or -1)
        self.batched = bool(getattr(info.config, "allow_batched", False))
        if not self.batched and (self.config.name, opts.stream) not in _NOTED_UNBATCHED:
            _NOTED_UNBATCHED.add((self.config.name, opts.stream))
            log.info("bridge %s: the existing stream %r does not allow batches "
                     "(allow_batched, nats-server 2.14+): one PubAck per message, which "
                     "costs both sides more during a backlog drain", self.config.name,
                     opts.stream)

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
        return await (await self.submit(batch))

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        """Publish the window now; a future of the number acknowledged from its start
        (`PipelinedSink`, bridge/forward.py). The future raises `Resend` when the server
        answered "no responders" (no stream leader) for its first message or the
        connection was lost before it was acknowledged, `Refused` when the stream refused
        its first message for good, BridgeError for anything else. Raises `Refused` (and
        sends nothing) when the first message is one the server or the stream can never
        take; cuts the window before such a message further on (`written`)."""
        if not batch:
            raise BridgeError("nothing to send")
        if self._js is None:
            raise BridgeError("send before start")
        self.written = len(batch)
        # Over the stream's max_msg_size the window is cut before it: sent, it would end a
        # batch, or be refused in its PubAck and have every window behind it sent again.
        if self._frames is not None:
            self._frames.max_payload = self._nc.max_payload  # the server's (INFO) now
            self._frames.max_msg_size = self.max_msg_size
        if self._batches is not None and not self._batches.disabled:
            return await self._submit_batch(batch, self._batches)
        loop = asyncio.get_running_loop()
        window = _Window(len(batch), loop.create_future())
        acks = self._acks
        first = self._token + 1
        nc = self._nc
        if self._frames is not None:
            # The window as one HPUB blob (jetstream_frames.py), handed to the connection
            # at once: no per-message publish, one socket write.
            frames: list[bytes] = []
            add = self._frames.add
            reply_prefix = self._reply_prefix.encode()
            token = self._token
            for index, message in enumerate(batch):
                # reply: <reply prefix><token>; False: over a limit, cut here
                if not add(frames, message, reply_prefix, token + 1):
                    if not index:
                        kind, why = self._frames.refusal
                        raise Refused(why, kind)
                    break
                token += 1
                acks[token] = (window, index)
            window.sent = self.written = token - self._token
            self._token = token
            try:
                await self._write(b"".join(frames))
            except Exception:
                self._forget(first, window.sent)
                raise
        else:
            sent = 0
            try:
                # No yield to the loop between messages (nc.publish only appends to
                # nats-py's buffer): the window goes out in one socket write.
                for index, message in enumerate(batch):
                    mid = message_id(self.gateway_id, self.store_id, message.offset)
                    headers = message.headers(mid, NATS_MSG_ID)
                    refusal = publish_over_limits(
                        self.subject(message), f"{self._reply_prefix}{self._token + 1}",
                        headers, message.payload, self._nc.max_payload, self.max_msg_size)
                    if refusal is not None:
                        if not index:
                            raise Refused(refusal[1], refusal[0])
                        break
                    self._token += 1
                    acks[self._token] = (window, index)
                    await nc.publish(self.subject(message), message.payload,
                                     reply=f"{self._reply_prefix}{self._token}",
                                     headers=headers)
                    sent += 1
            except Exception:
                self._forget(first + sent, self._token + 1 - first - sent)  # not sent
                if not sent:
                    raise
            window.sent = self.written = sent
        window.pending -= len(batch) - window.sent  # never sent: never acknowledged
        if window.pending <= 0:
            window.finish()
        self._windows.add(window)
        collect = asyncio.ensure_future(self._collect(window))
        # Released when the collect ends in any way (also when it is cancelled before it
        # started: a window the forwarder dropped).
        collect.add_done_callback(lambda _: self._release(window, first))
        return collect

    async def _submit_batch(self, batch: Sequence[BridgeMessage],
                            batches: BatchPublisher) -> asyncio.Future[int]:
        """`submit` of a window as one fast-ingest batch (bridge/jetstream_batch.py); cut
        before a message over a limit (`Refused` when it is the first)."""
        assert self._frames is not None
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        data, window = batches.frames(batch, self._frames, None, done)
        if not window.size:
            kind, why = self._frames.refusal
            raise Refused(why, kind)
        self.written = window.size
        try:
            await self._write(data)
        except Exception:
            batches.release(window)
            raise
        # The window's outcome is settled by a callback of its `done` (no task per window:
        # the forwarder is woken one loop turn after the batch's last reply, not three).
        result: asyncio.Future[int] = loop.create_future()
        timer = loop.call_later(self.ack_timeout, window.finish)  # ends it with what is known
        done.add_done_callback(lambda _: self._settle_batch(window, batches, result, timer))
        result.add_done_callback(lambda _: self._drop_batch(window, batches, done, timer))
        return result

    def _settle_batch(self, window: BatchWindow, batches: BatchPublisher,
                      result: asyncio.Future[int], timer: asyncio.TimerHandle) -> None:
        """The batch ended (its PubAck, an error, the connection lost, or `ack_timeout`):
        `result` is how many from its start are known stored, else why none."""
        timer.cancel()
        batches.release(window)
        if result.done():  # dropped by the forwarder meanwhile
            return
        confirmed = window.confirmed()
        if confirmed > 0:
            result.set_result(confirmed)
            return
        error = (window.error or window.lost
                 or TimeoutError(f"no ack within {self.ack_timeout} s"))
        refused = _refusal(error) if window.error_at == 1 else None
        result.set_exception(refused or (error if isinstance(error, Resend)
                                         else _failed(error)))

    @staticmethod
    def _drop_batch(window: BatchWindow, batches: BatchPublisher, done: asyncio.Future[None],
                    timer: asyncio.TimerHandle) -> None:
        """The forwarder dropped the window (cancelled its result): replies for it are
        ignored from now on."""
        if not done.done():
            timer.cancel()
            batches.release(window)

    def _release(self, window: _Window, first: int) -> None:
        self._windows.discard(window)
        self._forget(first, window.sent)

    def _forget(self, first: int, count: int) -> None:
        acks = self._acks
        for token in range(first, first + count):
            acks.pop(token, None)

    async def _collect(self, window: _Window) -> int:
        """Wait for the window's acks (at most `ack_timeout`); how many from its start."""
        if not window.done.done():
            await asyncio.wait((window.done,), timeout=self.ack_timeout)
        acknowledged = 0
        first_error: BaseException | None = None
        for result in window.results[:window.sent]:
            if result is None:
                first_error = window.lost or TimeoutError(f"no ack within {self.ack_timeout} s")
                break
            if isinstance(result, BaseException):
                first_error = result
                break
            if result:
                self.duplicates += 1
            acknowledged += 1
        if acknowledged == 0:
            if isinstance(first_error, Resend):
                raise first_error
            refused = _refusal(first_error)  # the window's first message, for good
            if refused is not None:
                raise refused
            if first_error is None:
                first_error = BridgeError("nothing sent")
            raise _failed(first_error)
        return acknowledged

    async def _on_disconnect(self) -> None:
        """The connection is lost: acks of what was in flight cannot come any more (a PubAck
        goes to the connection that published), so those windows end now with what was
        acknowledged, instead of at `ack_timeout`; the rest is sent again (same ids)."""
        windows, self._windows = self._windows, set()
        for window in windows:
            window.lost = Resend("connection lost before the ack")
            window.finish()
        if self._batches is not None:
            self._batches.lose_all(Resend("connection lost before the batch's ack"))

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await asyncio.wait_for(nc.close(), 5)
