"""CPU per message of S1 with every message uplinked (issue 9): the broker's and the uplink
process's, separately (/proc/PID/stat, user + system).

    python -m benchmarks.lane_cpu MODE [MESSAGES] [RATE] [--edge-cmd CMD] [--stop-child]

MODE: `plain` (no bridge), `down` (a separate-process JetStream bridge whose server is not
running: only the ingest side), `up` (its server running: ingest and forwarding). S1's flow:
QoS 0, one publisher -> one subscriber on `bench/s1`, 100 B, paced at RATE msgs/s (default
30,000; 0: full speed), MESSAGES (default 150,000). `nats` is nats-server's CPU. The CPU
is read before and after the flow, after the broker (and its child) went quiet, so the
forwarding of the tail is counted. `down` also prints the lane file's rows and messages per
row (the lane's appends: one INSERT and commit each).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from . import brokers, loadgen
from .bridge_count import wait_backlog_empty
from .scenarios_bridge import bridge_toml, remote, uplink_process


def _cpu(pid: int) -> float:
    return brokers.cpu_ticks(pid) / brokers.CLK_TCK


def _sys(pid: int) -> float:
    """The system (kernel) part alone."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2:].split()[12]) / brokers.CLK_TCK


def main(argv: list[str]) -> None:
    edge_cmd = None
    if "--edge-cmd" in argv:
        i = argv.index("--edge-cmd")
        edge_cmd = argv[i + 1]
        del argv[i:i + 2]
    nice_child = 0
    if "--nice-child" in argv:  # an experiment: the uplink process at a lower priority
        i = argv.index("--nice-child")
        nice_child = int(argv[i + 1])
        del argv[i:i + 2]
    stop_child = "--stop-child" in argv  # the uplink process SIGSTOPped during the flow
    if stop_child:
        argv.remove("--stop-child")
    mode = argv[0]
    total = int(argv[1]) if len(argv) > 1 else 150_000
    rate = float(argv[2]) if len(argv) > 2 else 30_000.0
    with remote("jetstream", started=mode == "up") as server:
        extra = bridge_toml("jetstream", server.address, separate=True) if mode != "plain" \
            else ""
        rb = brokers.start("edge", edge_cmd=edge_cmd, extra_config=extra)
        try:
            pid = rb.proc.pid
            child = uplink_process(pid) if mode != "plain" else None
            if child and nice_child:
                os.setpriority(os.PRIO_PROCESS, child, nice_child)
            brokers.wait_quiet(pid)
            nats = server.proc.pid if server.proc is not None else None
            b0, c0, s0 = _cpu(pid), _cpu(child) if child else 0.0, _sys(pid)
            n0 = _cpu(nats) if nats else 0.0
            if child and stop_child:
                os.kill(child, signal.SIGSTOP)
            t0 = time.monotonic()
            flow = loadgen.run_flow(rb.host, rb.port, loadgen.PubSpec(
                topic="bench/s1", rate=rate or None, duration_s=3600, max_messages=total),
                loadgen.SubSpec(topic="bench/s1"))
            elapsed = time.monotonic() - t0
            brokers.wait_quiet(pid)
            if child and stop_child:
                b1, s1 = _cpu(pid), _sys(pid)  # before the process reads what waited
                os.kill(child, signal.SIGCONT)
            if child:
                brokers.wait_quiet(child)
            if not (child and stop_child):
                b1, s1 = _cpu(pid), _sys(pid)
            c1 = _cpu(child) if child else 0.0
            uplink = wait_backlog_empty(rb, flow["published"]) if mode == "up" else {}
            n1 = _cpu(nats) if nats else 0.0
            rows = lane_rows(rb.data_dir) if mode == "down" else (0, 0)
        finally:
            rb.stop()
    sent = flow["published"]
    print(f"mode={mode} sent={sent} delivered={flow['delivered']} "
          f"publish_rate={flow['publish_rate']:,.0f}/s wall={elapsed:.1f}s "
          f"broker={1e6 * (b1 - b0) / sent:.1f} us/msg (system {1e6 * (s1 - s0) / sent:.1f}) "
          f"child={1e6 * (c1 - c0) / sent:.1f} us/msg nats={1e6 * (n1 - n0) / sent:.1f} us/msg "
          f"loadgen={1e6 * flow['loadgen_cpu_s'] / sent:.1f} us/msg "
          f"forwarded={uplink.get('forwarded')} dropped={uplink.get('dropped')}"
          + (f" lane_rows={rows[0]} msgs/row={rows[1] / rows[0]:.1f}" if rows[0] else ""))


def lane_rows(data_dir: Path | None) -> tuple[int, int]:
    """(rows, messages) in the lane file (`down`: everything stays there)."""
    if data_dir is None:
        return 0, 0
    for path in Path(data_dir).glob("**/*.lane-*"):
        if path.name.endswith(("-wal", "-shm")):
            continue
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows, messages = db.execute(
                    "SELECT count(*), coalesce(sum(count), 0) FROM lane").fetchone()
            finally:
                db.close()
            return int(rows), int(messages)
        except sqlite3.Error:
            continue
    return 0, 0


if __name__ == "__main__":
    main(sys.argv[1:])
