"""The message handed to a bridge's sink (`BridgeMessage`), the documented header names and
how their values are written. bridge/base.py re-exports all of it and documents the headers.

This module is compiled in the compiled build (bridge/base.py is not, see
edge_broker/compile_plan.py), so `BridgeMessage` is a native class: the uplink process makes
one per forwarded message, from compiled code (server/bridge_log.py), and the compiled
sinks' code reads its fields directly. It is a plain class with its own `__init__`, not a
dataclass: mypyc leaves a dataclass's generated `__init__` interpreted.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

H_MESSAGE_ID: Final = "edge-message-id"
NATS_MSG_ID: Final = "Nats-Msg-Id"
H_TOPIC: Final = "mqtt-topic"
H_QOS: Final = "mqtt-qos"
H_RETAIN: Final = "mqtt-retain"
H_CLIENT_ID: Final = "mqtt-client-id"
H_PUBLISH_TIME: Final = "mqtt-publish-time"
H_CONTENT_TYPE: Final = "mqtt-content-type"
H_PAYLOAD_FORMAT: Final = "mqtt-payload-format"
H_USER_PROPERTIES: Final = "mqtt-user-properties"


@functools.lru_cache(maxsize=64)
def _format_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def format_time(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds, as in `mqtt-publish-time`. (The part up to the
    second is cached: a window's messages share it, and strftime is a per-message cost.)"""
    frac, whole = math.modf(timestamp)  # rounded to microseconds as datetime does
    micros = round(frac * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    return f"{_format_second(second)}{micros // 1000:03d}Z"


_SAFE: Final = "-._~/:@!$&'()*+,;="


@functools.lru_cache(maxsize=4096)
def encode_text(value: str) -> str:
    """A header value for arbitrary text (see (*) in bridge/base.py's docstring). Cached: the
    same topics and client ids come again and again."""
    return quote(value, safe=_SAFE)


def encode_user_properties(pairs: Sequence[tuple[str, str]]) -> str:
    return json.dumps([list(pair) for pair in pairs], ensure_ascii=True, separators=(",", ":"))


class BridgeMessage:
    """One log entry handed to a sink: what the bridge's cursor reads from the log. Treat it
    as read-only. Equal when all fields but `size` are equal (`size`: the bytes the log
    counts for it, topic + payload + properties).

    The MQTT 5 properties the log keeps (store/log/schema.py `encode_props`: the ones a
    message carries from its publisher to its subscribers) are fields of their own:
    `content_type`, `payload_utf8` (Payload Format Indicator 1), `user_properties`,
    `response_topic`, `correlation_data`; `expires_at` is the log's `expires_at` column (wall
    clock, from the Message Expiry Interval; None: never). The headers of JetStream and Kafka
    carry the first three only; the MQTT upstream sends them all (bridge/mqtt_upstream.py).
    The uplink process's reader (server/bridge_log.py `raw_bridge_message`, JetStream and
    Kafka only) does not read `expires_at`: it is None there."""

    __slots__ = ("client_id", "content_type", "correlation_data", "expires_at", "offset",
                 "payload", "payload_utf8", "publish_time", "qos", "response_topic", "retain",
                 "size", "topic", "user_properties")

    def __init__(self, offset: int, topic: str, payload: bytes, qos: int = 0,
                 retain: bool = False, publish_time: float = 0.0, client_id: str = "",
                 content_type: str | None = None, payload_utf8: bool = False,
                 user_properties: tuple[tuple[str, str], ...] = (), size: int = 0,
                 response_topic: str | None = None, correlation_data: bytes | None = None,
                 expires_at: float | None = None) -> None:
        self.offset = offset
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.publish_time = publish_time
        self.client_id = client_id
        self.content_type = content_type
        self.payload_utf8 = payload_utf8
        self.user_properties = user_properties
        self.size = size
        self.response_topic = response_topic
        self.correlation_data = correlation_data
        self.expires_at = expires_at

    def _key(self) -> tuple[object, ...]:
        return (self.offset, self.topic, self.payload, self.qos, self.retain,
                self.publish_time, self.client_id, self.content_type, self.payload_utf8,
                self.user_properties, self.response_topic, self.correlation_data,
                self.expires_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BridgeMessage):
            return NotImplemented
        return self._key() == other._key()

    def __repr__(self) -> str:
        return (f"BridgeMessage(offset={self.offset!r}, topic={self.topic!r}, "
                f"payload={self.payload!r}, qos={self.qos!r}, retain={self.retain!r}, "
                f"publish_time={self.publish_time!r}, client_id={self.client_id!r}, "
                f"content_type={self.content_type!r}, payload_utf8={self.payload_utf8!r}, "
                f"user_properties={self.user_properties!r}, size={self.size!r}, "
                f"response_topic={self.response_topic!r}, "
                f"correlation_data={self.correlation_data!r}, "
                f"expires_at={self.expires_at!r})")

    def headers(self, mid: str, id_name: str = H_MESSAGE_ID) -> dict[str, str]:
        """The documented headers, in the documented order; the message id first, named
        `id_name` (JetStream: `Nats-Msg-Id`, which takes the place of `edge-message-id`)."""
        out = {id_name: mid, H_TOPIC: encode_text(self.topic), H_QOS: str(self.qos)}
        if self.retain:
            out[H_RETAIN] = "1"
        if self.client_id:
            out[H_CLIENT_ID] = encode_text(self.client_id)
        out[H_PUBLISH_TIME] = format_time(self.publish_time)
        if self.content_type is not None:
            out[H_CONTENT_TYPE] = encode_text(self.content_type)
        if self.payload_utf8:
            out[H_PAYLOAD_FORMAT] = "1"
        if self.user_properties:
            out[H_USER_PROPERTIES] = encode_user_properties(self.user_properties)
        return out
