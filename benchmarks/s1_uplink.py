"""S1 with every message uplinked (issue 9), the edge-broker side only: one full-speed S1
flow (QoS 0, one publisher -> one subscriber on `bench/s1`, 100 B) through a broker with a
separate-process JetStream bridge, then the wait until the bridge's backlog is empty.

    python -m benchmarks.s1_uplink [MESSAGES] [--plain] [--nice N] [--rate R] [--edge-cmd CMD]

Prints the flow's rates, CPU per message of the broker, of its uplink process and of
nats-server, and what the bridge reports once its backlog is empty (forwarded, dropped,
backlog, time to empty) - the figures S14's `_s1_pair` records, for one run. `--nice N`:
the uplink process reniced to N once started (as `process_nice = N` does; the script
renices, so that it also works with builds without that key). `--rate R`: the publisher
paced at R msgs/s (default: full speed). `forwarded_by_flow_end`: the bridge's `forwarded`
when the flow ended (the live forwarding; flow_s includes the subscriber's idle wait).
`latency_ms`: publish-to-delivery latency of the flow's messages (p50, p99, p99.9, max): a
stall of the broker's event loop (the QoS 0 lane's commits, h8-lane) shows in its tail.
"""

from __future__ import annotations

import os
import sys
import time

from . import brokers, loadgen
from .bridge_count import bridge_status
from .scenarios_bridge import bridge_toml, remote, uplink_process


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return brokers.cpu_ticks(pid) / brokers.CLK_TCK
    except OSError:
        return float("nan")


def main(argv: list[str]) -> None:
    edge_cmd = None
    if "--edge-cmd" in argv:
        i = argv.index("--edge-cmd")
        edge_cmd = argv[i + 1]
        del argv[i:i + 2]
    nice = None
    if "--nice" in argv:
        i = argv.index("--nice")
        nice = int(argv[i + 1])
        del argv[i:i + 2]
    rate = None
    if "--rate" in argv:
        i = argv.index("--rate")
        rate = float(argv[i + 1])
        del argv[i:i + 2]
    plain = "--plain" in argv
    argv = [a for a in argv if a != "--plain"]
    total = int(argv[0]) if argv else 500_000
    with remote("jetstream") as server:
        extra = "" if plain else bridge_toml("jetstream", server.address, separate=True)
        rb = brokers.start("edge", edge_cmd=edge_cmd, extra_config=extra)
        try:
            pid = rb.proc.pid
            child = None if plain else uplink_process(pid)
            if child is not None and nice is not None:  # the uplink process at a lower priority
                os.setpriority(os.PRIO_PROCESS, child, nice)
            brokers.wait_quiet(pid)
            nats = server.proc.pid if server.proc is not None else None
            b0, c0, n0 = _cpu(pid), _cpu(child), _cpu(nats)
            t0 = time.monotonic()
            flow = loadgen.run_flow(rb.host, rb.port, loadgen.PubSpec(
                topic="bench/s1", duration_s=3600, max_messages=total, rate=rate),
                loadgen.SubSpec(topic="bench/s1", idle_s=3.0, drain_s=5.0))
            t_end = time.monotonic()
            during = bridge_status(rb).get("forwarded") if not plain else None
            status: dict = {}
            empty_s = None
            while not plain and time.monotonic() - t_end < 180:
                status = bridge_status(rb)
                if status.get("backlog_messages") == 0 and status.get("forwarded", 0) + (
                        status.get("dropped") or 0) >= flow["published"]:
                    empty_s = time.monotonic() - t_end
                    break
                time.sleep(0.2)  # polling the admin socket, bounded by the deadline
            b1, c1, n1 = _cpu(pid), _cpu(child), _cpu(nats)
            print(rb.log_tail(12))
        finally:
            rb.stop()
    sent = flow["published"]
    print(f"{'plain' if plain else 'bridged'} nice={nice} sent={sent} "
          f"delivered={flow['delivered']} lost={flow['lost']} "
          f"publish_rate={flow['publish_rate']:,.0f}/s "
          f"delivered_rate={flow['delivered_rate']:,.0f}/s "
          f"broker={1e6 * (b1 - b0) / sent:.1f} us/msg child={1e6 * (c1 - c0) / sent:.1f} us/msg "
          f"nats={1e6 * (n1 - n0) / sent:.1f} us/msg forwarded={status.get('forwarded')} "
          f"dropped={status.get('dropped')} backlog={status.get('backlog_messages')} "
          f"empty_after_s={empty_s and round(empty_s, 1)} flow_s={t_end - t0:.1f} "
          f"forwarded_by_flow_end={during}")
    lat = flow.get("latency") or {}
    print(f"latency_ms p50={lat.get('p50_ms')} p99={lat.get('p99_ms')} "
          f"p99.9={lat.get('p999_ms')} max={lat.get('max_ms')}")


if __name__ == "__main__":
    main(sys.argv[1:])
