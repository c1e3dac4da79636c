"""Hand-built MQTT bytes and a blocking raw-socket client, for the malformed-input and scale tests.

Deliberately independent of `edge_broker.mqtt`: the bytes here are written by hand (hex strings
and a few length-computing helpers), and replies are split into frames and read field by field,
so a bug in the broker's codec cannot hide itself in the test's own encoder.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import NamedTuple

DEFAULT_TIMEOUT = 5.0

# Packet type numbers (2.1.2), for readable assertions.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
TYPE_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
              7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
              12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


def h(text: str) -> bytes:
    """Bytes from hex with spaces: h("30 05 0003 612f62")."""
    return bytes.fromhex(text)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def frame(first_byte: int, *parts: bytes | str) -> bytes:
    """A packet with the correct Remaining Length; str parts are hex, bytes parts are raw."""
    body = b"".join(h(part) if isinstance(part, str) else part for part in parts)
    return bytes((first_byte,)) + varint(len(body)) + body


def connect(version: int, client_id: str, *, flags: int = 0x02, keepalive: int = 0,
            properties: bytes = b"") -> bytes:
    """A valid CONNECT (clean start, no will, no credentials unless `flags` says otherwise);
    `properties` are the 5.0 properties without their length."""
    body = utf8("MQTT") + bytes((version, flags)) + keepalive.to_bytes(2, "big")
    if version == 5:
        body += varint(len(properties)) + properties
    return frame(0x10, body + utf8(client_id))


def publish(version: int, topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    parts = [utf8(topic)]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))
    if version == 5:
        parts.append(b"\x00")
    return frame(0x30 | (qos << 1), *parts, payload)


def subscribe(version: int, packet_id: int, topic_filter: str, options: int = 0) -> bytes:
    props = b"\x00" if version == 5 else b""
    return frame(0x82, packet_id.to_bytes(2, "big"), props, utf8(topic_filter),
                 bytes((options,)))


class Frame(NamedTuple):
    first: int
    body: bytes

    @property
    def type(self) -> int:
        return self.first >> 4

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type{self.type}")


def split_frames(buf: bytearray) -> list[Frame]:
    """Remove and return the complete frames at the start of `buf`."""
    frames: list[Frame] = []
    while len(buf) >= 2:
        value = shift = 0
        pos = 1
        while True:
            if pos >= len(buf):
                return frames
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if pos > 4:
                raise AssertionError(f"server sent a bad remaining length: {bytes(buf[:8])!r}")
        if pos + value > len(buf):
            return frames
        frames.append(Frame(buf[0], bytes(buf[pos:pos + value])))
        del buf[:pos + value]
    return frames


def _skip_varint(body: bytes, pos: int) -> int:
    value = shift = 0
    while True:
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return pos + value


def reason(frame_: Frame, version: int) -> int | tuple[int, ...] | None:
    """The reason / return code(s) a server packet carries (None for PINGRESP and the like)."""
    body = frame_.body
    kind = frame_.type
    if kind == CONNACK:
        return body[1]
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        return body[2] if len(body) > 2 else 0
    if kind in (SUBACK, UNSUBACK):
        if kind == UNSUBACK and version != 5:
            return None
        pos = _skip_varint(body, 2) if version == 5 else 2
        return tuple(body[pos:])
    if kind == DISCONNECT:
        return body[0] if body else 0
    return None


def publish_fields(frame_: Frame, version: int) -> tuple[str, bytes, int, int | None]:
    """(topic, payload, qos, packet id) of a PUBLISH frame."""
    body = frame_.body
    qos = (frame_.first >> 1) & 3
    length = int.from_bytes(body[:2], "big")
    topic = body[2:2 + length].decode()
    pos = 2 + length
    packet_id = None
    if qos:
        packet_id = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
    if version == 5:
        pos = _skip_varint(body, pos)
    return topic, body[pos:], qos, packet_id


class RawClient:
    """A blocking TCP client that speaks bytes and reads frames."""

    def __init__(self, port: int, version: int, host: str = "127.0.0.1") -> None:
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=DEFAULT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_slowly(self, data: bytes, pause_s: float = 0.0005) -> int:
        """Send one byte per write, stopping if the broker closed the connection meanwhile.
        Returns how many bytes went out."""
        for index in range(len(data)):
            try:
                self.sock.sendall(data[index:index + 1])
            except (BrokenPipeError, ConnectionResetError):
                return index
            time.sleep(pause_s)
        return len(data)

    def shutdown_write(self) -> None:
        """End our side (EOF for the broker); the broker may have closed already."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def _fill(self, deadline: float) -> bool:
        """Read once; False on timeout. Sets `eof` on end of stream or reset."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        else:
            self.buf += data
            self.frames += split_frames(self.buf)
        return True

    def read(self, timeout: float = DEFAULT_TIMEOUT) -> Frame | None:
        """The next frame, or None at end of stream. AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            if self.eof:
                return None
            if not self._fill(deadline):
                raise AssertionError(f"no packet from the broker within {timeout} s")
        return self.frames.pop(0)

    def read_until_closed(self, timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """Every frame up to the end of the stream. AssertionError if it does not end."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._fill(deadline):
                raise AssertionError(f"the broker did not close the connection within "
                                     f"{timeout} s (got {self.frames})")
        if self.buf:
            raise AssertionError(f"connection closed inside a packet: {bytes(self.buf)!r}")
        frames, self.frames = self.frames, []
        return frames

    def handshake(self, client_id: str, **kwargs: object) -> Frame:
        self.send(connect(self.version, client_id, **kwargs))  # type: ignore[arg-type]
        connack = self.read()
        assert connack is not None and connack.type == CONNACK, connack
        assert connack.body[1] == 0, f"CONNACK refused: {connack}"
        return connack
