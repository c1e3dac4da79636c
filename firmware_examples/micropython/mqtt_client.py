# ruff: noqa: UP031, SIM105, SIM102  (MicroPython: no contextlib; %-formatting is the idiom there)
# A small MQTT 3.1.1 client for MicroPython (ESP32, Pico W, unix port); also runs on CPython.
#
# What it does: CONNECT (will, username/password, clean session 0, keepalive), PUBLISH QoS 0/1
# with PUBACK tracking and resend with DUP after a reconnect, SUBSCRIBE, incoming QoS 0/1
# PUBLISH (PUBACK sent after the callback returns), PINGREQ keepalive, DISCONNECT.
# Reads never block the main loop: the socket is non-blocking and `poll(timeout_ms)` waits with
# select.poll, then parses whole packets from a receive buffer (partial packets wait there).
# Section numbers are the MQTT 3.1.1 specification's.

import select
import socket

try:
    from time import ticks_diff, ticks_ms
except ImportError:  # CPython
    import time as _time

    def ticks_ms():
        return int(_time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

_EAGAIN = (11, 115, 119)  # EAGAIN, EINPROGRESS (linux), EINPROGRESS (lwIP on ESP32/Pico W)

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0


class MQTTException(Exception):
    pass


def _str(data):
    if isinstance(data, str):
        data = data.encode()
    return bytes((len(data) >> 8, len(data) & 0xFF)) + data


def _packet(first_byte, body):
    # Remaining Length: 7 bits per byte, high bit = more bytes follow (2.2.3)
    header = bytearray((first_byte,))
    n = len(body)
    while True:
        byte = n & 0x7F
        n >>= 7
        header.append(byte | 0x80 if n else byte)
        if not n:
            break
    return bytes(header) + body


class MQTTClient:
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive=60,
                 clean_session=False, ssl_context=None, server_hostname=None):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.will = None
        self.sock = None
        self.poller = None
        self.rbuf = b""
        self.next_pid = 1
        self.inflight = {}       # pid -> PUBLISH bytes (QoS 1, not yet PUBACKed)
        self.inflight_order = []  # pids in send order, for the resend after reconnect
        self.resent = 0
        self.last_send = 0
        self.last_recv = 0
        self.ping_outstanding = False
        self.on_message = None   # f(topic: str, payload: bytes, retained: bool)
        self.on_puback = None    # f(pid: int)

    # --- connection -------------------------------------------------------------------------

    def set_will(self, topic, payload, retain=True, qos=1):
        self.will = (topic, payload, retain, qos)

    def connected(self):
        return self.sock is not None

    def connect(self, timeout_ms=5000):
        """Connect, then resend unacknowledged QoS 1 PUBLISHes with DUP set.
        Returns the CONNACK's session-present flag; raises OSError or MQTTException."""
        self.close()
        addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0][-1]
        sock = socket.socket()
        try:
            sock.connect(addr)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)
            sock.setblocking(False)
        except Exception:
            sock.close()
            raise
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.rbuf = b""
        self.ping_outstanding = False
        flags = 0x02 if self.clean_session else 0  # 3.1.2.4
        payload = _str(self.client_id)
        if self.will:
            topic, msg, retain, qos = self.will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)  # 3.1.2.5-3.1.2.7
            payload += _str(topic) + _str(msg)
        if self.user is not None:
            flags |= 0x80
            payload += _str(self.user)
            if self.password is not None:
                flags |= 0x40
                payload += _str(self.password)
        body = _str("MQTT") + bytes((4, flags, self.keepalive >> 8, self.keepalive & 0xFF))
        self._send(_packet(CONNECT, body + payload))
        deadline = ticks_ms() + timeout_ms
        while True:
            packet = self._next_packet()
            if packet is not None:
                break
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                self.close()
                raise MQTTException("no CONNACK")
            self._wait(left)
        first, body = packet
        if first != CONNACK or len(body) != 2:
            self.close()
            raise MQTTException("expected CONNACK")
        if body[1] != 0:  # 3.2.2.3 return codes: 1..5 refuse the connection
            self.close()
            raise MQTTException("connection refused, return code %d" % body[1])
        session_present = bool(body[0] & 1)
        self.last_recv = ticks_ms()
        # [MQTT-4.4.0-1] resend unacknowledged PUBLISH packets with their original ids, DUP set
        for pid in self.inflight_order:
            data = self.inflight[pid]
            self._send(bytes((data[0] | 0x08,)) + data[1:])
            self.resent += 1
        return session_present

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.poller = None

    def disconnect(self):
        if self.sock is not None:
            try:
                self._send(bytes((DISCONNECT, 0)))
            except OSError:
                pass
        self.close()

    # --- sending ----------------------------------------------------------------------------

    def _send(self, data):
        if self.sock is None:
            raise OSError(-1)
        view = memoryview(data)
        sent = 0
        deadline = ticks_ms() + 10000
        while sent < len(data):
            try:
                n = self.sock.send(view[sent:])
            except OSError as e:
                if e.args[0] not in _EAGAIN:
                    self.close()
                    raise
                n = 0
            if n:
                sent += n
            elif ticks_diff(deadline, ticks_ms()) <= 0:
                self.close()
                raise OSError(110)  # ETIMEDOUT: the peer stopped reading
            else:
                writable = select.poll()
                writable.register(self.sock, select.POLLOUT)
                writable.poll(100)
        self.last_send = ticks_ms()

    def _pid(self):
        pid = self.next_pid
        while pid in self.inflight:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        return pid

    def publish(self, topic, payload, qos=0, retain=False):
        """Send a PUBLISH; for QoS 1 return the packet id, kept for resending until PUBACKed even
        when the connection fails while sending (the next poll() then reports the failure).
        QoS 0: raises OSError if the connection fails."""
        if isinstance(payload, str):
            payload = payload.encode()
        body = _str(topic)
        pid = 0
        if qos:
            pid = self._pid()
            body += bytes((pid >> 8, pid & 0xFF))
        data = _packet(PUBLISH | (qos << 1) | (1 if retain else 0), body + payload)
        if not qos:
            self._send(data)
            return 0
        self.inflight[pid] = data
        self.inflight_order.append(pid)
        try:
            self._send(data)
        except OSError:
            pass  # resent with DUP after the reconnect
        return pid

    def subscribe(self, topic_filter, qos=1):
        pid = self._pid()
        body = bytes((pid >> 8, pid & 0xFF)) + _str(topic_filter) + bytes((qos,))
        self._send(_packet(SUBSCRIBE, body))  # 3.8.1: fixed header flags 0010
        return pid

    # --- receiving --------------------------------------------------------------------------

    def _wait(self, timeout_ms):
        if self.poller is not None:
            for _obj, event in self.poller.poll(max(0, timeout_ms)):
                if event & (select.POLLHUP | select.POLLERR) and not event & select.POLLIN:
                    self.close()
                    raise OSError(104)

    def _fill(self):
        try:
            chunk = self.sock.recv(1024)
        except OSError as e:
            if e.args[0] in _EAGAIN:
                return
            self.close()
            raise
        if chunk is None:  # MicroPython non-blocking read with nothing to read
            return
        if not chunk:
            self.close()
            raise OSError(104)  # the broker closed the connection
        self.rbuf += chunk
        self.last_recv = ticks_ms()

    def _next_packet(self):
        """A whole packet (first byte, body) from the buffer, else None after one read."""
        packet = self._parse()
        if packet is None and self.sock is not None:
            self._fill()
            packet = self._parse()
        return packet

    def _parse(self):
        buf = self.rbuf
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return None
            byte = buf[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if not byte & 0x80:
                break
            if i > 4:
                self.close()
                raise MQTTException("malformed remaining length")
        if len(buf) < i + length:
            return None
        self.rbuf = buf[i + length:]
        return buf[0], buf[i:i + length]

    def poll(self, timeout_ms=0):
        """Handle incoming packets, waiting up to timeout_ms for the first; keep the connection
        alive. Raises OSError when the connection is lost."""
        if self.sock is None:
            raise OSError(-1)
        self._keepalive()
        if not self.rbuf:
            self._wait(timeout_ms)
        while self.sock is not None:
            packet = self._next_packet()
            if packet is None:
                break
            self._handle(packet[0], packet[1])
        if self.sock is None:
            raise OSError(104)

    def _keepalive(self):
        if not self.keepalive:
            return
        now = ticks_ms()
        period = self.keepalive * 1000
        if self.ping_outstanding and ticks_diff(now, self.last_recv) > period * 3 // 2:
            self.close()
            raise OSError(110)  # 3.1.2.10: no answer from the broker within the keepalive
        if not self.ping_outstanding and ticks_diff(now, self.last_send) >= period * 3 // 4:
            self._send(bytes((PINGREQ, 0)))
            self.ping_outstanding = True

    def _handle(self, first, body):
        kind = first & 0xF0
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            tlen = (body[0] << 8) | body[1]
            topic = bytes(body[2:2 + tlen]).decode()
            pos = 2 + tlen
            pid = 0
            if qos:
                pid = (body[pos] << 8) | body[pos + 1]
                pos += 2
            if self.on_message:
                self.on_message(topic, bytes(body[pos:]), bool(first & 1))
            if qos == 1:  # 3.3.4: acknowledge after handling (at-least-once)
                self._send(bytes((PUBACK, 2, pid >> 8, pid & 0xFF)))
            elif qos == 2:  # never granted: we subscribe with QoS <= 1
                self.close()
                raise MQTTException("QoS 2 PUBLISH not supported")
        elif kind == PUBACK:
            pid = (body[0] << 8) | body[1]
            if pid in self.inflight:
                del self.inflight[pid]
                self.inflight_order.remove(pid)
                if self.on_puback:
                    self.on_puback(pid)
        elif kind == PINGRESP:
            self.ping_outstanding = False
        elif kind == SUBACK:
            if body[-1] == 0x80:  # 3.9.3: failure, e.g. refused by the broker's ACL
                raise MQTTException("subscription refused")
        # other packets (PUBREC/PUBREL for QoS 2) are never expected by this client
