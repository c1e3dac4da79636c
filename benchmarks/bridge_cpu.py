"""Broker CPU per message of a bridge's ingest and of its forwarding, separately.

    python -m benchmarks.bridge_cpu jetstream|kafka [MESSAGES] [PUBLISHERS] [QOS]

Starts nats-server (or tansu) on a free port but does not start it yet, an edge-broker with a
bridge to it (scenarios_bridge.bridge_toml), publishes MESSAGES (default 60,000) QoS 1
messages from PUBLISHERS (default 1) at full speed: the broker's CPU time meanwhile (user +
system, /proc/PID/stat) per message is the ingest cost. Then it starts the remote server and
waits until everything arrived: the broker's CPU time per message of that drain is the
forwarding cost. CPU time per message holds up on a shared machine far better than msgs/s
(benchmarks/results/h3-bridge.md).
"""

from __future__ import annotations

import sys
import threading
import time

from . import brokers, loadgen
from .scenarios_bridge import TOPIC, bridge_toml, counter, remote


def _cpu_s(pid: int) -> float:
    return brokers.cpu_ticks(pid) / brokers.CLK_TCK


def main(argv: list[str]) -> None:
    kind = argv[0]
    total = int(argv[1]) if len(argv) > 1 else 60_000
    publishers = int(argv[2]) if len(argv) > 2 else 1
    qos = int(argv[3]) if len(argv) > 3 else 1
    with remote(kind, started=False) as server:
        rb = brokers.start("edge", extra_config=bridge_toml(kind, server.address))
        try:
            results: list[dict] = []

            def one(n: int) -> None:
                results.append(loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
                    topic=f"{TOPIC}/{n}", qos=qos, duration_s=3600,
                    max_messages=total // publishers, client_id=f"bench-cpu-{n}"),
                    hard_timeout_s=600))

            c0, t0 = _cpu_s(rb.pid), time.monotonic()
            threads = [threading.Thread(target=one, args=(n,)) for n in range(publishers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            t1 = time.monotonic()
            sent = sum(int(r["acked"] if r["acked"] is not None else r["sent"])
                       for r in results)
            brokers.wait_quiet(rb.pid)  # QoS 0: the broker may still be reading
            c1 = _cpu_s(rb.pid)
            print(f"ingest  {kind}: {sent} messages, {publishers} publisher(s) QoS {qos}, "
                  f"{sent / (t1 - t0):,.0f} msgs/s, broker CPU {c1 - c0:.2f} s = "
                  f"{(c1 - c0) / sent * 1e6:.1f} us/msg")
            count = counter(kind, server, rb)
            c2, t2 = _cpu_s(rb.pid), time.monotonic()
            server.start()
            first = None
            arrived = 0
            while arrived < sent and time.monotonic() - t2 < 300:
                arrived = count()
                if arrived and first is None:
                    first = time.monotonic()
                time.sleep(0.05)
            t3, c3 = time.monotonic(), _cpu_s(rb.pid)
            rate = sent / (t3 - first) if first and t3 > first else 0.0
            print(f"forward {kind}: {arrived}/{sent} arrived, {rate:,.0f} msgs/s, broker CPU "
                  f"{c3 - c2:.2f} s = {(c3 - c2) / sent * 1e6:.1f} us/msg")
        finally:
            rb.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
