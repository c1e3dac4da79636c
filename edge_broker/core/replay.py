"""Replayed stream history at QoS 0, encoded straight from the stored row.

A `$stream/` subscription's history (core/streams.py) arrives as rows of the log, each with
its topic, payload and the message's properties in their MQTT 5 wire form, as the store keeps
them (store/log/schema.py `encode_props`). A row delivered at QoS 0 without an expiry needs no
`Message`, `Delivery`, `Properties` or `Publish`: its PUBLISH is one join of bytes 3.3 (5.0),
3.3 (3.1.1):

    fixed header | remaining length | topic (length-prefixed, once per topic and page)
    | property length | stored properties | Subscription Identifier | stream-offset
    | payload

where the stored properties are the row's own (Property Length stripped), the Subscription
Identifier 3.3.2.3.8 (5.0) is the subscription's, and `stream-offset` is the user property
3.3.2.3.7 (5.0) that names the offset. MQTT 3.1.1 has no properties: fixed header, topic,
payload. `EncodedPublish` carries the bytes to the connection, which sends them as they are
when it may (`Connection.shares_publish_encoding`: no outbound topic aliases; the server checks
ACLs on `as_publish()`), else sends `as_publish()`, the same message as a `Publish`.

Rows as the store reads them (`StoredRow`): offset, publish time, topic id, QoS, retain,
payload, properties (wire form, or None), origin (client id, for No Local), expires_at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ..mqtt.packets import Publish
from ..mqtt.properties import NO_PROPERTIES, Properties, decode_properties, encode_properties
from ..mqtt.types import PacketType
from ..mqtt.wire import Reader, encode_u16, encode_varint

if TYPE_CHECKING:
    from .changes import Message

# (offset, at, topic id, qos, retain, payload, properties or None, origin, expires_at)
StoredRow = tuple[Any, ...]

STREAM_OFFSET_KEY: Final = "stream-offset"
# The user property's identifier (0x26) and key, encoded once: 3.3.2.3.7 (5.0).
_OFFSET_HEAD: Final = b"\x26" + encode_u16(len(STREAM_OFFSET_KEY)) + STREAM_OFFSET_KEY.encode()
_SUBSCRIPTION_IDENTIFIER: Final = b"\x0b"  # 3.3.2.3.8 (5.0)


class EncodedPublish:
    """A QoS 0 PUBLISH of a replayed history, already encoded for the subscriber's protocol
    level (`data`), with what `as_publish` needs to build the same message as a packet."""

    __slots__ = ("data", "offset", "payload", "properties", "retain", "subscription_ids",
                 "topic", "v5")

    def __init__(self, data: bytes, offset: int, topic: str, payload: bytes, retain: bool,
                 properties: bytes | None, subscription_ids: tuple[int, ...],
                 v5: bool) -> None:
        self.data = data
        self.offset = offset
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.properties = properties  # the stored wire form (Property Length first) or None
        self.subscription_ids = subscription_ids
        self.v5 = v5

    # Read by the server as of a Publish (ACL checks, logging).
    @property
    def qos(self) -> int:
        return 0

    @property
    def packet_id(self) -> int | None:
        return None

    def for_level(self, v5: bool) -> EncodedPublish:
        """The same message encoded for the other protocol level (a persistent session
        that reconnected with another version while its history was buffered)."""
        if v5 == self.v5:
            return self
        head = topic_head(self.topic)
        sid = self.subscription_ids[0] if self.subscription_ids else 0
        data = (encode_v5(head, self.offset, self.retain, self.payload,
                          properties_body(self.properties),
                          subscription_identifier(sid) if sid else b"")
                if v5 else encode_v311(head, self.retain, self.payload))
        return EncodedPublish(data, self.offset, self.topic, self.payload, self.retain,
                              self.properties, self.subscription_ids, v5)

    def as_publish(self) -> Publish:
        """The same message as a `Publish`, for `Connection.send`."""
        if not self.v5:
            return Publish(self.topic, self.payload, 0, self.retain)  # 3.1.1: no properties
        p = stored_properties(self.properties)
        return Publish(self.topic, self.payload, 0, self.retain, False, None, Properties(
            payload_format_indicator=p.payload_format_indicator,
            content_type=p.content_type, response_topic=p.response_topic,
            correlation_data=p.correlation_data,
            subscription_identifiers=self.subscription_ids,
            user_properties=(*p.user_properties, (STREAM_OFFSET_KEY, str(self.offset)))))


def stored_properties(blob: bytes | None) -> Properties:
    """The properties of a stored row (their wire form, Property Length first)."""
    if not blob:
        return NO_PROPERTIES
    return decode_properties(Reader(blob), PacketType.PUBLISH)


def properties_body(blob: bytes | None) -> bytes:
    """A stored properties blob without its Property Length (a Variable Byte Integer)."""
    if not blob:
        return b""
    i = 0
    while blob[i] & 0x80:
        i += 1
    return blob[i + 1:]


def topic_head(topic: str) -> bytes:
    """The Topic Name as a PUBLISH carries it: length, then UTF-8 (1.5.4)."""
    raw = topic.encode("utf-8")
    return encode_u16(len(raw)) + raw


def encode_v5(head: bytes, offset: int, retain: bool, payload: bytes, stored: bytes,
              extra: bytes) -> bytes:
    """A QoS 0 PUBLISH 3.3 (5.0): `stored` is the row's properties body, `extra` the
    Subscription Identifier (or b""); the `stream-offset` user property goes last."""
    text = str(offset).encode()
    body = b"".join((stored, extra, _OFFSET_HEAD, encode_u16(len(text)), text))
    length = encode_varint(len(body))
    return b"".join((b"\x31" if retain else b"\x30",
                     encode_varint(len(head) + len(length) + len(body) + len(payload)),
                     head, length, body, payload))


def encode_v311(head: bytes, retain: bool, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH 3.3 (3.1.1): no properties, no packet identifier."""
    return b"".join((b"\x31" if retain else b"\x30",
                     encode_varint(len(head) + len(payload)), head, payload))


def subscription_identifier(subscription_id: int) -> bytes:
    return _SUBSCRIPTION_IDENTIFIER + encode_varint(subscription_id)


def rows_of(messages: list[Message]) -> tuple[list[StoredRow], dict[int, str]]:
    """Messages (with their offsets) as the store would hand them back: rows, and the names
    of the rows' topic ids (tests and tools feed the core pages of messages)."""
    topics: dict[int, str] = {}
    ids: dict[str, int] = {}
    rows: list[StoredRow] = []
    for m in messages:
        tid = ids.get(m.topic)
        if tid is None:
            tid = ids[m.topic] = len(ids)
            topics[tid] = m.topic
        props = (None if m.properties is NO_PROPERTIES
                 else encode_properties(m.properties, PacketType.PUBLISH))
        rows.append((m.offset, m.received_at, tid, m.qos, m.retain, m.payload,
                     None if props == b"\x00" else props, m.origin, m.expires_at))
    return rows, topics
