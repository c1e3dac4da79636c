"""Fairness against packets that are each a lot of work (round 14's review found each of these
holding every other client for tens of seconds): a probe's QoS 1 round trips to its own topic,
50 a second, first alone, then while one attacker does one of

* `userprops`: MQTT 5 QoS 0 PUBLISHes with 2,000 user properties each, at full speed;
* `subunsub`: SUBSCRIBE + UNSUBSCRIBE of 200 wildcard filters, again and again, with 20,000
  retained messages stored under other topics;
* `overlap`: 16,384 overlapping subscriptions ({a,+}^14/#) of its own, then QoS 0 PUBLISHes at
  full speed to topics all of them match.

Each broker is started fresh per attack (benchmarks/brokers.py), edge-broker and mosquitto in
the same run. Prints the probe's p50 / p99 / max in ms (and how many round trips came back),
alone and under attack, and the broker's peak RSS:

    python -m benchmarks.fairness_work [--brokers edge,mosquitto] [--duration 8]
        [--attacks userprops,subunsub,overlap] [--edge-cmd TEMPLATE]

The probe and the attacker are processes of their own; the attacker runs at nice +10 so that
on two cores it is not what delays the probe.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import struct
import time
from typing import Any

from . import brokers

HOST = "127.0.0.1"
RATE = 50.0  # probe round trips per second
WARMUP_S = 3.0  # the attack runs this long before the probe starts


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _connect(client_id: str, v5: bool) -> bytes:
    level = 5 if v5 else 4
    body = _str("MQTT") + bytes((level, 0x02)) + struct.pack("!H", 60)
    return _packet(0x10, body + (b"\x00" if v5 else b"") + _str(client_id))


def _publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0,
             retain: bool = False, v5: bool = False, properties: bytes = b"") -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    if v5:
        body += _varint(len(properties)) + properties
    return _packet(0x30 | qos << 1 | retain, body + payload)


def _subscribe(packet_id: int, filters: list[str], qos: int = 0) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id)
                   + b"".join(_str(f) + bytes((qos,)) for f in filters))


def _unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    return _packet(0xA2, struct.pack("!H", packet_id) + b"".join(_str(f) for f in filters))


def _session(port: int, client_id: str, v5: bool = False) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_connect(client_id, v5))
    if sock.recv(64)[:1] != b"\x20":
        raise RuntimeError("no CONNACK")
    return sock


def _drain(sock: socket.socket) -> None:
    sock.settimeout(0.0)
    try:
        while sock.recv(1 << 16):
            pass
    except (BlockingIOError, OSError):
        pass


def _read_until(sock: socket.socket, first_byte: int, deadline: float) -> None:
    """Read packets until one of type `first_byte >> 4` came (others are skipped)."""
    buf = bytearray()
    while True:
        while len(buf) >= 2:
            length, shift, pos = 0, 0, 1
            while True:
                if pos >= len(buf):
                    break
                byte = buf[pos]
                length |= (byte & 0x7F) << shift
                pos += 1
                shift += 7
                if not byte & 0x80:
                    break
            else:
                break
            if pos > len(buf) or len(buf) < pos + length or (buf[pos - 1] & 0x80):
                break
            kind = buf[0] >> 4
            del buf[:pos + length]
            if kind == first_byte >> 4:
                return
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("closed")
        buf += chunk


def attack(kind: str, port: int) -> None:
    """The attacker's process: set up, then repeat its packets until killed."""
    os.nice(10)
    if kind == "userprops":
        sock = _session(port, "attack-props", v5=True)
        props = b"".join(b"\x26" + _str(f"k{i}") + _str("v") for i in range(2000))
        block = _publish("up/t", b"p", v5=True, properties=props) * 8
    elif kind == "subunsub":
        setter = _session(port, "attack-retainer")
        for start in range(0, 20_000, 2_000):
            setter.sendall(b"".join(_publish(f"rt/{i}/v", b"r", retain=True)
                                    for i in range(start, start + 2_000)))
        setter.sendall(_publish("rt/done", b"r", qos=1, packet_id=1))
        _read_until(setter, 0x40, time.monotonic() + 120)  # PUBACK: all handled
        setter.close()
        sock = _session(port, "attack-subs")
        filters = [f"zz/+/i{n}" for n in range(200)]
        block = b"".join(_subscribe(2 * k + 1, filters) + _unsubscribe(2 * k + 2, filters)
                         for k in range(4))
    elif kind == "overlap":
        sock = _session(port, "attack-overlap")
        levels = 14
        filters = ["/".join("+" if mask >> bit & 1 else "a" for bit in range(levels)) + "/#"
                   for mask in range(2 ** levels)]
        for chunk in range(0, len(filters), 1024):
            sock.sendall(_subscribe(chunk // 1024 + 1, filters[chunk:chunk + 1024]))
            _read_until(sock, 0x90, time.monotonic() + 120)  # SUBACK
        prefix = "/".join(["a"] * levels)
        block = b"".join(_publish(f"{prefix}/{n}", b"x") for n in range(256))
    else:
        raise ValueError(kind)
    while True:
        sock.sendall(block)
        _drain(sock)  # whatever the broker sends back (deliveries, SUBACKs) is thrown away
        sock.settimeout(None)


def probe(port: int, duration_s: float, out: Any) -> None:
    """QoS 1 round trips to its own subscription, RATE a second: latencies in ms."""
    try:
        sock = _session(port, "probe")
        sock.sendall(_subscribe(1, ["probe/t"], 1))
        _read_until(sock, 0x90, time.monotonic() + 60)
    except (TimeoutError, OSError, RuntimeError):  # the broker did not even let it in
        out.put(([], 1))
        return
    latencies: list[float] = []
    lost = 0
    end = time.monotonic() + duration_s
    packet_id = 0
    while time.monotonic() < end:
        packet_id = packet_id % 65000 + 1
        started = time.monotonic()
        sock.sendall(_publish("probe/t", b"p", qos=1, packet_id=packet_id))
        try:  # PUBACK and the message; each PUBLISH received is acknowledged
            deadline = started + 60
            got_ack = got_message = False
            buf = bytearray()
            while not (got_ack and got_message):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise RuntimeError("closed")
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + buf[1] and buf[1] < 128:
                    kind, size = buf[0] >> 4, buf[1]
                    body = bytes(buf[2:2 + size])
                    del buf[:2 + size]
                    if kind == 4:
                        got_ack = True
                    elif kind == 3:
                        got_message = True
                        mid = body[2 + len("probe/t"):4 + len("probe/t")]
                        sock.sendall(b"\x40\x02" + mid)  # PUBACK
            latencies.append((time.monotonic() - started) * 1000)
        except (TimeoutError, OSError, RuntimeError):
            lost += 1
            break
        pause = started + 1 / RATE - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # pacing the probe, not synchronisation
    sock.close()
    out.put((latencies, lost))


def measure(name: str, attack_kind: str | None, duration_s: float,
            edge_cmd: str | None) -> dict[str, Any]:
    rb = brokers.start(name, edge_cmd=edge_cmd)
    try:
        attacker = None
        peak = brokers.rss_kb(rb.pid)
        if attack_kind is not None:
            attacker = multiprocessing.Process(target=attack, args=(attack_kind, rb.port),
                                               daemon=True)
            attacker.start()
            time.sleep(WARMUP_S)  # the attack under way before the probe starts (not sync)
        queue: Any = multiprocessing.Queue()
        prober = multiprocessing.Process(target=probe, args=(rb.port, duration_s, queue))
        prober.start()
        result: tuple[list[float], int] = ([], 1)
        deadline = time.monotonic() + duration_s + 90
        while prober.is_alive() and time.monotonic() < deadline:
            peak = max(peak, brokers.rss_kb(rb.pid))
            prober.join(0.5)
        if not queue.empty():
            result = queue.get()
        prober.kill()
        if attacker is not None:
            attacker.kill()
        latencies, lost = result
        latencies.sort()

        def at(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) \
                if latencies else float("nan")
        return {"p50": at(0.5), "p99": at(0.99), "max": at(1.0), "round_trips": len(latencies),
                "timed_out": lost, "peak_rss_mb": peak // 1024}
    finally:
        rb.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="edge,mosquitto")
    parser.add_argument("--attacks", default="userprops,subunsub,overlap")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--edge-cmd", default=None)
    args = parser.parse_args()
    print(f"probe: QoS 1 round trips at {RATE:.0f}/s for {args.duration:.0f} s; ms")
    for kind in args.attacks.split(","):
        for name in args.brokers.split(","):
            alone = measure(name, None, args.duration, args.edge_cmd)
            loaded = measure(name, kind, args.duration, args.edge_cmd)
            print(f"{kind:10} {name:10} alone p50 {alone['p50']} p99 {alone['p99']} max "
                  f"{alone['max']} | attacked p50 {loaded['p50']} p99 {loaded['p99']} max "
                  f"{loaded['max']} ({loaded['round_trips']} round trips, "
                  f"{loaded['timed_out']} timed out) peak RSS {loaded['peak_rss_mb']} MB",
                  flush=True)


if __name__ == "__main__":
    main()
