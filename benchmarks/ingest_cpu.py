"""S4 ingest as CPU seconds per message: a noise-robust figure for the durable ingest path.

    python -m benchmarks.ingest_cpu                       # fsync, 40,000 messages, 3 runs
    python -m benchmarks.ingest_cpu --messages 60000 --runs 5 --durability os
    python -m benchmarks.ingest_cpu --spy /tmp/s4.txt     # py-spy (per thread) of one run
    python -m benchmarks.ingest_cpu --edge-cmd "env PYTHONPATH=/tmp/old {python} \\
        -m edge_broker run --config {config}"                # another checkout

The S4 ingest of the runner (one QoS 1 publisher, window 100, 100-byte payloads, into 10
offline persistent sessions), on a fresh broker per run, with a fixed number of messages
instead of a fixed time. For each run it reads the broker's CPU time (utime + stime from
/proc, per thread) before and after the publisher's last PUBACK and prints microseconds of
CPU per message: the whole process, the event loop's thread, the store's writer thread and
the rest. On a machine shared with other work the rate moves by 2-3x from run to run; the CPU
per message moves far less (other processes take the CPU away, they do not add to ours).
The median of the runs is the figure.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import brokers, loadgen

TOPIC = "bench/s4"


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks (utime + stime) per thread kind: loop (the main thread), writer (the store's
    executor thread), other."""
    out: dict[str, int] = collections.Counter()
    other = False
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda t: int(t.name)):
        try:
            raw = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        if task.name == str(pid):
            kind = "loop"
        elif comm.startswith("edge-broker-sto") or not other:
            # Python does not name its threads for the OS: the first other thread is the
            # store's writer (its executor starts before any other).
            kind = "writer"
            other = True
        else:
            kind = "other"
        out[kind] += ticks
    return out


def one_run(args: argparse.Namespace, spy: str | None) -> dict[str, float]:
    rb = brokers.start("edge", edge_cmd=args.edge_cmd, edge_durability=args.durability)
    try:
        ids = [f"bench-s4-sub{k}" for k in range(args.sessions)]
        loadgen.setup_offline_sessions(rb.host, rb.port, TOPIC, ids)
        brokers.wait_quiet(rb.pid)
        proc = None
        if spy:
            proc = subprocess.Popen(["py-spy", "record", "--pid", str(rb.pid), "--format",
                                     "raw", "--threads", "--rate", "250", "--nonblocking",
                                     "-o", spy], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the ingest starts
        t0 = thread_ticks(rb.pid)
        p = loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
            topic=TOPIC, qos=1, duration_s=600.0, window=100, max_messages=args.messages,
            ack_wait_s=30.0), hard_timeout_s=600.0)
        t1 = thread_ticks(rb.pid)
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    finally:
        rb.stop()
    acked = p["acked"]
    elapsed = (p["t_done_ns"] - p["t_first_ns"]) / 1e9
    tick_us = 1e6 / brokers.CLK_TCK
    out = {k: (t1[k] - t0.get(k, 0)) * tick_us / acked for k in ("loop", "writer", "other")}
    out["total"] = sum(out.values())
    out["rate"] = acked / elapsed
    out["acked"] = acked
    return out


def summarise_spy(path: str, top: int) -> None:
    """Self and inclusive samples per function, per thread, from py-spy's raw output."""
    selfs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        names = [f.rsplit(" (", 1)[0] + " " + f.rsplit("/", 1)[-1].rstrip(")").split(":")[0]
                 for f in frames[1:]]
        n = int(count)
        totals[thread] += n
        if names:
            selfs[thread][frames[-1]] += n
            for name in set(names):
                incl[thread][name] += n
    for thread, total in totals.most_common():
        print(f"\n== {thread}: {total} samples")
        print("  inclusive:")
        for name, n in incl[thread].most_common(top):
            print(f"    {n:6d} {100 * n / total:5.1f}%  {name}")
        print("  self (function:line):")
        for name, n in selfs[thread].most_common(top):
            print(f"    {n:6d} {100 * n / total:5.1f}%  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=40_000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--durability", default="fsync", choices=("fsync", "os", "none"))
    ap.add_argument("--edge-cmd", default=None, help="as benchmarks.run's --edge-cmd")
    ap.add_argument("--spy", default=None, help="py-spy raw output of the first run here")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    rows = []
    for k in range(args.runs):
        r = one_run(args, args.spy if k == 0 else None)
        rows.append(r)
        print(f"run {k + 1}: {r['acked']:.0f} acked, {r['rate']:,.0f} msgs/s, CPU us/msg: "
              f"total {r['total']:.1f} = loop {r['loop']:.1f} + writer {r['writer']:.1f} "
              f"+ other {r['other']:.1f}", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median: {med['rate']:,.0f} msgs/s, CPU us/msg: total {med['total']:.1f} = loop "
          f"{med['loop']:.1f} + writer {med['writer']:.1f} + other {med['other']:.1f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.spy:
        summarise_spy(args.spy, args.top)


if __name__ == "__main__":
    main()
