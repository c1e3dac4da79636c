"""The record format of the QoS 0 lane's rows (store/log/lane_file.py): written by the broker
(`LaneBatch`, server/bridge_lane.py), read by the uplink process (`decode_records`, through
`lane_file.load_blob`).

A row's blob is one format byte (`FORMAT`, 0x01; a pickle, the format of earlier versions,
starts with 0x80) followed by its messages, each

    head      <BdIHH   flags, publish time, payload length, topic length, client id length
              or <BI   flags (with SHORT), payload length: topic, client id and publish
                       time are the previous message's (one publisher, one topic, a read's
                       messages share their time: the common case)
    topic     UTF-8    absent when flags has SAME_TOPIC (the previous message's topic)
    client id UTF-8    absent when flags has SAME_ORIGIN (the previous message's client id)
    payload
    [props]   <BHI     when flags has PROPS: its flags (CONTENT_TYPE, UTF8), content type
                       length, user property pairs; then the content type (UTF-8), then
                       each pair as <HH (name, value lengths) and the two strings

what the bridge's headers carry (bridge/base.py `BridgeMessage`). Lengths are those of the
encoded strings; MQTT bounds topics, client ids, content types and user property strings
to 65,535 bytes, the payload to 256 MiB. Written with struct and joined once per row; a
repeated topic or client id costs nothing after its first message.

Decoding checks every length against the blob and every flag bit: a damaged blob raises
ValueError (which `load_blob` reports as StoreError naming the file, table and row), it
never reads past the blob or returns a shortened record.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final

from ...mqtt.properties import NO_PROPERTIES

if TYPE_CHECKING:
    from ...core.changes import Message

FORMAT: Final = 1  # the first byte of a blob in this format
_FORMAT_BYTES: Final = bytes([FORMAT])

RETAIN: Final = 1
SAME_TOPIC: Final = 2
SAME_ORIGIN: Final = 4
PROPS: Final = 8
SHORT: Final = 16  # a short head: topic, client id and publish time the previous message's
_FLAGS: Final = RETAIN | SAME_TOPIC | SAME_ORIGIN | PROPS
_SHORT_FLAGS: Final = RETAIN | PROPS | SHORT

CONTENT_TYPE: Final = 1
UTF8: Final = 2
_PROP_FLAGS: Final = CONTENT_TYPE | UTF8

_HEAD: Final = struct.Struct("<BdIHH")
_SHORT: Final = struct.Struct("<BI")
# The short heads made (flags and payload length -> the packed head): payload sizes repeat
# (a sensor's readings), and a dict lookup costs a fifth of a struct.pack. Bounded: cleared
# when full.
_SHORT_HEADS: Final[dict[int, bytes]] = {}
_SHORT_HEADS_MAX: Final = 1024
_PROPS: Final = struct.Struct("<BHI")
_PAIR: Final = struct.Struct("<HH")


class LaneBatch:
    """The messages of one lane row being gathered (one or more loop turns' worth)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = [_FORMAT_BYTES]
        self.count = 0
        self.size = 1  # bytes of the blob so far
        self.first_at = 0.0  # publish time of the first message
        self._topic = ""
        self._origin = ""
        self._at = 0.0
        self._started = False  # a message is in (its topic and client id are known)

    def add(self, messages: list[Message], skip_origin: str) -> int:
        """Encode the messages (those from `skip_origin`, the bridge's own downlink, left
        out: not sent back up). Returns how many were added."""
        parts = self.parts
        pack = _HEAD.pack
        short = _SHORT.pack
        heads = _SHORT_HEADS
        topic_was = self._topic
        origin_was = self._origin
        at_was = self._at
        started = self._started
        added = 0
        size = 0
        for m in messages:
            origin = m.origin
            if origin == skip_origin:
                continue
            topic = m.topic
            payload = m.payload
            at = m.received_at
            flags = RETAIN if m.retain else 0
            if started and topic == topic_was and origin == origin_was and at == at_was:
                # the common case (one publisher, one topic, a read's messages share their
                # time): a short head
                props = m.properties
                psize = len(payload)
                if props is NO_PROPERTIES:
                    flags |= SHORT
                else:
                    flags |= SHORT | PROPS
                key = psize << 8 | flags
                head_or_none = heads.get(key)
                if head_or_none is None:
                    if len(heads) >= _SHORT_HEADS_MAX:
                        heads.clear()
                    head = heads[key] = short(flags, psize)
                else:
                    head = head_or_none
                parts.append(head)
                parts.append(payload)
                size += _SHORT.size + psize
                if flags & PROPS:
                    size += _add_props(parts, props.content_type,
                                       props.payload_format_indicator == 1,
                                       props.user_properties)
                added += 1
                continue
            at_was = at
            if started and topic == topic_was:
                flags |= SAME_TOPIC
                topic_bytes = b""
            else:
                topic_bytes = topic.encode()
                topic_was = topic
            if started and origin == origin_was:
                flags |= SAME_ORIGIN
                origin_bytes = b""
            else:
                origin_bytes = origin.encode()
                origin_was = origin
            props = m.properties
            if props is not NO_PROPERTIES:
                flags |= PROPS
            if not started:
                started = True
                self.first_at = at
            head = pack(flags, at, len(payload), len(topic_bytes), len(origin_bytes))
            parts.append(head)
            if topic_bytes:
                parts.append(topic_bytes)
            if origin_bytes:
                parts.append(origin_bytes)
            parts.append(payload)
            size += len(head) + len(topic_bytes) + len(origin_bytes) + len(payload)
            if flags & PROPS:
                size += _add_props(parts, props.content_type,
                                   props.payload_format_indicator == 1,
                                   props.user_properties)
            added += 1
        self._topic = topic_was
        self._origin = origin_was
        self._at = at_was
        self._started = started
        self.count += added
        self.size += size
        return added

    def take(self) -> tuple[int, float, bytes]:
        """(count, publish time of the first, blob) of what was added; starts a new row."""
        out = (self.count, self.first_at, b"".join(self.parts))
        self.parts = [_FORMAT_BYTES]
        self.count = 0
        self.size = 1
        self.first_at = 0.0
        self._topic = ""
        self._origin = ""
        self._at = 0.0
        self._started = False
        return out


def _add_props(parts: list[bytes], content_type: str | None, utf8: bool,
               user_properties: tuple[tuple[str, str], ...]) -> int:
    flags = UTF8 if utf8 else 0
    ct = b""
    if content_type is not None:
        flags |= CONTENT_TYPE
        ct = content_type.encode()
    head = _PROPS.pack(flags, len(ct), len(user_properties))
    parts.append(head)
    parts.append(ct)
    size = len(head) + len(ct)
    for name, value in user_properties:
        n = name.encode()
        v = value.encode()
        parts.append(_PAIR.pack(len(n), len(v)))
        parts.append(n)
        parts.append(v)
        size += _PAIR.size + len(n) + len(v)
    return size


def encode_records(messages: list[Message], skip_origin: str) -> tuple[int, float, bytes]:
    """One row's (count, publish time of the first, blob) of the messages."""
    batch = LaneBatch()
    batch.add(messages, skip_origin)
    return batch.take()


def _text(blob: bytes, pos: int, size: int, what: str) -> str:
    end = pos + size
    if end > len(blob):
        raise ValueError(f"{what} runs past the end of the row")
    return blob[pos:end].decode()


def decode_records(blob: bytes) -> list[tuple[Any, ...]]:
    """The records of a blob in this format, as (topic, payload, retain, client id, publish
    time, None or (content type, payload is UTF-8, user properties)). ValueError (or
    UnicodeDecodeError, a ValueError) for a damaged blob."""
    if not blob or blob[0] != FORMAT:
        raise ValueError("not a lane row of format 1")
    out: list[tuple[Any, ...]] = []
    end = len(blob)
    pos = 1
    topic: str | None = None
    origin: str | None = None
    at = 0.0
    while pos < end:
        flags = blob[pos]
        if flags & SHORT:
            if pos + 5 > end:
                raise ValueError(f"a message header cut short at byte {pos}")
            # (<BI written out: no call, no tuple per message)
            psize = (blob[pos + 1] | blob[pos + 2] << 8 | blob[pos + 3] << 16
                     | blob[pos + 4] << 24)
            if flags & ~_SHORT_FLAGS or topic is None or origin is None:
                raise ValueError(f"a short header without a message before it or with "
                                 f"unknown flags {flags:#x} at byte {pos}")
            pos += _SHORT.size
        else:
            pos, flags, at, psize, topic, origin = _full_head(blob, pos, topic, origin)
        if pos + psize > end:
            raise ValueError("a payload runs past the end of the row")
        payload = blob[pos:pos + psize]
        pos += psize
        props: tuple[Any, ...] | None = None
        if flags & PROPS:
            props, pos = _read_props(blob, pos)
        out.append((topic, payload, bool(flags & RETAIN), origin, at, props))
    return out


def _full_head(blob: bytes, pos: int, topic: str | None,
               origin: str | None) -> tuple[int, int, float, int, str, str]:
    """A message's full head and its topic and client id: (position after them, flags,
    publish time, payload length, topic, client id)."""
    end = len(blob)
    head_size = _HEAD.size
    if pos + head_size > end:
        raise ValueError(f"a message header cut short at byte {pos}")
    flags, at, psize, tsize, osize = _HEAD.unpack_from(blob, pos)
    if flags & ~_FLAGS:
        raise ValueError(f"unknown flags {flags:#x} at byte {pos}")
    pos += head_size
    if flags & SAME_TOPIC:
        if topic is None or tsize:
            raise ValueError(f"a repeated topic without one before it at byte {pos}")
    else:
        topic = _text(blob, pos, tsize, "a topic")
        pos += tsize
    if flags & SAME_ORIGIN:
        if origin is None or osize:
            raise ValueError(f"a repeated client id without one before it at byte {pos}")
    else:
        origin = _text(blob, pos, osize, "a client id")
        pos += osize
    return pos, flags, at, psize, topic, origin


def _read_props(blob: bytes, pos: int) -> tuple[tuple[Any, ...], int]:
    end = len(blob)
    if pos + _PROPS.size > end:
        raise ValueError("properties cut short")
    flags, ct_size, pairs = _PROPS.unpack_from(blob, pos)
    if flags & ~_PROP_FLAGS or (ct_size and not flags & CONTENT_TYPE):
        raise ValueError(f"unknown property flags {flags:#x} at byte {pos}")
    pos += _PROPS.size
    content_type: str | None = None
    if flags & CONTENT_TYPE:
        content_type = _text(blob, pos, ct_size, "a content type")
        pos += ct_size
    if pairs * _PAIR.size > end - pos:  # each pair takes at least its lengths
        raise ValueError("user properties run past the end of the row")
    user: list[tuple[str, str]] = []
    for _ in range(pairs):
        if pos + _PAIR.size > end:
            raise ValueError("user properties cut short")
        nsize, vsize = _PAIR.unpack_from(blob, pos)
        pos += _PAIR.size
        name = _text(blob, pos, nsize, "a user property name")
        pos += nsize
        value = _text(blob, pos, vsize, "a user property value")
        pos += vsize
        user.append((name, value))
    return (content_type, bool(flags & UTF8), tuple(user)), pos
