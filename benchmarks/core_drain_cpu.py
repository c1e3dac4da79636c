"""The broker's CPU per drained message, per thread, INCLUDING the retention of the drained
rows (which benchmarks/bridge_drain.py and bridge_cpu.py stop counting at the last arrival,
although the store deletes most of the passed rows after it: its retention steps start at
most 5 s after the rows were passed, then run until done).

    python -m benchmarks.core_drain_cpu [MESSAGES] [PUBLISHERS] [--edge-cmd CMD]

As bridge_cpu.py (JetStream, separate uplink process): MESSAGES QoS 1 messages (default
200,000) from PUBLISHERS (default 4) while nats-server is not running, then nats-server
starts and the backlog drains. Printed, per thread of the broker and for the uplink
process: CPU per message during the drain (start to last arrival), then for the drain plus
the retention that follows (until the store file's log table is empty, read-only).
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

from . import brokers
from .bridge_count import counter, wait_arrived
from .bridge_cpu import _cpu_s, _threads
from .scenarios_bridge import _children, bridge_toml, publish_backlog, remote

IDLE_S = 5.0


def _log_rows(data_dir: Path) -> int | None:
    """Rows left in the broker's log (None: no store file found)."""
    for path in sorted(data_dir.glob("*.db")) + sorted(data_dir.glob("*.sqlite*")):
        if path.name.endswith(("-wal", "-shm")):
            continue
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute("SELECT count(*) FROM log").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            continue
        return int(row[0])
    return None


def _print_threads(label: str, before: dict[int, tuple[str, float]],
                   after: dict[int, tuple[str, float]], pid: int, sent: int) -> None:
    for tid, (name, cpu) in sorted(after.items()):
        spent = cpu - before.get(tid, (name, 0.0))[1]
        if spent >= 0.005:
            main = " (event loop)" if tid == pid else ""
            print(f"    {label} thread {tid} {name}{main}: {spent:.2f} s = "
                  f"{spent / sent * 1e6:.2f} us/msg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core_drain_cpu")
    parser.add_argument("messages", type=int, nargs="?", default=200_000)
    parser.add_argument("publishers", type=int, nargs="?", default=4)
    parser.add_argument("--edge-cmd", default=None)
    args = parser.parse_args(argv)
    total, publishers = args.messages, args.publishers
    with remote("jetstream", started=False) as server:
        rb = brokers.start("edge", edge_cmd=args.edge_cmd,
                           extra_config=bridge_toml("jetstream", server.address))
        try:
            sent = publish_backlog(rb, total, publishers, client_prefix="core-drain",
                                   timeout_s=600)
            brokers.wait_quiet(rb.pid)
            child = next(iter(_children(rb.pid)), None)
            count = counter("jetstream", server.address, rb)
            # The broker's idle CPU per second (its maintenance ticks), to take out of the
            # drain + retention figure (whose wait is long when retention is slow).
            i0, ti0 = _threads(rb.pid), time.monotonic()
            time.sleep(IDLE_S)
            i1, idle_s = _threads(rb.pid), time.monotonic() - ti0
            idle = {tid: (cpu - i0.get(tid, (name, 0.0))[1]) / idle_s
                    for tid, (name, cpu) in i1.items()}
            c0, k0, t0, th0 = _cpu_s(rb.pid), _cpu_s(child), time.monotonic(), _threads(rb.pid)
            server.start()
            first, arrived = wait_arrived(count, sent, 300)
            c1, k1, t1, th1 = _cpu_s(rb.pid), _cpu_s(child), time.monotonic(), _threads(rb.pid)
            assert rb.data_dir is not None
            left = _log_rows(rb.data_dir)
            while left and time.monotonic() - t1 < 150:
                time.sleep(0.1)
                left = _log_rows(rb.data_dir)
            c2, t2, th2 = _cpu_s(rb.pid), time.monotonic(), _threads(rb.pid)
            rate = sent / (t1 - first) if first and t1 > first else 0.0
            print(f"drain: {arrived}/{sent} arrived, {rate:,.0f} msgs/s; broker CPU "
                  f"{c1 - c0:.2f} s = {(c1 - c0) / sent * 1e6:.2f} us/msg; uplink "
                  f"{(k1 - k0) / sent * 1e6:.2f} us/msg")
            _print_threads("drain", th0, th1, rb.pid, sent)
            print(f"drain + retention ({t2 - t0:.1f} s, log rows left {left}): broker CPU "
                  f"{c2 - c0:.2f} s = {(c2 - c0) / sent * 1e6:.2f} us/msg")
            _print_threads("all  ", th0, th2, rb.pid, sent)
            net = {tid: (name, cpu - idle.get(tid, 0.0) * (t2 - t0))
                   for tid, (name, cpu) in th2.items()}
            print(f"  less idle (per thread, measured over {idle_s:.1f} s before the drain):")
            _print_threads("net  ", th0, net, rb.pid, sent)
        finally:
            rb.stop()


if __name__ == "__main__":
    main()
