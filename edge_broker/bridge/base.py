"""What every bridge shares: the message handed to a sink, message ids, header names, the
Sink / DownlinkSource protocols, backoff with jitter, and the registry of kinds. (The message,
the header names and their encoding live in bridge/message.py, compiled in the compiled
build; they are re-exported here.)

Message ids
-----------
Every message forwarded to a central log carries a stable id, `message_id(gateway_id,
store_id, offset)` = `<gateway_id>-<store_id>-<offset>`: the gateway's name, the id of its
store file (random, created with the file, so a store rebuilt from scratch, whose offsets
start again at 1, never reuses an id), and the message's offset in the log. A resend of the
same log entry (after an outage or a crash before the cursor moved) has the same id:
JetStream drops it inside the stream's duplicate window (`Nats-Msg-Id`); Kafka consumers drop
it by the `edge-message-id` header. On JetStream the id is in `Nats-Msg-Id` only (see the
table below). The gateway id may contain "-" (host names do), so read
an id from the right: offset is after the last "-", the store id before it.

Headers
-------
JetStream (NATS headers) and Kafka (record headers) carry the same names and values, but for
the message id's name:

    ======================  ==============================================================
    edge-message-id         Kafka: the message id above. JetStream: not sent; the id is in
                            Nats-Msg-Id (the header JetStream deduplicates by), first
    Nats-Msg-Id             JetStream: the message id above
    mqtt-topic              the original MQTT topic, percent-encoded (*)
    mqtt-qos                "0", "1" or "2": the QoS it was published with
    mqtt-retain             "1" when the PUBLISH had the retain flag, else absent
    mqtt-client-id          the publishing client's id, percent-encoded (*)
    mqtt-publish-time       publish time as recorded in the log: ISO-8601 UTC with
                            milliseconds, e.g. 2026-12-06T01:02:03.456Z
    mqtt-content-type       MQTT 5 Content Type, when set, percent-encoded (*)
    mqtt-payload-format     "1" when the MQTT 5 Payload Format Indicator says UTF-8
    mqtt-user-properties    MQTT 5 user properties, when there are any: a JSON array of
                            [name, value] pairs in their order, repeats kept, ASCII-only
                            JSON (non-ASCII as \\uXXXX escapes)
    ======================  ==============================================================

(*) RFC 3986 percent-encoding of the UTF-8 bytes, leaving letters, digits and
``-._~/:@!$&'()*+,;=`` as they are (`urllib.parse.unquote` reverses it): "sensors/t1" stays
"sensors/t1", "room 1/température" becomes "room%201/temp%C3%A9rature". Why: NATS header
values are one line with no leading or trailing whitespace (nats-py strips them), and NATS
headers cannot repeat a name through nats-py; the same encoding is used for Kafka so one
consumer reads both.

The message data (NATS) or record value (Kafka) is the raw payload.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import unquote

from ..errors import BridgeError
from ..mqtt.properties import Properties
from .config import TlsOptions
from .message import (
    H_CLIENT_ID,
    H_CONTENT_TYPE,
    H_MESSAGE_ID,
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
)

__all__ = ["H_CLIENT_ID", "H_CONTENT_TYPE", "H_MESSAGE_ID", "H_PAYLOAD_FORMAT",
           "H_PUBLISH_TIME", "H_QOS", "H_RETAIN", "H_TOPIC", "H_USER_PROPERTIES",
           "NATS_MSG_ID", "REGISTRY", "Backoff", "BridgeMessage", "DownlinkMessage",
           "DownlinkSource", "OncePerKey", "Reconnect", "Refused", "Resend", "Sink",
           "WarnEvery", "decode_text", "decode_user_properties",
           "encode_text", "encode_user_properties", "format_time", "load_class",
           "message_id", "new_store_id", "parse_message_id", "retry_forever", "shown_topic",
           "ssl_context"]


def message_id(gateway_id: str, store_id: str, offset: int) -> str:
    """`<gateway_id>-<store_id>-<offset>`: stable across resends, unique across stores."""
    if offset < 1:
        raise ValueError(f"log offsets start at 1, got {offset}")
    if not store_id or "-" in store_id:
        raise ValueError(f"a store id is non-empty and has no '-', got {store_id!r}")
    return f"{gateway_id}-{store_id}-{offset}"


def parse_message_id(mid: str) -> tuple[str, str, int]:
    """(gateway_id, store_id, offset) of a message id; ValueError if it is not one."""
    rest, _, offset = mid.rpartition("-")
    gateway, _, store = rest.rpartition("-")
    if not gateway or not store or not offset.isdigit():
        raise ValueError(f"not a message id: {mid!r}")
    return gateway, store, int(offset)


def new_store_id() -> str:
    """A fresh store id: 16 hex digits from the OS's random source (create with the file)."""
    return f"{random.SystemRandom().getrandbits(64):016x}"


def decode_text(value: str) -> str:
    return unquote(value)


def decode_user_properties(value: str) -> tuple[tuple[str, str], ...]:
    """The pairs of an `mqtt-user-properties` header value."""
    pairs = json.loads(value)
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in pairs):
        raise ValueError(f"not a user properties header: {value!r}")
    return tuple((name, val) for name, val in pairs)


@dataclass(frozen=True, slots=True)
class DownlinkMessage:
    """A message read from the remote side, to publish locally, with its remote position.

    The caller stores (`source`, `position`) in the same local transaction as the message,
    then calls `DownlinkSource.ack(message)`. After a crash between the two the remote side
    redelivers it: a position not above the stored one for its source is a duplicate, to be
    acknowledged and not published again. Positions only grow within one source.
    """

    topic: str
    payload: bytes
    source: str
    """Where positions are counted: the JetStream stream, or "<kafka topic>:<partition>"."""
    position: int
    """JetStream stream sequence, Kafka offset, MQTT: a local counter."""
    qos: int = 1
    retain: bool = False
    user_properties: tuple[tuple[str, str], ...] = ()
    handle: object = field(default=None, compare=False, repr=False)
    """The client library's message, for `ack`."""
    properties: Properties | None = None
    """MQTT upstream (5.0): the PUBLISH's properties as received, published with the message
    (the core keeps those a message carries to its subscribers, and its expiry); None:
    `user_properties` only (JetStream, Kafka headers)."""


class Resend(BridgeError):
    """Raised for a window none of which was acknowledged while the connection stays usable
    (the server answered "no responders", as JetStream does while a stream elects a leader;
    the client reconnected and what was in flight is lost): the forwarder sends again from
    its cursor after a backoff delay, on the same connection."""


class Reconnect(BridgeError):
    """Raised by a sink's `send` before it writes anything, or by its `wait_lost`, when the
    sink wants a new connection although this one works: an MQTT bridge connected to a
    backup address whose first address answers again (bridge/mqtt_servers.py). The
    forwarder closes the sink normally and starts the next one at once: no failure, no
    backoff delay."""


class Refused(BridgeError):
    """Raised by a sink's `send` / `submit` (or by the future `submit` returns) when the
    FIRST message of the window is one the remote side can never take: larger than the
    server allows, a NATS control line too long for it, a per-message refusal in the
    acknowledgement (JetStream API error 10054, "message size exceeds maximum allowed").
    Nothing of the window was sent, or nothing after that message counts. The forwarder
    moves its cursor past exactly that message (as after an acknowledgement), counts it in
    `refused`, logs a warning and goes on at once: no failure, no backoff.

    A sink that finds such a message further into a window sends only the messages before
    it (`written`, bridge/forward.py), so that message starts the next window. `kind` names
    the limit (the log's rate limit is per kind)."""

    def __init__(self, reason: str, kind: str = "refused") -> None:
        super().__init__(reason)
        self.kind = kind


class WarnEvery:
    """Warnings of one kind at most once per `interval_s`; the lines held back meanwhile
    are counted and told in the next line of that kind ("N more like it"). For a warning
    that a stream of messages can repeat fast (in server/ there is droplog.py)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last line at, held back)

    def warn(self, kind: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless a line of `kind` was logged less than `interval_s` ago
        (then count it); True when logged."""
        now = self.clock()
        at, held = self._kinds.get(kind, (-self.interval_s - 1.0, 0))
        if now - at < self.interval_s:
            self._kinds[kind] = (at, held + 1)
            return False
        if held:
            msg += " (and %d more like it in the %.0f s before, not logged)"
            args = (*args, held, now - at)
        self.logger.warning(msg, *args)
        self._kinds[kind] = (now, 0)
        return True


class OncePerKey:
    """Remembers up to `limit` keys: `first(key)` is True the first time a key is seen (log
    it then), False after. The `limit`-th key sets `full` (say so in its line): no key is
    new after it."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self.full = False

    def first(self, key: str) -> bool:
        key = key[:256]  # a topic may have 65,535 characters: 1,000 of them kept in full
        if self.full or key in self._seen:
            return False
        self._seen.add(key)
        self.full = len(self._seen) >= self.limit
        return True


def shown_topic(topic: str, limit: int = 200) -> str:
    """A topic for a log line: repr, cut after `limit` characters (a topic may have 65,535)."""
    if len(topic) <= limit:
        return repr(topic)
    return f"{topic[:limit]!r}... ({len(topic):,} characters)"


class Sink(Protocol):
    """The uplink side of a bridge: a window of log entries out, acknowledgements back."""

    async def start(self) -> None:
        """Connect (and create or check the remote stream). Raises on failure."""

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        """Send the batch, in order, all at once; return how many from the start of the batch
        the remote side acknowledged (the cursor may move past exactly that many). Raises when
        the connection is lost before any was acknowledged."""

    async def close(self) -> None: ...


class DownlinkSource(Protocol):
    """The downlink side: remote messages in, remote acknowledgement after the local commit."""

    def messages(self) -> AsyncIterator[DownlinkMessage]: ...

    async def ack(self, message: DownlinkMessage) -> None: ...

    async def close(self) -> None: ...


def ssl_context(tls: TlsOptions) -> ssl.SSLContext | None:
    """The client TLS context of a bridge (CA, client certificate), or None for plain TCP."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


# --------------------------------------------------------------------------- backoff


class Backoff:
    """Exponential backoff with full jitter: the n-th delay (n from 0) is uniform in
    [0, min(cap, initial * 2**n)] ("full jitter", so hundreds of gateways reconnecting after
    a central outage do not arrive in lockstep). `reset()` after a success.

    `rand` returns a float in [0, 1); inject one in tests.
    """

    def __init__(self, initial: float = 1.0, cap: float = 60.0,
                 rand: Callable[[], float] = random.random) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"need 0 < initial <= cap, got {initial}, {cap}")
        self.initial = initial
        self.cap = cap
        self._rand = rand
        self.attempt = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        if self.attempt >= 64:
            return self.cap
        return min(self.cap, self.initial * (1 << self.attempt))

    def next_delay(self) -> float:
        delay = self._rand() * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def retry_forever(step: Callable[[], Awaitable[None]], backoff: Backoff,
                        sleep: Callable[[float], Awaitable[None]],
                        on_error: Callable[[BaseException], None]) -> None:
    """Run `step` until it returns; after each failure report it and sleep a backoff delay."""
    while True:
        try:
            await step()
            backoff.reset()
            return
        except Exception as exc:
            on_error(exc)
            await sleep(backoff.next_delay())


# kind -> ("module:Sink class", "module:downlink class"); imported only when a bridge of
# that kind is built (call `config.require_extras` first for a clear error).
REGISTRY: Final[dict[str, tuple[str, str]]] = {
    "jetstream": ("edge_broker.bridge.jetstream:JetStreamSink",
                  "edge_broker.bridge.jetstream_downlink:JetStreamDownlink"),
    "kafka": ("edge_broker.bridge.kafka:KafkaSink", "edge_broker.bridge.kafka:KafkaDownlink"),
    # One MQTT connection carries both directions.
    "mqtt": ("edge_broker.bridge.mqtt_upstream:MqttUpstream",
             "edge_broker.bridge.mqtt_upstream:MqttUpstream"),
}


def load_class(kind: str, *, downlink: bool = False) -> type:
    """The sink (or downlink) class of a bridge kind, imported now."""
    module_name, _, class_name = REGISTRY[kind][1 if downlink else 0].partition(":")
    cls: type = getattr(importlib.import_module(module_name), class_name)
    return cls
