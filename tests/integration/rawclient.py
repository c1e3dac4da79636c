"""A tiny blocking MQTT client for black-box tests: packets are built here, byte by byte.

Encoding is written out by hand (struct and bytes) so that a bug in `edge_broker.mqtt.codec`
cannot hide itself by being on both ends of the wire. What the broker sends is decoded with
`codec.split_frame` / `codec.decode` to keep the tests readable; tests that care about the exact
bytes read them with `expect_raw` (or look at `RawClient.last_raw`).

Every read has a deadline (socket timeouts, no sleeping): `expect` waits at most `timeout`
seconds for the next packet and fails if it is of another type; `expect_nothing` is a short,
bounded read that asserts silence; `expect_closed` waits for EOF.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from edge_broker.mqtt import codec
from edge_broker.mqtt.packets import ConnAck, Packet, Publish, SubAck

# Packet types (2.1.2 (5.0) / 2.2.1 (3.1.1)).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

TYPE_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
              7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
              12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}

DEFAULT_TIMEOUT = 3.0


# ----------------------------------------------------------------------- wire primitives


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value % 128
        value //= 128
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return u16(len(raw)) + raw


def binary(data: bytes) -> bytes:
    return u16(len(data)) + data


def frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


# MQTT 5 properties we send, 2.2.2.2 (5.0): name -> (identifier, type).
_PROPERTY_IDS: dict[str, tuple[int, str]] = {
    "payload_format_indicator": (0x01, "byte"),
    "message_expiry_interval": (0x02, "u32"),
    "content_type": (0x03, "str"),
    "response_topic": (0x08, "str"),
    "correlation_data": (0x09, "bin"),
    "subscription_identifier": (0x0B, "varint"),
    "session_expiry_interval": (0x11, "u32"),
    "request_problem_information": (0x17, "byte"),
    "will_delay_interval": (0x18, "u32"),
    "receive_maximum": (0x21, "u16"),
    "topic_alias_maximum": (0x22, "u16"),
    "topic_alias": (0x23, "u16"),
    "maximum_packet_size": (0x27, "u32"),
}


def props(user_properties: Iterable[tuple[str, str]] = (), **values: Any) -> bytes:
    """An MQTT 5 property block (length included), in the order given; user properties last."""
    body = bytearray()
    for name, value in values.items():
        pid, kind = _PROPERTY_IDS[name]
        body.append(pid)
        if kind == "byte":
            body.append(value)
        elif kind == "u16":
            body += u16(value)
        elif kind == "u32":
            body += u32(value)
        elif kind == "varint":
            body += varint(value)
        elif kind == "str":
            body += utf8(value)
        else:
            body += binary(value)
    for key, val in user_properties:
        body.append(0x26)
        body += utf8(key) + utf8(val)
    return varint(len(body)) + bytes(body)


NO_PROPS = b"\x00"


# ----------------------------------------------------------------------- packet builders


class RawWill(NamedTuple):
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: bytes = NO_PROPS  # v5 only: will properties block (see `props`)


def connect_packet(client_id: str, *, version: int = 4, clean: bool = True, keepalive: int = 60,
                   will: RawWill | None = None, properties: bytes = NO_PROPS,
                   username: str | None = None, password: bytes | None = None) -> bytes:
    """CONNECT, 3.1 (5.0) / 3.1 (3.1.1). version 3 is MQTT 3.1 ("MQIsdp")."""
    header = utf8("MQIsdp") + b"\x03" if version == 3 else utf8("MQTT") + bytes((version,))
    flags = 0x02 if clean else 0x00
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    body = header + bytes((flags,)) + u16(keepalive)
    if version == 5:
        body += properties
    body += utf8(client_id)
    if will is not None:
        if version == 5:
            body += will.properties
        body += utf8(will.topic) + binary(will.payload)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += binary(password)
    return frame(0x10, body)


def publish_packet(topic: str, payload: bytes = b"", *, version: int = 4, qos: int = 0,
                   retain: bool = False, dup: bool = False, packet_id: int | None = None,
                   properties: bytes = NO_PROPS) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = utf8(topic)
    if qos:
        assert packet_id is not None
        body += u16(packet_id)
    if version == 5:
        body += properties
    return frame(first, body + payload)


def ack_packet(ptype: int, packet_id: int, reason_code: int | None = None) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP; a reason code only when given (5.0)."""
    first = (ptype << 4) | (0x02 if ptype == PUBREL else 0)
    body = u16(packet_id)
    if reason_code is not None:
        body += bytes((reason_code,))
    return frame(first, body)


def sub_options(qos: int = 0, *, no_local: bool = False, retain_as_published: bool = False,
                retain_handling: int = 0) -> int:
    """The subscription options byte, 3.8.3.1 (5.0); on 3.1.1 only the QoS bits exist."""
    return (qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0)
            | (retain_handling << 4))


def subscribe_packet(packet_id: int, filters: Iterable[tuple[str, int]], *, version: int = 4,
                     properties: bytes = NO_PROPS) -> bytes:
    body = u16(packet_id)
    if version == 5:
        body += properties
    for topic_filter, options in filters:
        body += utf8(topic_filter) + bytes((options,))
    return frame(0x82, body)


def unsubscribe_packet(packet_id: int, filters: Iterable[str], *, version: int = 4) -> bytes:
    body = u16(packet_id)
    if version == 5:
        body += NO_PROPS
    for topic_filter in filters:
        body += utf8(topic_filter)
    return frame(0xA2, body)


PINGREQ_BYTES = b"\xc0\x00"


def disconnect_packet(reason_code: int | None = None, properties: bytes | None = None) -> bytes:
    if reason_code is None:
        return b"\xe0\x00"
    body = bytes((reason_code,))
    if properties is not None:
        body += properties
    return frame(0xE0, body)


# ----------------------------------------------------------------------- the client


class RawClient:
    """One TCP connection to the broker, read with deadlines."""

    def __init__(self, port: int, version: int = 4, host: str = "127.0.0.1") -> None:
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=DEFAULT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._eof = False
        self._ids = itertools.cycle(range(1, 65536))  # packet ids 1-65535 [MQTT-2.3.1-1] (3.1.1)
        self.connack: ConnAck | None = None
        self.last_raw = b""  # the exact bytes of the last packet read

    # -- plumbing -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_id(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        """Close the socket without DISCONNECT (an abnormal close for the broker)."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def _frame_in_buffer(self) -> tuple[int, bytes, bytes] | None:
        found = codec.split_frame(self._buf, 0, 1 << 30)
        if found is None:
            return None
        first, body_start, body_end = found
        raw = bytes(self._buf[:body_end])
        body = bytes(self._buf[body_start:body_end])
        del self._buf[:body_end]
        return first, body, raw

    def read_raw(self, timeout: float = DEFAULT_TIMEOUT) -> bytes | None:
        """The next whole packet's bytes; None on timeout. Raises EOFError when closed."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._frame_in_buffer()
            if found is not None:
                self.last_raw = found[2]
                return found[2]
            if self._eof:
                raise EOFError("connection closed by the broker")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                data = b""
            if not data:
                self._eof = True
            self._buf += data

    def read(self, timeout: float = DEFAULT_TIMEOUT) -> Packet | None:
        """The next packet, decoded; None on timeout. Raises EOFError when closed."""
        raw = self.read_raw(timeout)
        if raw is None:
            return None
        found = codec.split_frame(raw, 0, 1 << 30)
        assert found is not None
        level = 4 if self.version == 3 else self.version
        return codec.decode(raw[0], raw[found[1]:found[2]], level)

    def expect(self, ptype: int, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """The next packet, which must be of type `ptype` and arrive within `timeout`."""
        name = TYPE_NAMES[ptype]
        try:
            packet = self.read(timeout)
        except EOFError:
            raise AssertionError(f"connection closed while waiting for {name}") from None
        assert packet is not None, f"no {name} within {timeout} s"
        assert packet.packet_type == ptype, f"expected {name}, got {packet!r}"
        return packet

    def expect_raw(self, ptype: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        self.expect(ptype, timeout)
        return self.last_raw

    def expect_publish(self, timeout: float = DEFAULT_TIMEOUT) -> Publish:
        packet: Publish = self.expect(PUBLISH, timeout)
        return packet

    def expect_nothing(self, timeout: float = 0.2) -> None:
        """Assert that no packet arrives (and the connection stays open) for `timeout` s.

        Use it once the cause is known to be handled (an acknowledgement or a PINGRESP came
        back): the broker writes what it sends because of a packet in the same event-loop step
        in which it handles that packet, so a short window suffices on loopback.
        """
        try:
            packet = self.read(timeout)
        except EOFError:
            raise AssertionError("connection closed while expecting silence") from None
        assert packet is None, f"expected nothing, got {packet!r}"

    def expect_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Assert that the broker closes the connection within `timeout`, sending nothing."""
        try:
            packet = self.read(timeout)
        except EOFError:
            return
        if packet is None:
            raise AssertionError(f"connection still open after {timeout} s")
        raise AssertionError(f"expected the connection to close, got {packet!r}")

    def is_closed(self, timeout: float) -> bool:
        """Whether EOF arrives within `timeout` (packets before it are discarded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.read_raw(max(0.0, deadline - time.monotonic())) is None:
                    return False
            except EOFError:
                return True

    # -- packets --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes = b"", *, qos: int = 0, retain: bool = False,
                dup: bool = False, packet_id: int | None = None,
                properties: bytes = NO_PROPS) -> int | None:
        """Send a PUBLISH; returns its packet id (allocated when QoS > 0 and none given)."""
        if qos and packet_id is None:
            packet_id = self.next_id()
        self.send(publish_packet(topic, payload, version=self.version, qos=qos, retain=retain,
                                 dup=dup, packet_id=packet_id, properties=properties))
        return packet_id

    def publish_acked(self, topic: str, payload: bytes = b"", *, qos: int = 1,
                      retain: bool = False, properties: bytes = NO_PROPS) -> int:
        """PUBLISH at QoS 1 or 2 and complete the flow; returns the PUBACK/PUBREC reason."""
        packet_id = self.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert packet_id is not None
        if qos == 1:
            ack = self.expect(PUBACK)
            assert ack.packet_id == packet_id
            return int(ack.reason_code)
        rec = self.expect(PUBREC)
        assert rec.packet_id == packet_id
        if rec.reason_code < 0x80:
            self.send(ack_packet(PUBREL, packet_id))
            comp = self.expect(PUBCOMP)
            assert comp.packet_id == packet_id
        return int(rec.reason_code)

    def ack(self, ptype: int, packet_id: int, reason_code: int | None = None) -> None:
        self.send(ack_packet(ptype, packet_id, reason_code))

    def subscribe(self, *filters: str | tuple[str, int], properties: bytes = NO_PROPS,
                  packet_id: int | None = None) -> tuple[int, ...]:
        """SUBSCRIBE and wait for the SUBACK; returns its reason codes. A filter is a topic
        filter (QoS 0) or (filter, options byte)."""
        pairs = [(f, 0) if isinstance(f, str) else f for f in filters]
        packet_id = packet_id or self.next_id()
        self.send(subscribe_packet(packet_id, pairs, version=self.version,
                                   properties=properties))
        suback: SubAck = self.expect(SUBACK)
        assert suback.packet_id == packet_id
        return suback.reason_codes

    def unsubscribe(self, *filters: str) -> None:
        packet_id = self.next_id()
        self.send(unsubscribe_packet(packet_id, filters, version=self.version))
        unsuback = self.expect(UNSUBACK)
        assert unsuback.packet_id == packet_id

    def ping(self) -> None:
        """PINGREQ -> PINGRESP: the broker has handled everything sent before."""
        self.send(PINGREQ_BYTES)
        assert self.expect_raw(PINGRESP) == b"\xd0\x00"

    def disconnect(self, reason_code: int | None = None, properties: bytes | None = None) -> None:
        """A DISCONNECT, then wait for the broker to close the connection."""
        self.send(disconnect_packet(reason_code, properties))
        self.expect_closed()
        self.close()


def connect(port: int, client_id: str, *, version: int = 4, clean: bool = True,
            keepalive: int = 60, will: RawWill | None = None, properties: bytes = NO_PROPS,
            username: str | None = None, password: bytes | None = None,
            expect_success: bool = True) -> RawClient:
    """Open a connection and send CONNECT; the CONNACK is in `client.connack` (and its bytes
    in `client.last_raw`). With `expect_success` the CONNACK must accept the connection."""
    client = RawClient(port, version)
    client.send(connect_packet(client_id, version=version, clean=clean, keepalive=keepalive,
                               will=will, properties=properties, username=username,
                               password=password))
    client.connack = client.expect(CONNACK)
    if expect_success:
        assert client.connack.reason_code == 0, f"refused: {client.connack!r}"
    return client


def subscriber(port: int, client_id: str, *filters: str | tuple[str, int], version: int = 4,
               **connect_args: Any) -> RawClient:
    """Connect and subscribe to `filters`, asserting that every subscription was granted."""
    client = connect(port, client_id, version=version, **connect_args)
    codes = client.subscribe(*filters)
    assert all(code < 0x80 for code in codes), codes
    return client


def unique_id(prefix: str = "c") -> str:
    """A client id no other test uses (brokers are per test, but keep logs readable)."""
    return f"{prefix}-{next(_unique)}"


_unique = itertools.count(1)
