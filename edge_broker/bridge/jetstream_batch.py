"""A JetStream uplink window published as one fast-ingest batch (ADR-50, nats-server 2.14+).

Why: with one PubAck per message the uplink process read, parsed and matched a reply per
drained message, and nats-server built and sent it. A fast-ingest batch gets a flow ack
every N messages (N chosen by the server, at most the window's size, at most 500) and one
PubAck for the whole batch: about two replies per window instead of one per message
(benchmarks/results/h7-jsbatch.md). Used only on a stream with `allow_batched` (see
bridge/jetstream.py `ensure_stream`).

The wire protocol (nats-server's stream.go `getFastBatch`, `processJetStreamFastBatchMsg`):
each message of the window is an HPUB as before (same headers, same `Nats-Msg-Id`) with the
reply subject `<inbox>.<batch id>.<flow>.fail.<n>.<op>.$FI`, n = 1, 2, ... its place in the
window, op 0 for the first, 1 for the others. The window ends with an empty message (no
headers, no payload) with n = size + 1 and op 3, "commit without storing this one" (EOB).
The batch id is unique per sink and window (a random prefix and a counter): batch ids are
per stream, shared by every gateway publishing to it. Gap mode "fail": the server stores the
batch's messages in order and stops at the first one it refuses; nothing after it in the
batch is stored.

What comes back on `<inbox>.<batch id>.…`, and what it means here:

- `{"type":"ack","seq":s,"msgs":m}` (flow ack): messages 1..s are stored.
- `{"type":"gap",…}`: informational; the final PubAck follows.
- `{"type":"err","seq":k,"error":{…}}`: message k was refused (e.g. the stream's limits);
  the server ends the batch at k - 1.
- a PubAck error `{"error":{…}}` on message k's reply (e.g. over the stream's
  max_msg_size, checked before the batch is looked at; "batch ID unknown" for every message
  after a refused first one): the same. A `503` status (no responders: no stream captures
  the subject, or its leader is being elected) is a `Resend`.
- the final PubAck `{"stream":…,"seq":…,"batch":id,"count":c}`: messages 1..c are stored
  (duplicates included: a message whose `Nats-Msg-Id` the stream has seen within its
  duplicate window is skipped, silently, and counted as stored).

A window ends with that PubAck, an error on its EOB, an error once everything before it is
known stored, the connection lost (`lose_all`) or `ack_timeout`. Its result is the number
of messages from its start known stored: the PubAck's count, else the highest flow ack, and
never past a refused message. As with one PubAck per message, the forwarder moves its cursor
past exactly those and sends the rest again with the same ids.

A message over a limit of the server or the stream (bridge/jetstream_frames.py: the
control line, `max_payload`, the stream's `max_msg_size`) ends the batch before it: `frames`
builds the batch of the messages before it (none: the sink raises `Refused`). A PubAck error
on message 1 that refuses that message for good (10054, "message size exceeds maximum
allowed", when the stream changed under the sink) is the sink's `Refused` too.

An error "too many batches in flight" (the server's limit per stream, 1000 by default, or in
total) is a `Resend`. "Batch publish is disabled" (someone changed the stream) is a `Resend`
too, and sets `disabled`: the sink goes back to one PubAck per message.

No `nats` import here (this module is compiled into the wheel, whose modules must import
without the extra): the sink turns a server error into its exception (`api_error`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Final

from .base import BridgeMessage, Resend
from .jetstream_frames import FrameBuilder

MAX_FLOW: Final = 500  # the server sends a flow ack at most every 500 messages anyway
TOO_MANY_INFLIGHT: Final = 10211  # JSBatchPublishTooManyInflight (nats-server errors.json)
DISABLED: Final = 10205  # JSBatchPublishDisabledErr
_FIRST: Final = b".0.$FI"
_NEXT: Final = b".1.$FI"
_EOB: Final = b".3.$FI"


class BatchWindow:
    """One window sent as a batch: what has come back for it (see the module docstring)."""

    __slots__ = ("count", "done", "error", "error_at", "flowed", "key", "lost", "size")

    def __init__(self, key: bytes, size: int, done: asyncio.Future[None]) -> None:
        self.key = key
        self.size = size
        self.done = done
        self.flowed = 0  # messages 1..flowed are stored (flow acks)
        self.count = -1  # the final PubAck's count; -1: not come
        self.error_at = 0  # the first message refused; 0: none
        self.error: BaseException | None = None
        self.lost: BaseException | None = None

    def confirmed(self) -> int:
        """How many from the window's start are known stored."""
        stored = self.count if self.count >= 0 else self.flowed
        if self.error_at:
            stored = min(stored, self.error_at - 1)
        return min(stored, self.size)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class BatchPublisher:
    """The batches of one sink (one connection): frames out, replies in. `reply_prefix` is
    the sink's inbox followed by a dot; `api_error` turns a server error object (the
    `error` member of a reply) into the exception to report."""

    def __init__(self, reply_prefix: bytes,
                 api_error: Callable[[object], BaseException]) -> None:
        self.reply_prefix = reply_prefix
        self.api_error = api_error
        self.disabled = False
        """The server said batches are disabled on the stream: back to one PubAck each."""
        self._id = secrets.token_hex(8).encode()  # batch ids are per stream, not per client
        self._serial = 0
        self._windows: dict[bytes, BatchWindow] = {}

    def frames(self, batch: Sequence[BridgeMessage], builder: FrameBuilder,
               eob_subject: str | None, done: asyncio.Future[None]
               ) -> tuple[bytes, BatchWindow]:
        """The window's commands (its messages, then the EOB on `eob_subject`, a subject
        the stream captures; None: the last message's) and its `BatchWindow`, registered
        for the replies. The batch ends before a message the builder refuses (its
        `refusal`): the window's `size` says how many it has; 0 (the first is refused):
        no commands, nothing registered."""
        self._serial += 1
        key = b"%s%d" % (self._id, self._serial)
        size = len(batch)
        reply = b"%s%s.%d.fail." % (self.reply_prefix, key, min(size, MAX_FLOW))
        out: list[bytes] = []
        add = builder.add
        tail = _FIRST
        for seq, message in enumerate(batch, 1):
            if not add(out, message, reply, seq, tail):
                size = seq - 1
                break
            tail = _NEXT
        if not size:
            return b"", BatchWindow(key, 0, done)
        # (Cut short, the flow written in the reply subjects may exceed the batch's size:
        # then no flow ack comes before its PubAck, which is all the window needs.)
        subject = (eob_subject.encode() if eob_subject is not None
                   else builder.subject_bytes(batch[size - 1]))
        out.append(b"PUB %s %s%d%s 0\r\n\r\n" % (subject, reply, size + 1, _EOB))
        window = BatchWindow(key, size, done)
        self._windows[key] = window
        return b"".join(out), window

    def release(self, window: BatchWindow) -> None:
        """The window is collected (or dropped): later replies for it are ignored."""
        self._windows.pop(window.key, None)

    def lose_all(self, error: BaseException) -> None:
        """The connection is lost: no reply can come for what is in flight."""
        for window in self._windows.values():
            window.lost = error
            window.finish()

    def on_reply(self, token: bytes, data: bytes, status: str | None) -> None:
        """A reply on `<inbox>.<token>`, token `<batch id>.<flow>.fail.<n>.<op>.$FI`."""
        parts = token.split(b".")
        window = self._windows.get(parts[0])
        if window is None or len(parts) != 6:
            return  # a window already collected (e.g. "batch ID unknown" after its end)
        if status is not None:
            seq = int(parts[3]) if parts[3].isdigit() else 1
            if status == "503":
                self._refused(window, seq, Resend(
                    "no responders (no stream, or its leader is being elected)"))
            else:
                self._refused(window, seq, Resend(f"JetStream: status {status} on a batch"))
            return
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._refused(window, 1, ValueError(f"JetStream: unreadable batch reply {data!r}"))
            return
        kind = reply.get("type")
        if kind == "ack":
            acked = reply.get("seq")
            if isinstance(acked, int) and acked > window.flowed:
                window.flowed = acked
                if window.error_at and acked >= window.error_at - 1:
                    window.finish()
            return
        if kind == "gap":
            return
        error = reply.get("error")
        if kind == "err":
            refused = reply.get("seq")
            self._refused(window, refused if isinstance(refused, int) and refused > 0 else 1,
                          self._error(error))
            return
        if error is not None:
            self._refused(window, int(parts[3]) if parts[3].isdigit() else 1,
                          self._error(error))
            return
        count = reply.get("count")
        if "batch" in reply and isinstance(count, int):
            window.count = count
            window.finish()

    def _error(self, error: object) -> BaseException:
        code = error.get("err_code") if isinstance(error, dict) else None
        if code == TOO_MANY_INFLIGHT:
            return Resend("JetStream: too many batches in flight on the stream")
        if code == DISABLED:
            self.disabled = True
            return Resend("JetStream: batch publishing was disabled on the stream")
        return self.api_error(error)

    @staticmethod
    def _refused(window: BatchWindow, seq: int, error: BaseException) -> None:
        if not window.error_at or seq < window.error_at:
            window.error_at = seq
            window.error = error
        # Done when nothing more can be learnt: the EOB was refused (no PubAck will come),
        # or everything before the refused message is known stored already.
        if seq > window.size or window.flowed >= window.error_at - 1:
            window.finish()
