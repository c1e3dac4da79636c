"""Broker CPU per message of a bridge's ingest and of its forwarding, separately.

    python -m benchmarks.bridge_cpu jetstream|kafka [MESSAGES] [PUBLISHERS] [QOS]
        [--edge-cmd CMD] [--inprocess] [--window N] [--py-spy FILE [--native]] [--perf FILE]

Starts nats-server (or tansu) on a free port but does not start it yet, an edge-broker with a
bridge to it (scenarios_bridge.bridge_toml, `separate_process = true` unless --inprocess),
publishes MESSAGES (default 60,000) QoS 1 messages from PUBLISHERS (default 1) at full speed:
the broker's CPU time meanwhile (user + system, /proc/PID/stat) per message is the ingest
cost. Then it starts the remote server and waits until everything arrived: the broker's CPU
time per message of that drain is the forwarding cost (and the uplink process's, when it has
one). CPU time per message holds up on a shared machine far better than msgs/s
(benchmarks/results/h3-bridge.md).

`--py-spy FILE` records the BROKER (not the uplink process: benchmarks/bridge_drain.py does
that) with py-spy during the drain, as raw collapsed stacks (`--nonblocking`; `--native`
adds native frames, pausing the process per sample). With Kafka the drain is counted by
asking the broker's admin socket every 0.05 s (its cost is in the broker's figure); with
JetStream the stream is asked, not the broker.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

from . import brokers
from .bridge_count import counter, wait_arrived
from .bridge_drain import PY_SPY
from .scenarios_bridge import _children, bridge_toml, publish_backlog, remote


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return brokers.cpu_ticks(pid) / brokers.CLK_TCK
    except (OSError, ValueError):
        return 0.0


def _threads(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of the process: (name, CPU seconds so far)."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name, user, system = brokers.stat_times(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        out[int(tid)] = (name, (user + system) / brokers.CLK_TCK)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bridge_cpu")
    parser.add_argument("kind", choices=("jetstream", "kafka"))
    parser.add_argument("messages", type=int, nargs="?", default=60_000)
    parser.add_argument("publishers", type=int, nargs="?", default=1)
    parser.add_argument("qos", type=int, nargs="?", default=1)
    parser.add_argument("--edge-cmd", default=None)
    parser.add_argument("--inprocess", action="store_true")
    parser.add_argument("--py-spy", default=None, metavar="FILE")
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--perf", default=None, metavar="FILE",
                        help="perf record -g the broker during the drain into FILE")
    args = parser.parse_args(argv)
    kind, total, publishers, qos = args.kind, args.messages, args.publishers, args.qos
    with remote(kind, started=False) as server:
        extra = bridge_toml(kind, server.address, separate=not args.inprocess)
        if args.window:
            extra += f"window = {args.window}\n"
        rb = brokers.start("edge", edge_cmd=args.edge_cmd, extra_config=extra)
        try:
            c0, t0 = _cpu_s(rb.pid), time.monotonic()
            sent = publish_backlog(rb, total, publishers, qos=qos, client_prefix="bench-cpu",
                                   timeout_s=600)
            t1 = time.monotonic()
            brokers.wait_quiet(rb.pid)  # QoS 0: the broker may still be reading
            c1 = _cpu_s(rb.pid)
            print(f"ingest  {kind}: {sent} messages, {publishers} publisher(s) QoS {qos}, "
                  f"{sent / (t1 - t0):,.0f} msgs/s, broker CPU {c1 - c0:.2f} s = "
                  f"{(c1 - c0) / sent * 1e6:.1f} us/msg")
            child = None if args.inprocess else next(iter(_children(rb.pid)), None)
            count = counter(kind, server.address, rb)
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [PY_SPY, "record", "-r", "250", "-f", "raw", "--threads", "-o", args.py_spy,
                     "--pid", str(rb.pid), *(["--native"] if args.native else ["--nonblocking"])],
                    stdout=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches (not a synchronisation: it only records)
            c2, k2, t2 = _cpu_s(rb.pid), _cpu_s(child), time.monotonic()
            th2 = _threads(rb.pid)
            perf = None
            if args.perf:
                perf = subprocess.Popen(["perf", "record", "-F", "2000", "-g", "-o", args.perf,
                                         "-p", str(rb.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server.start()
            first, arrived = wait_arrived(count, sent, 300)
            t3, c3, k3 = time.monotonic(), _cpu_s(rb.pid), _cpu_s(child)
            th3 = _threads(rb.pid)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            rate = sent / (t3 - first) if first and t3 > first else 0.0
            print(f"forward {kind}: {arrived}/{sent} arrived, {rate:,.0f} msgs/s, broker CPU "
                  f"{c3 - c2:.2f} s = {(c3 - c2) / sent * 1e6:.2f} us/msg, "
                  f"{(c3 - c2) / (t3 - t2) * 100:.0f} % of a core")
            for tid, (name, cpu) in sorted(th3.items()):
                spent = cpu - th2.get(tid, (name, 0.0))[1]
                if spent >= 0.005:
                    main_thread = " (event loop)" if tid == rb.pid else ""
                    print(f"        thread {tid} {name}{main_thread}: {spent:.2f} s = "
                          f"{spent / sent * 1e6:.2f} us/msg")
            if child is not None:
                print(f"        uplink process CPU {k3 - k2:.2f} s = "
                      f"{(k3 - k2) / sent * 1e6:.2f} us/msg")
        finally:
            rb.stop()


if __name__ == "__main__":
    main()
