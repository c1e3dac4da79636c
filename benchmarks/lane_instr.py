"""Instructions per message of the broker's measured phase of S1 (issue 9), plain or with a
`separate_process = true` JetStream bridge taking `bench/#` whose server is down (the uplink
process runs, the lane is open, the messages go to the lane file and stay there): no
contention from forwarding, and counted in instructions, not time.

    python -m benchmarks.lane_instr plain|down [MESSAGES] [RATE] --edge-cmd CMD

CMD must run the broker under callgrind, e.g.
`env -u PYTHONPATH PYTHONSAFEPATH=1 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg/%p
/tmp/x-cv/bin/python -m edge_broker run --config {config}` (`env` before valgrind: valgrind does
not follow an exec). The counters are zeroed (`callgrind_control -z`) once the broker is idle
before the flow and dumped (`-d`) once it is idle after it; the last dump's `totals` divided
by the messages is the figure. `down` also prints the lane file's rows (one per loop turn
that carried lane messages) per message.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

from . import brokers, loadgen
from .lane_cpu import lane_rows
from .scenarios_bridge import bridge_toml, remote, uplink_process


def _dumps(pid: int, out_glob: str) -> list[str]:
    return sorted(glob.glob(out_glob.replace("%p", str(pid)) + "*"))


def main(argv: list[str]) -> None:
    i = argv.index("--edge-cmd")
    edge_cmd = argv[i + 1]
    del argv[i:i + 2]
    out = os.environ.get("CG_OUT", "/tmp/cg/%p")
    mode = argv[0]
    total = int(argv[1]) if len(argv) > 1 else 50_000
    rate = float(argv[2]) if len(argv) > 2 else 0.0
    with remote("jetstream", started=False) as server:
        extra = bridge_toml("jetstream", server.address, separate=True) if mode != "plain" \
            else ""
        rb = brokers.start("edge", edge_cmd=edge_cmd, extra_config=extra, ready_timeout_s=300)
        try:
            pid = rb.proc.pid
            if mode != "plain":
                uplink_process(pid, timeout_s=120)
            time.sleep(3)  # (a benchmark, not a test) let the lane open, start-up settle
            brokers.wait_quiet(pid, timeout_s=120)
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True,
                           capture_output=True)
            t0 = time.monotonic()
            flow = loadgen.run_flow(rb.host, rb.port, loadgen.PubSpec(
                topic="bench/s1", rate=rate or None, duration_s=3600, max_messages=total),
                loadgen.SubSpec(topic="bench/s1"))
            elapsed = time.monotonic() - t0
            brokers.wait_quiet(pid, timeout_s=300)
            before = set(_dumps(pid, out))
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                           capture_output=True)
            deadline = time.monotonic() + 60
            new: list[str] = []
            while not new and time.monotonic() < deadline:
                time.sleep(0.2)
                new = [p for p in _dumps(pid, out) if p not in before]
            totals = 0
            time.sleep(1)
            with open(new[0]) as f:
                for line in f:
                    if line.startswith("totals:") or line.startswith("summary:"):
                        totals = int(line.split()[1])
            rows, lane_msgs = lane_rows(rb.data_dir) if mode != "plain" else (0, 0)
        finally:
            rb.stop()
    sent = flow["published"]
    print(f"mode={mode} sent={sent} delivered={flow['delivered']} "
          f"publish_rate={flow['publish_rate']:,.0f}/s wall={elapsed:.1f}s "
          f"instr={totals:,} instr/msg={totals / sent:,.0f} dump={new[0]} "
          f"lane_rows={rows} lane_msgs={lane_msgs} "
          f"msgs/row={lane_msgs / rows if rows else 0:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
