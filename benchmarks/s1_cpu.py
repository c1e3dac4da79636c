"""S1 (QoS 0, 1 -> 1) as the broker's CPU per message, over real sockets.

    python -m benchmarks.s1_cpu --edge-cmd 'env -u PYTHONPATH PYTHONSAFEPATH=1 \\
        /tmp/cv/bin/python -m edge_broker run --config {config}' --runs 5
    python -m benchmarks.s1_cpu --broker mosquitto

The runner's S1 flow (one subscriber, one publisher, 100-byte payloads) at a fixed offered
rate (default 30,000 msgs/s, below every broker's limit here, so nothing is lost) for a fixed
number of messages, on one broker started once. For each run it reads the broker's CPU time
(utime + stime of the whole process from /proc) before the publisher starts and after the
subscriber has the last message, and prints microseconds of CPU per message delivered. Unlike
the max-rate search this hardly depends on what else runs on the machine: other processes
take the CPU away from the broker, they do not add to its CPU time. The median is the figure.
With `benchmarks.hotpath` (in-process, no sockets) this is the broker's cost with the
kernel's socket work and the event loop included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import brokers, loadgen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="edge", help="edge or mosquitto")
    parser.add_argument("--edge-cmd", default=None, help="as for python -m benchmarks")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=150_000)
    parser.add_argument("--rate", type=float, default=30_000.0)
    args = parser.parse_args()
    rb = brokers.start(args.broker, edge_cmd=args.edge_cmd)
    figures: list[float] = []
    try:
        for run in range(args.runs):
            pub = loadgen.PubSpec(topic="bench/s1cpu", rate=args.rate,
                                  duration_s=args.messages / args.rate + 30.0,
                                  max_messages=args.messages, client_id=f"s1cpu-pub-{run}")
            sub = loadgen.SubSpec(topic="bench/s1cpu", client_ids=[f"s1cpu-sub-{run}"],
                                  idle_s=1.0)
            before = brokers.cpu_ticks(rb.pid)
            result = loadgen.run_flow(rb.host, rb.port, pub, sub)
            ticks = brokers.cpu_ticks(rb.pid) - before
            delivered = int(result["delivered"])
            us = 1e6 * ticks / brokers.CLK_TCK / max(delivered, 1)
            figures.append(us)
            print(f"run {run + 1}: {delivered} delivered of {result['published']}, "
                  f"{us:.2f} us broker CPU per message", flush=True)
    finally:
        rb.stop()
    print(f"{args.broker}: median {statistics.median(figures):.2f} us, "
          f"min {min(figures):.2f} us broker CPU per message ({args.runs} runs)")


if __name__ == "__main__":
    main()
