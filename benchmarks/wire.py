"""Hand-encoded MQTT 3.1.1 packets for the load generator.

Deliberately independent of edge_broker.mqtt: the benchmark must not share bugs (or speed-ups)
with the broker it measures. Only what the scenarios need: CONNECT, SUBSCRIBE, PUBLISH (QoS 0/1),
PUBACK, DISCONNECT out; CONNACK, SUBACK, PUBLISH, PUBACK in. Spec numbering is 3.1.1's.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

# Packet type nibbles (MQTT 3.1.1 table 2.1).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT_TYPE = 14

DISCONNECT = b"\xe0\x00"
PINGREQ_BYTES = b"\xc0\x00"
USERNAME = "bench"  # amqtt keeps offline messages only for non-anonymous sessions (S4)


class ProtocolError(Exception):
    """The broker sent something the load generator did not expect."""


def varint(n: int) -> bytes:
    """Remaining Length encoding [MQTT-2.2.3]."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


def connect(client_id: str, *, clean: bool = True, keepalive_s: int = 60,
            username: str | None = USERNAME, password: str | None = None) -> bytes:
    flags = 0x02 if clean else 0x00
    payload = utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
        if password is not None:   # [MQTT-3.1.2-22] (3.1.1): a password needs a username
            flags |= 0x40
            payload += utf8(password)
    var = utf8("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive_s)
    body = var + payload
    return b"\x10" + varint(len(body)) + body


def subscribe(packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack(">H", packet_id) + utf8(topic) + bytes([qos])
    return b"\x82" + varint(len(body)) + body


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0) -> bytes:
    t = utf8(topic)
    body = t + struct.pack(">H", packet_id) + payload if qos else t + payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


def publish_prefix(topic: str, payload_len: int, qos: int) -> bytes:
    """Fixed header + topic of a PUBLISH whose payload is `payload_len` bytes (packet id follows
    for QoS 1). Lets the hot loop build packets by concatenation."""
    t = utf8(topic)
    rl = len(t) + (2 if qos else 0) + payload_len
    return bytes([0x30 | (qos << 1)]) + varint(rl) + t


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack(">H", packet_id)


def split_frames(buf: bytes | bytearray, start: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Incremental framer: returns ([(first_byte, body_start, body_end)], consumed_up_to).

    A frame whose bytes have not all arrived is left for the next call."""
    frames: list[tuple[int, int, int]] = []
    n = len(buf)
    i = start
    while i + 2 <= n:
        b0 = buf[i]
        rl = 0
        shift = 0
        j = i + 1
        while True:
            if j >= n:
                return frames, i
            byte = buf[j]
            j += 1
            rl |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("remaining length longer than 4 bytes")
        if j + rl > n:
            break
        frames.append((b0, j, j + rl))
        i = j + rl
    return frames, i


def recv_packet(sock: socket.socket, buf: bytearray, deadline: float) -> tuple[int, bytes]:
    """Blocking read of one packet; extra bytes stay in `buf`. Returns (first_byte, body)."""
    while True:
        frames, _ = split_frames(buf)
        if frames:
            b0, s, e = frames[0]
            body = bytes(buf[s:e])
            del buf[:e]
            return b0, body
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no packet from broker before deadline")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk


def open_session(host: str, port: int, client_id: str, *, clean: bool = True,
                 keepalive_s: int = 60, timeout_s: float = 10.0,
                 subscribe_to: tuple[str, int] | None = None,
                 tls: ssl.SSLContext | None = None, password: str | None = None
                 ) -> tuple[socket.socket, bytearray, bool]:
    """Connect (and optionally subscribe). Returns (socket, leftover bytes, session_present).

    The socket is left blocking with TCP_NODELAY: the load generator batches its own writes.
    `tls`: the handshake is done here, and the socket returned is an `ssl.SSLSocket`."""
    deadline = time.monotonic() + timeout_s
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    sock.sendall(connect(client_id, clean=clean, keepalive_s=keepalive_s, password=password))
    buf = bytearray()
    b0, body = recv_packet(sock, buf, deadline)
    if b0 >> 4 != CONNACK or len(body) != 2:
        raise ProtocolError(f"expected CONNACK, got first byte {b0:#x}")
    if body[1] != 0:
        raise ProtocolError(f"CONNACK return code {body[1]}")
    session_present = bool(body[0] & 1)
    if subscribe_to is not None:
        topic, qos = subscribe_to
        sock.sendall(subscribe(1, topic, qos))
        # Queued PUBLISHes may precede the SUBACK on a resumed session: keep them.
        pending = bytearray()
        while True:
            b0, body = recv_packet(sock, buf, deadline)
            if b0 >> 4 == SUBACK:
                if body[2:3] == b"\x80":
                    raise ProtocolError(f"SUBACK refused {topic!r}")
                break
            pending += bytes([b0]) + varint(len(body)) + body
        buf[:0] = pending
    sock.settimeout(None)
    return sock, buf, session_present
