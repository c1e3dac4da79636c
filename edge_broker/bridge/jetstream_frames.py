"""The NATS protocol bytes of a JetStream uplink window, built here instead of by nats-py.

Why: `nc.publish` per message validated the subject and the reply, iterated the header dict
checking each name against a regular expression, encoded each piece and assembled the HPUB
command from several temporaries: that and the `headers()` dict were the largest share of a
forwarded message's CPU time in the broker (benchmarks/results/h3-bridge.md). Here the
parts that only depend on the topic and the publisher (subject, `mqtt-topic`, `mqtt-qos`,
`mqtt-retain`, `mqtt-client-id`) are encoded once and cached, so a message costs its id, its
publish time and one join; the whole window goes to the connection as one command (one
socket write, as before).

The bytes are exactly what `nats-py` (2.x) would send for `publish(subject, payload,
reply=reply, headers=message.headers(mid, "Nats-Msg-Id"))`: the same HPUB line, the
same `NATS/1.0` header block with the documented headers in the documented order
(bridge/base.py: the message id first, as `Nats-Msg-Id` only), then the payload.
tests/bridge/test_jetstream_frames.py compares them with nats-py's own encoding. Header
values never need nats-py's stripping: they are percent-encoded (no whitespace, no line
breaks), digits, the ISO time, ASCII-only JSON, or the message id (gateway ids are checked
in `FrameBuilder.__init__`).

Limits: `add` refuses (appends nothing, returns False, `refusal` says why) a message the
server can never take, which sent anyway would cost the connection or loop forever:

- an HPUB control line whose arguments (subject, reply subject, the two sizes) are longer
  than nats-server's `max_control_line`, 4,096 bytes by default (MAX_CONTROL_LINE): the
  server answers "-ERR 'Maximum Control Line Exceeded'" and closes the connection; a long
  MQTT topic makes a long subject;
- headers and payload together over the connection's `max_payload` (the server's INFO, 1 MiB
  by default): "-ERR 'Maximum Payload Violation'" and the connection closed;
- over the stream's `max_msg_size` (when the sink knows it, `max_msg_size` > 0): the stream
  refuses it in its PubAck (API error 10054), and would again on every resend;
- a header block over 65,535 bytes (MAX_HEADERS, a JetStream limit: API error 10097).

The sink (bridge/jetstream.py) then cuts the window before that message, and raises
`Refused` when it is the first (bridge/forward.py skips it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .base import (
    H_CLIENT_ID,
    H_CONTENT_TYPE,
    H_PAYLOAD_FORMAT,
    H_PUBLISH_TIME,
    H_QOS,
    H_RETAIN,
    H_TOPIC,
    H_USER_PROPERTIES,
    NATS_MSG_ID,
    BridgeMessage,
    Refused,
    encode_text,
    encode_user_properties,
    format_time,
    message_id,
)

CACHE_SIZE: Final = 4096  # (topic, qos, retain, client id) whose encoded parts are kept
MAX_CONTROL_LINE: Final = 4096  # nats-server's default max_control_line (the arguments)
MAX_HEADERS: Final = 65535  # JetStream refuses a larger header block (API error 10097)
# API errors that refuse one message for good (nats-server errors.json): sent again, it is
# refused again. JSStreamMessageExceedsMaximumErr, JSStreamHeaderExceedsMaximumErr.
REFUSES_MESSAGE: Final = {10054: "max_msg_size", 10097: "max_headers"}
_TOO_LARGE: Final = "message size exceeds maximum allowed"  # servers before err_code: 400
_HPUB_LINE: Final = len(b"HPUB \r\n")  # what a control line has besides its arguments

_HEAD: Final = f"NATS/1.0\r\n{NATS_MSG_ID}: ".encode()
_TIME: Final = f"\r\n{H_PUBLISH_TIME}: ".encode()
_END: Final = b"\r\n\r\n"
_CRLF: Final = b"\r\n"
_FIXED: Final = len(_HEAD) + len(_TIME) + len(_END)  # a header block's own


def _line(name: str, value: str) -> bytes:
    return f"\r\n{name}: {value}".encode()


class FrameBuilder:
    """HPUB commands for one sink: `frame(message, reply)` (see the module docstring), or a
    whole window's with `add` (the pieces appended to one list, joined once per window)."""

    def __init__(self, gateway_id: str, store_id: str,
                 subject: Callable[[BridgeMessage], str], *, max_payload: int = 1 << 62,
                 max_msg_size: int = -1, max_line: int = MAX_CONTROL_LINE) -> None:
        message_id(gateway_id, store_id, 1)  # ValueError for a store id that is not one
        mid_prefix = f"{gateway_id}-{store_id}-"
        if mid_prefix != mid_prefix.strip() or any(c in mid_prefix for c in "\r\n\t "):
            raise ValueError(f"a gateway id has no whitespace, got {gateway_id!r}")
        self.mid_prefix = mid_prefix
        self._mid_prefix = mid_prefix.encode()
        self._subject = subject
        # (topic, qos, retain, client id) -> (b"HPUB <subject> ", the topic..client-id lines)
        self._parts: dict[tuple[str, int, bool, str], tuple[bytes, bytes]] = {}
        self._time_at = -1.0
        self._time = b""
        self.max_payload = max_payload
        """Headers and payload together at most this (the server's INFO `max_payload`)."""
        self.max_msg_size = max_msg_size
        """The stream's `max_msg_size` (headers and payload); 0 or less: no limit."""
        self.max_line = max_line
        """A control line's arguments at most this (nats-server's `max_control_line`)."""
        self.refusal = ("", "")
        """(kind, why) of the last message `add` refused."""

    def _static(self, message: BridgeMessage) -> tuple[bytes, bytes]:
        key = (message.topic, message.qos, message.retain, message.client_id)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= CACHE_SIZE:
                self._parts.clear()
            lines = _line(H_TOPIC, encode_text(message.topic)) + _line(H_QOS, str(message.qos))
            if message.retain:
                lines += _line(H_RETAIN, "1")
            if message.client_id:
                lines += _line(H_CLIENT_ID, encode_text(message.client_id))
            parts = self._parts[key] = (f"HPUB {self._subject(message)} ".encode(), lines)
        return parts

    def frame(self, message: BridgeMessage, reply: str) -> bytes:
        """The HPUB command of `message`, its PubAck to come on `reply` (b"": refused, see
        `add`)."""
        out: list[bytes] = []
        self.add(out, message, reply.encode(), None)
        return b"".join(out)

    def subject_bytes(self, message: BridgeMessage) -> bytes:
        """The subject `message` goes to, encoded (as its HPUB command has it)."""
        return self._static(message)[0][5:-1]

    def add(self, out: list[bytes], message: BridgeMessage, reply: bytes,
            token: int | None, reply_tail: bytes = b"") -> bool:
        """Append the pieces of `message`'s HPUB command to `out`: `b"".join(out)` is the
        window's commands. Its PubAck is to come on `reply` followed by `token` (in decimal;
        None: on `reply`) and `reply_tail` (a batch's reply subject goes on after the token:
        bridge/jetstream_batch.py). Per message only its id, the publish time (when it
        changed), the sizes line and the optional MQTT 5 headers are made; the header
        block's size is added up, not measured on a joined copy.

        False, and nothing appended, for a message over a limit (module docstring;
        `refusal` says which)."""
        hpub, lines = self._static(message)
        mid = b"%s%d" % (self._mid_prefix, message.offset)
        if message.publish_time != self._time_at:  # a window's messages often share it
            self._time_at = message.publish_time
            self._time = format_time(message.publish_time).encode()
        time_value = self._time
        payload = message.payload
        if (message.content_type is not None or message.payload_utf8
                or message.user_properties):
            tail = b""
            if message.content_type is not None:
                tail += _line(H_CONTENT_TYPE, encode_text(message.content_type))
            if message.payload_utf8:
                tail += _line(H_PAYLOAD_FORMAT, "1")
            if message.user_properties:
                tail += _line(H_USER_PROPERTIES,
                              encode_user_properties(message.user_properties))
            size = _FIXED + len(mid) + len(lines) + len(time_value) + len(tail)
            total = size + len(payload)
            sizes = _sizes(token, reply_tail, size, total)
            line = len(hpub) + len(reply) + len(sizes) - _HPUB_LINE
            if (total > self.max_payload or line > self.max_line or size > MAX_HEADERS
                    or 0 < self.max_msg_size < total):
                return self._refuse(size, total, line)
            out += (hpub, reply, sizes, _HEAD, mid, lines, _TIME, time_value, tail, _END,
                    payload, _CRLF)
            return True
        size = _FIXED + len(mid) + len(lines) + len(time_value)
        total = size + len(payload)
        sizes = (b" %d %d\r\n" % (size, total) if token is None
                 else b"%d%s %d %d\r\n" % (token, reply_tail, size, total))
        line = len(hpub) + len(reply) + len(sizes) - _HPUB_LINE
        if (total > self.max_payload or line > self.max_line or size > MAX_HEADERS
                or 0 < self.max_msg_size < total):
            return self._refuse(size, total, line)
        out += (hpub, reply, sizes, _HEAD, mid, lines, _TIME, time_value, _END, payload, _CRLF)
        return True

    def _refuse(self, headers: int, total: int, line: int) -> bool:
        """Say which limit a message is over (`refusal`); False."""
        self.refusal = over_limits(headers, total, line, self.max_payload,
                                   self.max_msg_size, self.max_line) or ("", "")
        return False


def over_limits(headers: int, total: int, line: int, max_payload: int, max_msg_size: int,
                max_line: int = MAX_CONTROL_LINE) -> tuple[str, str] | None:
    """(kind, why) when a message of `headers` bytes of headers, `total` bytes with its
    payload and a control line with `line` bytes of arguments is over a limit (see the
    module docstring), else None."""
    if line > max_line:
        return ("control_line", (
            f"control line exceeds maximum: its NATS control line (subject, reply subject, "
            f"sizes) would be {line:,} bytes, the server's max_control_line is {max_line:,} "
            "(it would close the connection): the MQTT topic is too long for a NATS subject"))
    if total > max_payload:
        return ("max_payload", (f"message size exceeds maximum allowed: {total:,} bytes with "
                                f"its headers, the server's max_payload is {max_payload:,}"))
    if headers > MAX_HEADERS:
        return ("max_headers", (f"header size exceeds maximum allowed: its NATS headers "
                                f"would be {headers:,} bytes, JetStream takes {MAX_HEADERS:,}"))
    if 0 < max_msg_size < total:
        return ("max_msg_size", (f"message size exceeds maximum allowed: {total:,} bytes with "
                                 f"its headers, the stream's max_msg_size is {max_msg_size:,}"))
    return None


def _sizes(token: int | None, tail: bytes, size: int, total: int) -> bytes:
    """The end of the HPUB line: the reply's token and tail (if any), the header and total
    sizes."""
    if token is None:
        return b" %d %d\r\n" % (size, total)
    return b"%d%s %d %d\r\n" % (token, tail, size, total)


def publish_over_limits(subject: str, reply: str, headers: dict[str, str], payload: bytes,
                        max_payload: int, max_msg_size: int) -> tuple[str, str] | None:
    """`over_limits` of a message nats-py's `publish` would send with `headers` (its sizes
    and control line as nats-py makes them)."""
    size = len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode())
                                           for k, v in headers.items())
    total = size + len(payload)
    line = len(f"{subject} {reply} {size} {total}".encode())
    return over_limits(size, total, line, max_payload, max_msg_size)


def refusal_of(error: BaseException | None) -> Refused | None:
    """The `Refused` of an acknowledgement's error (nats-py's APIError: `code`, `err_code`,
    `description`) that refuses its message for good (REFUSES_MESSAGE), else None."""
    err_code = getattr(error, "err_code", None)
    code = getattr(error, "code", None)
    description = getattr(error, "description", None)
    kind = REFUSES_MESSAGE.get(err_code) if isinstance(err_code, int) else None
    if kind is None and code == 400 and description == _TOO_LARGE:
        kind = "max_msg_size"
    if kind is None:
        return None
    refused = Refused(f"JetStream refused it: {description} (code {code}, err_code "
                      f"{err_code})", kind)
    refused.__cause__ = error
    return refused
