"""The load generator's own ceiling, with no broker: one publisher process writing into a
discarding fake broker, and one subscriber process reading from a fake broker that blasts
pre-encoded PUBLISH packets. If a broker's figure comes close to these, the figure is the load
generator's, not the broker's."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from . import loadgen, wire


def _fake_broker(listener: socket.socket, mode: str, payload_size: int, duration_s: float,
                 out: Any) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    deadline = time.monotonic() + 10
    wire.recv_packet(conn, buf, deadline)          # CONNECT
    conn.sendall(b"\x20\x02\x00\x00")
    if mode == "sink":
        conn.settimeout(duration_s + 10)
        total = len(buf)
        while True:
            chunk = conn.recv(1 << 18)
            if not chunk:
                break
            total += len(chunk)
        out.put(("done", "fake", {"bytes": total}))
        return
    wire.recv_packet(conn, buf, deadline)          # SUBSCRIBE
    conn.sendall(b"\x90\x03\x00\x01\x00")
    pad = b"x" * (payload_size - 16)
    pkt_prefix = wire.publish_prefix("bench/ceiling", payload_size, 0)
    batch = 512
    sent = 0
    end = time.monotonic() + duration_s
    conn.settimeout(duration_s + 10)
    while time.monotonic() < end:
        ts = time.perf_counter_ns()
        conn.sendall((pkt_prefix + struct.pack(">QQ", ts, sent) + pad) * batch)
        sent += batch
    out.put(("done", "fake", {"sent": sent}))
    conn.recv(1024)  # wait for the subscriber's DISCONNECT / close
    conn.close()


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def publisher_ceiling(duration_s: float = 3.0, payload_size: int = 100) -> dict:
    lst = _listener()
    port = lst.getsockname()[1]
    crew = loadgen.Crew(duration_s + 30)
    go = loadgen.CTX.Event()
    try:
        crew.start(_fake_broker, lst, "sink", payload_size, duration_s, crew.out)
        spec = loadgen.PubSpec(topic="bench/ceiling", duration_s=duration_s,
                               payload_size=payload_size)
        crew.start(loadgen._publisher, "127.0.0.1", port, spec, None, crew.out, go,
                   crew.deadline)
        crew.wait_for({"pub"}, "ready")
        go.set()
        crew.wait_for({"pub", "fake"}, "done")
    finally:
        crew.close()
        lst.close()
    p = crew.results["pub"]
    return {"msgs_per_s": round(p["sent"] / p["elapsed_s"]), "cpu_s": p["cpu_s"],
            "elapsed_s": p["elapsed_s"]}


def subscriber_ceiling(duration_s: float = 3.0, payload_size: int = 100) -> dict:
    lst = _listener()
    port = lst.getsockname()[1]
    crew = loadgen.Crew(duration_s + 30)
    expected = loadgen.CTX.Value("q", -1, lock=False)
    try:
        crew.start(_fake_broker, lst, "source", payload_size, duration_s, crew.out)
        spec = loadgen.SubSpec(topic="bench/ceiling", client_ids=["ceiling-sub"], idle_s=2.0)
        crew.start(loadgen._subscriber, "127.0.0.1", port, spec, None, crew.out, expected,
                   crew.deadline, "sub")
        crew.wait_for({"fake"}, "done")
        expected.value = crew.results["fake"]["sent"]
        crew.wait_for({"sub"}, "done")
    finally:
        crew.close()
        lst.close()
    s = crew.results["sub"]
    window = (s["t_last_ns"] - s["t_first_ns"]) / 1e9
    return {"msgs_per_s": round(s["received"] / window), "received": s["received"],
            "sent": crew.results["fake"]["sent"], "cpu_s": s["cpu_s"]}


def measure(duration_s: float = 3.0) -> dict:
    return {"publisher_qos0": publisher_ceiling(duration_s),
            "subscriber_qos0": subscriber_ceiling(duration_s)}


if __name__ == "__main__":
    import json
    print(json.dumps(measure(), indent=2))
