"""Seed packets and mutations for the fuzz campaign (tests/fuzz_campaign.py).

Seeds are valid packets of every type for MQTT 3.1 (level 3), 3.1.1 (4) and 5.0 (5), built with
the project's codec. A mutation takes one seed (or two, to splice them) and returns bytes that
are usually invalid: bit flips, byte changes, inserts, deletes, truncation, a tampered
Remaining Length, splicing, repetition, a changed packet type or flags, and on 5.0 tampered
properties (an inserted property of any identifier, a wrong property length). Structural
mutations re-frame the body with a correct Remaining Length so the broker parses into it.

Everything is a function of a `random.Random`, so a case is reproduced from the campaign seed
and the case number.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

from edge_broker.mqtt.codec import encode
from edge_broker.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from edge_broker.mqtt.properties import Properties

LEVELS: Final = (3, 4, 5)
PINGREQ: Final = b"\xc0\x00"
TOPICS: Final = ("fz/a", "fz/b/c", "fz/+/c", "fz/#", "$share/g/fz/a", "fz", "")
_INTERESTING: Final = (0x00, 0x01, 0x02, 0x7F, 0x80, 0x81, 0xFE, 0xFF, 0x3F, 0x40, 0xC0)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    return bytes((first & 0xFF,)) + varint(len(body)) + body


def split(data: bytes) -> tuple[int, bytes] | None:
    """(first byte, body) of a single well-framed packet, else None."""
    if len(data) < 2:
        return None
    value = shift = 0
    pos = 1
    while True:
        if pos >= len(data) or pos > 4:
            return None
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if pos + value != len(data):
        return None
    return data[0], data[pos:]


def frames_state(data: bytes) -> str:
    """How the broker will see `data`: "complete" (whole packets), "incomplete" (the last one
    waits for more bytes) or "broken" (a Remaining Length of 5 bytes: refused at once)."""
    pos = 0
    while pos < len(data):
        value = shift = 0
        cursor = pos + 1
        while True:
            if cursor >= len(data):
                return "incomplete"
            if cursor - pos > 4:
                return "broken"
            byte = data[cursor]
            cursor += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        pos = cursor + value
        if pos > len(data):
            return "incomplete"
    return "complete"


# --------------------------------------------------------------------------- seeds


def connect_packet(level: int, client_id: str, rng: random.Random | None = None, *,
                   maximum_packet_size: int | None = None) -> Packet:
    """A valid CONNECT; with `rng`, with a random will, credentials and (5.0) properties."""
    if rng is None:
        props = Properties(maximum_packet_size=maximum_packet_size) if level == 5 else (
            Properties())
        return Connect(client_id, level, True, 60, properties=props)
    will = None
    if rng.random() < 0.4:
        will_props = Properties(will_delay_interval=rng.choice((0, 1, 5)),
                                content_type="text/plain") if level == 5 else Properties()
        will = Will(rng.choice(TOPICS[:2]), b"gone", rng.randint(0, 2), rng.random() < 0.3,
                    will_props)
    username = "user" if rng.random() < 0.3 else None
    password = b"secret" if username and rng.random() < 0.5 else None
    props = Properties()
    if level == 5:
        props = Properties(session_expiry_interval=rng.choice((None, 0, 10)),
                           receive_maximum=rng.choice((None, 1, 5, 100)),
                           maximum_packet_size=maximum_packet_size or rng.choice(
                               (None, 64, 1024, 268435460)),
                           topic_alias_maximum=rng.choice((None, 0, 3)),
                           request_problem_information=rng.choice((None, 0, 1)),
                           user_properties=(("k", "v"),) if rng.random() < 0.3 else ())
    return Connect(client_id, level, rng.random() < 0.9, rng.choice((0, 5, 60)), username,
                   password, will, props)


def _v5(level: int, props: Properties) -> Properties:
    return props if level == 5 else Properties()


def seed_packets(level: int) -> list[Packet]:
    """Valid packets of every type (as a client would send them, and the server-only ones)."""
    user = (("fuzz", "1"),)
    pub_props = _v5(level, Properties(message_expiry_interval=30, content_type="a/b",
                                      response_topic="fz/r", correlation_data=b"c",
                                      payload_format_indicator=1, user_properties=user))
    alias = _v5(level, Properties(topic_alias=1))
    reason = _v5(level, Properties(reason_string="why", user_properties=user))
    packets: list[Packet] = [
        Publish("fz/a", b"payload", 0),
        Publish("fz/a", b"x" * 40, 1, packet_id=11),
        Publish("fz/b/c", b"two", 2, True, packet_id=12, properties=pub_props),
        Publish("fz/a", b"", 1, True, True, packet_id=13),
        PubAck(11), PubRec(12), PubRel(12), PubComp(12),
        Subscribe(21, (Subscription("fz/#", 1),)),
        Subscribe(22, (Subscription("fz/+/c", 2), Subscription("fz/a", 0)),
                  _v5(level, Properties(subscription_identifiers=(7,), user_properties=user))),
        Unsubscribe(23, ("fz/#", "fz/a")),
        PingReq(), Disconnect(),
        ConnAck(), SubAck(21, (1,)), UnsubAck(23, (0, 0) if level == 5 else ()), PingResp(),
    ]
    if level == 5:
        packets += [
            Publish("fz/a", b"alias", 0, properties=alias),
            PubAck(11, 0x10, reason), PubRec(12, 0x80, reason), PubRel(12, 0x92),
            PubComp(12, 0, reason),
            Subscribe(24, (Subscription("$share/g/fz/a", 1),
                           Subscription("fz/b", 2, True, True, 2))),
            Disconnect(0x04, Properties(session_expiry_interval=0, reason_string="bye")),
            Auth(0x18, Properties(authentication_method="m", authentication_data=b"d")),
        ]
    return packets


def seed_bytes(level: int) -> list[bytes]:
    rng = random.Random(level)
    packets = seed_packets(level) + [connect_packet(level, f"fz-seed-{level}", rng)
                                     for _ in range(3)]
    return [encode(packet, level) for packet in packets]


SEEDS: Final = {level: seed_bytes(level) for level in LEVELS}


# --------------------------------------------------------------------------- mutations

Mutation = Callable[[random.Random, bytes, int], bytes]


def _flip_bits(rng: random.Random, data: bytes, _level: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(len(out))
        out[index] ^= 1 << rng.randrange(8)
    return bytes(out)


def _set_byte(rng: random.Random, data: bytes, _level: int) -> bytes:
    out = bytearray(data)
    index = rng.randrange(len(out))
    out[index] = rng.choice(_INTERESTING) if rng.random() < 0.6 else rng.randrange(256)
    return bytes(out)


def _body_edit(edit: Callable[[random.Random, bytearray], None]) -> Mutation:
    """Edit the body and re-frame it (the Remaining Length stays right) most of the time."""
    def mutate(rng: random.Random, data: bytes, _level: int) -> bytes:
        parts = split(data)
        if parts is None or rng.random() < 0.2:
            raw = bytearray(data)
            edit(rng, raw)
            return bytes(raw)
        body = bytearray(parts[1])
        edit(rng, body)
        return frame(parts[0], bytes(body))
    return mutate


def _insert(rng: random.Random, buf: bytearray) -> None:
    index = rng.randint(0, len(buf))
    buf[index:index] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))


def _delete(rng: random.Random, buf: bytearray) -> None:
    if buf:
        index = rng.randrange(len(buf))
        del buf[index:index + rng.randint(1, 8)]


def _duplicate_region(rng: random.Random, buf: bytearray) -> None:
    if buf:
        start = rng.randrange(len(buf))
        chunk = buf[start:start + rng.randint(1, 16)]
        index = rng.randint(0, len(buf))
        buf[index:index] = chunk


def _truncate(rng: random.Random, data: bytes, _level: int) -> bytes:
    return data[:rng.randrange(1, len(data))] if len(data) > 1 else b""


def _length(rng: random.Random, data: bytes, _level: int) -> bytes:
    parts = split(data)
    if parts is None:
        return data + b"\x00"
    first, body = parts
    choice = rng.randrange(6)
    if choice == 0:
        length = varint(max(0, len(body) + rng.choice((-3, -2, -1, 1, 2, 3))))
    elif choice == 1:
        length = varint(rng.randrange(1 << 28))
    elif choice == 2:
        length = b"\xff\xff\xff\xff\x7f"  # five bytes [MQTT-1.5.5-1] (5.0)
    elif choice == 3:
        length = b"\x80\x80\x80\x00"  # non-minimal zero
    elif choice == 4:
        length = bytes((len(body) & 0x7F | 0x80, 0x80, 0x00))  # non-minimal encoding
    else:
        length = b"\x00"
    return bytes((first,)) + length + body


def _type_or_flags(rng: random.Random, data: bytes, _level: int) -> bytes:
    out = bytearray(data)
    if rng.random() < 0.5:
        out[0] = (rng.randrange(16) << 4) | (out[0] & 0x0F)
    else:
        out[0] = (out[0] & 0xF0) | rng.randrange(16)
    return bytes(out)


def _splice(rng: random.Random, data: bytes, level: int) -> bytes:
    other = rng.choice(SEEDS[level])
    return data[:rng.randint(1, len(data))] + other[rng.randrange(len(other)):]


def _repeat(rng: random.Random, data: bytes, level: int) -> bytes:
    other = rng.choice(SEEDS[level])
    return data * rng.randint(2, 4) + (other if rng.random() < 0.5 else b"")


def _properties_offset(first: int, body: bytes) -> int | None:
    """Where the 5.0 property block starts in `body`, for the packet types that have one."""
    ptype = first >> 4
    if ptype == 1:
        return 10 if len(body) > 10 else None  # name (6), level, flags, keep alive
    if ptype == 2:
        return 2
    if ptype == 3:
        if len(body) < 2:
            return None
        pos = 2 + int.from_bytes(body[:2], "big")
        return pos + (2 if (first >> 1) & 3 else 0)
    if ptype in (4, 5, 6, 7):
        return 3 if len(body) > 3 else None
    if ptype in (8, 9, 10, 11):
        return 2
    if ptype in (14, 15):
        return 1 if len(body) > 1 else None
    return None


# A property identifier and a value of some length: valid ids with odd values, ids not
# allowed in this packet, duplicates, unknown ids.
_PROPERTY_IDS: Final = (0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17,
                        0x18, 0x19, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27,
                        0x28, 0x29, 0x2A, 0x00, 0x7F, 0x80, 0xFF)


def _random_property(rng: random.Random) -> bytes:
    pid = rng.choice(_PROPERTY_IDS)
    kind = rng.randrange(5)
    if kind == 0:
        value = bytes((rng.choice((0, 1, 2, 0xFF)),))
    elif kind == 1:
        value = rng.choice((0, 1, 0xFFFF)).to_bytes(2, "big")
    elif kind == 2:
        value = rng.choice((0, 1, 5, 0xFFFFFFFF)).to_bytes(4, "big")
    elif kind == 3:
        text = rng.choice((b"ok", b"", b"\xff\xfe", b"a\x00b", b"fz/#"))
        value = len(text).to_bytes(2, "big") + text
    else:
        value = varint(rng.choice((0, 1, 268435455)))
    return bytes((pid,)) + value


def _properties(rng: random.Random, data: bytes, level: int) -> bytes:
    parts = split(data)
    if level != 5 or parts is None:
        return _flip_bits(rng, data, level)
    first, body = parts
    offset = _properties_offset(first, body)
    if offset is None or offset >= len(body):
        return _flip_bits(rng, data, level)
    # Read the property length varint at `offset`.
    value = shift = 0
    pos = offset
    while pos < len(body) and pos - offset < 4:
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    block = bytearray(body[pos:pos + value])
    rest = body[pos + value:]
    choice = rng.randrange(3)
    if choice == 0:  # insert a property, lengths kept right
        index = rng.randint(0, len(block))
        block[index:index] = _random_property(rng)
        new_length = varint(len(block))
    elif choice == 1:  # a wrong property length
        new_length = varint(max(0, len(block) + rng.choice((-2, -1, 1, 2, 100))))
    else:  # the same property twice
        extra = _random_property(rng)
        block += extra + extra
        new_length = varint(len(block))
    return frame(first, body[:offset] + new_length + bytes(block) + rest)


MUTATIONS: Final[tuple[Mutation, ...]] = (
    _flip_bits, _flip_bits, _set_byte, _set_byte, _body_edit(_insert), _body_edit(_delete),
    _body_edit(_duplicate_region), _truncate, _length, _length, _type_or_flags, _splice,
    _repeat, _properties, _properties, _properties,
)


def mutate(rng: random.Random, data: bytes, level: int) -> bytes:
    """1 to 3 stacked mutations of `data` (sometimes none: a valid packet drives state)."""
    if rng.random() < 0.05:
        return data
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        data = rng.choice(MUTATIONS)(rng, data, level)
    return data
