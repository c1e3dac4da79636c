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
    encode_text,
    encode_user_properties,
    format_time,
    message_id,
)

CACHE_SIZE: Final = 4096  # (topic, qos, retain, client id) whose encoded parts are kept

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
                 subject: Callable[[BridgeMessage], str]) -> None:
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
        """The HPUB command of `message`, its PubAck to come on `reply`."""
        out: list[bytes] = []
        self.add(out, message, reply.encode(), None)
        return b"".join(out)

    def add(self, out: list[bytes], message: BridgeMessage, reply: bytes,
            token: int | None, reply_tail: bytes = b"") -> None:
        """Append the pieces of `message`'s HPUB command to `out`: `b"".join(out)` is the
        window's commands. Its PubAck is to come on `reply` followed by `token` (in decimal;
        None: on `reply`) and `reply_tail` (a batch's reply subject goes on after the token:
        bridge/jetstream_batch.py). Per message only its id, the publish time (when it
        changed), the sizes line and the optional MQTT 5 headers are made; the header
        block's size is added up, not measured on a joined copy."""
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
            sizes = _sizes(token, reply_tail, size, size + len(payload))
            out += (hpub, reply, sizes, _HEAD, mid, lines, _TIME, time_value, tail, _END,
                    payload, _CRLF)
            return
        size = _FIXED + len(mid) + len(lines) + len(time_value)
        sizes = (b" %d %d\r\n" % (size, size + len(payload)) if token is None
                 else b"%d%s %d %d\r\n" % (token, reply_tail, size, size + len(payload)))
        out += (hpub, reply, sizes, _HEAD, mid, lines, _TIME, time_value, _END, payload, _CRLF)


def _sizes(token: int | None, tail: bytes, size: int, total: int) -> bytes:
    """The end of the HPUB line: the reply's token and tail (if any), the header and total
    sizes."""
    if token is None:
        return b" %d %d\r\n" % (size, total)
    return b"%d%s %d %d\r\n" % (token, tail, size, total)
