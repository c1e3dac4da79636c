"""The data representations of 1.5 (5.0) / 1.5 (3.1.1): integers, strings, binary data.

Decoding goes through `Reader`, a cursor over a bytes-like buffer. Every decoding failure is a
`RemoteProtocolError(MALFORMED_PACKET)`; every encoding failure (a value out of range, a string
the spec forbids) is a `LocalProtocolError`, because the caller built a bad packet.
"""

from __future__ import annotations

import struct
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError
from .types import MAX_VARIABLE_BYTE_INTEGER, ReasonCode

Buffer = bytes | bytearray | memoryview

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")

pack_u16 = _U16.pack
pack_u32 = _U32.pack

MAX_U16: Final = 0xFFFF
MAX_U32: Final = 0xFFFF_FFFF


def malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ReasonCode.MALFORMED_PACKET, message)


def protocol_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ReasonCode.PROTOCOL_ERROR, message)


# --------------------------------------------------------------------------- decoding


def decode_utf8(raw: Buffer) -> str:
    """Decode a UTF-8 Encoded String's bytes (without the length prefix).

    Python's strict UTF-8 codec already rejects ill-formed sequences, overlong forms and the
    encoded surrogates U+D800..U+DFFF ([MQTT-1.5.4-1] (5.0)). U+0000 is checked here
    ([MQTT-1.5.4-2] (5.0)). The other code points that the spec says SHOULD NOT appear (control
    characters, non-characters) are accepted, as [MQTT-1.5.4-3] (5.0) lets the receiver do.
    """
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise malformed(f"invalid UTF-8 in a string: {exc.reason}") from None
    if "\x00" in text:
        raise malformed("U+0000 in a UTF-8 string")
    return text


class Reader:
    """A read cursor over `data[pos:end]`. Reading past `end` is a malformed packet."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: Buffer, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def at_end(self) -> bool:
        return self.pos >= self.end

    def _need(self, count: int, what: str) -> int:
        pos = self.pos
        if pos + count > self.end:
            raise malformed(f"packet ends inside {what}")
        self.pos = pos + count
        return pos

    def u8(self, what: str = "a byte") -> int:
        pos = self._need(1, what)
        return self.data[pos]

    def u16(self, what: str = "a two byte integer") -> int:
        pos = self._need(2, what)
        data = self.data
        return (data[pos] << 8) | data[pos + 1]

    def u32(self, what: str = "a four byte integer") -> int:
        pos = self._need(4, what)
        data = self.data
        return (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]

    def varint(self, what: str = "a variable byte integer") -> int:
        """A Variable Byte Integer, 1.5.5 (5.0): at most four bytes.

        Non-minimal encodings (such as 0x80 0x00 for 0) are accepted: the minimum length is a
        rule for the sender ([MQTT-1.5.5-1] (5.0)) and rejecting them buys nothing.
        """
        data = self.data
        value = 0
        shift = 0
        for _ in range(4):
            pos = self._need(1, what)
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise malformed(f"{what} is longer than four bytes")

    def take(self, count: int, what: str) -> Buffer:
        pos = self._need(count, what)
        return self.data[pos : pos + count]

    def utf8(self, what: str = "a UTF-8 string") -> str:
        length = self.u16(what)
        return decode_utf8(self.take(length, what))

    def binary(self, what: str = "binary data") -> bytes:
        length = self.u16(what)
        return bytes(self.take(length, what))

    def string_pair(self, what: str = "a UTF-8 string pair") -> tuple[str, str]:
        return self.utf8(what), self.utf8(what)

    def rest(self) -> bytes:
        """Everything up to `end` (a PUBLISH payload)."""
        pos = self.pos
        self.pos = self.end
        return bytes(self.data[pos : self.end])

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise malformed(f"{self.end - self.pos} unexpected trailing bytes in {what}")


# --------------------------------------------------------------------------- encoding

# Variable byte integers below 128 are one byte; cache them (property lengths, remaining
# lengths of small packets).
_SMALL_VARINTS: Final = tuple(bytes((n,)) for n in range(128))


def encode_varint(value: int) -> bytes:
    if value < 128:
        if value < 0:
            raise LocalProtocolError(f"variable byte integer {value} is negative")
        return _SMALL_VARINTS[value]
    if value > MAX_VARIABLE_BYTE_INTEGER:
        raise LocalProtocolError(f"variable byte integer {value} is too large")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_size(value: int) -> int:
    if value < 128:
        return 1
    if value < 16_384:
        return 2
    if value < 2_097_152:
        return 3
    return 4


def encode_u8(value: int) -> bytes:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"byte value {value} out of range")
    return _SMALL_VARINTS[value] if value < 128 else bytes((value,))


def encode_u16(value: int) -> bytes:
    if not 0 <= value <= MAX_U16:
        raise LocalProtocolError(f"two byte integer {value} out of range")
    return pack_u16(value)


def encode_u32(value: int) -> bytes:
    if not 0 <= value <= MAX_U32:
        raise LocalProtocolError(f"four byte integer {value} out of range")
    return pack_u32(value)


def utf8_bytes(text: str) -> bytes:
    """The UTF-8 bytes of `text`, checked against 1.5.4 (5.0), without the length prefix."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"string {text!r} contains a UTF-16 surrogate") from None
    if "\x00" in text:
        raise LocalProtocolError(f"string {text!r} contains U+0000")
    if len(raw) > MAX_U16:
        raise LocalProtocolError(f"string of {len(raw)} bytes is longer than 65535")
    return raw


def encode_utf8(text: str) -> bytes:
    raw = utf8_bytes(text)
    return pack_u16(len(raw)) + raw


def encode_binary(data: bytes) -> bytes:
    if len(data) > MAX_U16:
        raise LocalProtocolError(f"binary data of {len(data)} bytes is longer than 65535")
    return pack_u16(len(data)) + bytes(data)


def encode_string_pair(pair: tuple[str, str]) -> bytes:
    return encode_utf8(pair[0]) + encode_utf8(pair[1])
