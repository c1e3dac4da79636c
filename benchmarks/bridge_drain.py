"""CPU per message of a bridge's backlog drain, per process: broker, uplink process, remote.

    python -m benchmarks.bridge_drain jetstream|kafka [MESSAGES] [PUBLISHERS]
        [--edge-cmd CMD] [--inprocess] [--py-spy FILE [--native]] [--window N]

As S14's drain (benchmarks/scenarios_bridge.py): the remote server (nats-server with
JetStream on a file store, or tansu) is not running while PUBLISHERS (default 2) QoS 1
devices publish MESSAGES (default 100,000) at full speed; then it starts, and the backlog
drains. Printed: the drain rate (first arrival to last, the stream's message count polled
every 0.05 s; JetStream also timed by nats-server's store times, see scenarios_bridge), and the
CPU time (utime + stime from /proc/PID/stat) per drained message of the broker, of its
uplink process (`separate_process = true`, the default here) and of the remote server, with
each one's share of a core during the drain. CPU per message holds up on a shared machine far
better than msgs/s. `--py-spy FILE` records the uplink process (or, with `--inprocess`, the
broker) with py-spy during the drain (raw collapsed stacks, `--nonblocking`).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import brokers
from .bridge_count import bridge_status, counter, stream_span, wait_arrived
from .scenarios_bridge import _children, bridge_toml, publish_backlog, remote

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def _times(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of the process, threads included; (0, 0) when gone."""
    if pid is None:
        return 0.0, 0.0
    try:
        _name, user, system = brokers.stat_times(f"/proc/{pid}/stat")
    except OSError:
        return 0.0, 0.0
    return user / brokers.CLK_TCK, system / brokers.CLK_TCK


def _line(name: str, before: tuple[float, float], after: tuple[float, float], sent: int,
          span: float) -> float:
    user, system = after[0] - before[0], after[1] - before[1]
    cpu = user + system
    print(f"  {name:7s} CPU {cpu:6.2f} s = {cpu / sent * 1e6:5.1f} us/msg (user "
          f"{user / sent * 1e6:4.1f}, system {system / sent * 1e6:4.1f}), "
          f"{cpu / span * 100:3.0f} % of a core")
    return cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bridge_drain")
    parser.add_argument("kind", choices=("jetstream", "kafka"))
    parser.add_argument("messages", type=int, nargs="?", default=100_000)
    parser.add_argument("publishers", type=int, nargs="?", default=2)
    parser.add_argument("--edge-cmd", default=None)
    parser.add_argument("--inprocess", action="store_true")
    parser.add_argument("--py-spy", default=None, metavar="FILE")
    parser.add_argument("--native", action="store_true",
                        help="with --py-spy: native frames too (compiled modules, C)")
    parser.add_argument("--perf", default=None, metavar="FILE",
                        help="perf record -g the uplink process and the remote into FILE")
    parser.add_argument("--window", type=int, default=None)
    args = parser.parse_args(argv)
    kind, total, publishers = args.kind, args.messages, args.publishers
    with remote(kind, started=False) as server:
        extra = bridge_toml(kind, server.address, separate=not args.inprocess)
        if args.window:
            extra += f"window = {args.window}\n"
        rb = brokers.start("edge", edge_cmd=args.edge_cmd, extra_config=extra)
        try:
            sent = publish_backlog(rb, total, publishers)
            brokers.wait_quiet(rb.pid)
            child = None if args.inprocess else next(iter(_children(rb.pid)), None)
            count = counter(kind, server.address, rb)
            spy = None
            target = child if child is not None else rb.pid
            if args.py_spy:
                spy = subprocess.Popen(
                    [PY_SPY, "record", "-r", "250", "-f", "raw",
                     "-o", args.py_spy, "--pid", str(target),
                     # native frames need the process paused for each sample
                     *(["--native"] if args.native else ["--nonblocking"])],
                    stdout=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches (not a synchronisation: it only records)
            b0, k0 = _times(rb.pid), _times(child)
            t0 = time.monotonic()
            server.start()
            assert server.proc is not None
            rpid = server.proc.pid
            perf = None
            if args.perf:
                perf = subprocess.Popen(["perf", "record", "-F", "2000", "-g", "-o", args.perf,
                                         "-p", f"{target},{rpid}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first, arrived = wait_arrived(count, sent, 600)
            t1 = time.monotonic()
            b1, k1, r1 = _times(rb.pid), _times(child), _times(rpid)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            span = t1 - t0
            rate = sent / (t1 - first) if first and t1 > first else 0.0
            print(f"drain {kind}: {arrived}/{sent} arrived, {rate:,.0f} msgs/s "
                  f"({t1 - first if first else 0:.2f} s), publishers {publishers}")
            if kind == "jetstream" and arrived >= sent:
                stored, first_ts, last_ts = stream_span(server.address)
                if stored > 1 and last_ts > first_ts:
                    print(f"  timed by nats-server (first to last store time): "
                          f"{(stored - 1) / (last_ts - first_ts):,.0f} msgs/s "
                          f"({last_ts - first_ts:.2f} s)")
            total_cpu = _line("broker", b0, b1, sent, span)
            if child:
                total_cpu += _line("uplink", k0, k1, sent, span)
            total_cpu += _line("remote", (0.0, 0.0), r1, sent, span)
            print(f"  all three {total_cpu / sent * 1e6:5.1f} us/msg; wall {span:.2f} s from "
                  "the remote's start (remote: CPU from its start)")
            status = bridge_status(rb)
            print(f"  bridge: forwarded {status.get('forwarded')}, failures "
                  f"{status.get('failures')}, last error {status.get('last_error')}")
        finally:
            rb.stop()


if __name__ == "__main__":
    main()
