"""The read side of the log (issue 8: S9 replay, S4 drain), as broker CPU per message.

    python -m benchmarks.read_bench replay --messages 200000
    python -m benchmarks.read_bench drain --messages 20000 --durability fsync
    python -m benchmarks.read_bench replay --edge-cmd "env PYTHONPATH=/tmp/old {python} \\
        -m edge_broker run --config {config}" --spy /tmp/replay.txt

On a machine shared with other work a rate varies by 2-3x between runs; the CPU time the
broker process spends per message (utime + stime from /proc, all threads) much less. Both
are printed, plus the rate.

replay: the stream `s9` (filter `bench/s9/#`) is filled directly in the store file (the
broker is started once to create it, stopped, the rows appended with `Log.append` as the
broker would, 100-byte QoS 0 messages on one topic), the broker is started again and one
MQTT 5 subscriber replays the whole history from `earliest` at QoS 0 (the S9 replayer of
scenarios_log.py). The fill costs seconds, not the minutes of S9's socket fill.

drain: S4's drain: 10 persistent sessions subscribe to `bench/s4` at QoS 1 and go offline,
one publisher publishes `--messages` QoS 1 messages (window 100), and once the broker is
idle the 10 sessions reconnect and read their backlog (loadgen.drain, 2 processes).

`--spy FILE`: py-spy records the broker during the measured phase (raw stacks; summarise
with `--summary FILE`).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import brokers, loadgen
from .scenarios_log import REPLAY_STREAM, REPLAY_TOPIC, edge_streams_config, replay

STREAM = {"name": REPLAY_STREAM, "filter": "bench/s9/#", "max_age": "30d",
          "max_bytes": 64 * 1024 * 1024 * 1024}


def _start(workdir: Path, streams: list[dict], durability: str | None,
           edge_cmd: str | None) -> brokers.RunningBroker:
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    port = brokers.free_port()
    config = workdir / "edge-broker.toml"
    config.write_text(edge_streams_config(port, data_dir, durability, streams))
    cmd = brokers.edge_command(edge_cmd or brokers.EDGE_DEFAULT_CMD, port=port, config=config,
                               data_dir=data_dir)
    log = open(workdir / "broker.log", "ab")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=workdir, env=brokers._edge_env(), start_new_session=True)
    log.close()
    rb = brokers.RunningBroker("edge", proc, port, workdir, cmd, config, data_dir=data_dir)
    brokers._wait_ready(rb, 300.0)
    return rb


def _stop(rb: brokers.RunningBroker) -> None:
    if rb.proc.poll() is None:
        rb.proc.send_signal(signal.SIGTERM)
        rb.proc.wait(timeout=60)


def _fill(db: Path, n: int) -> None:
    from edge_broker.store.log import Log, LogMessage, StreamConfig, transaction

    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    log = Log([StreamConfig(REPLAY_STREAM, "bench/s9/#", 30 * 86400.0, STREAM["max_bytes"])])
    with transaction(conn):
        log.load(conn)
    payload = bytes(range(100))
    now = time.time()
    group = 512
    for start in range(0, n, group * 64):
        with transaction(conn):
            for first in range(start, min(n, start + group * 64), group):
                log.append(conn, [LogMessage(REPLAY_TOPIC, payload)
                                  for _ in range(min(group, n - first))], now)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


class _Callgrind:
    """With --callgrind: the broker runs under `valgrind --tool=callgrind` (see --edge-cmd
    in main) and only the measured phase is counted (callgrind_control zeroes the counters
    before it and dumps them after); `instructions()` is the dump's total."""

    def __init__(self, pid: int, out: str | None) -> None:
        self.pid = pid
        self.out = out
        if out:
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True,
                           capture_output=True, timeout=600)

    def instructions(self) -> int | None:
        if not self.out:
            return None
        before = set(Path(self.out).parent.glob(Path(self.out).name + "*"))
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True,
                       capture_output=True, timeout=600)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            new = set(Path(self.out).parent.glob(Path(self.out).name + "*")) - before
            for path in new:
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith("totals:") or line.startswith("summary:"):
                        return int(line.split()[1])
            time.sleep(0.5)
        return None


class _Spy:
    def __init__(self, pid: int, out: str | None) -> None:
        self.proc = None
        if out:
            exe = Path(sys.executable).with_name("py-spy")
            self.proc = subprocess.Popen(
                [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid),
                 "--format", "raw", "--rate", "250", "--nonblocking", "-o", out],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the phase starts

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)


def bench_replay(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="read-bench-replay-"))
    try:
        rb = _start(workdir, [STREAM], "os", args.edge_cmd)
        _stop(rb)
        t0 = time.monotonic()
        _fill(workdir / "data" / "edge-broker.db", args.messages)
        fill_s = time.monotonic() - t0
        for run in range(args.runs):
            rb = _start(workdir, [STREAM], "os", args.edge_cmd)
            try:
                brokers.wait_quiet(rb.pid)
                spy = _Spy(rb.pid, args.spy if run == 0 else None)
                grind = _Callgrind(rb.pid, args.callgrind)
                c0 = brokers.cpu_ticks(rb.pid)
                r = replay(rb.host, rb.port, REPLAY_STREAM, args.messages, hard_timeout_s=3600)
                c1 = brokers.cpu_ticks(rb.pid)
                spy.stop()
                ins = grind.instructions()
                if ins is not None:
                    print(f"replay run {run}: {ins / max(1, r['received']):,.0f} instructions "
                          f"per message (callgrind)", flush=True)
            finally:
                _stop(rb)
            window_s = (r["t_last_ns"] - r["t0_ns"]) / 1e9
            cpu_us = (c1 - c0) / brokers.CLK_TCK * 1e6 / max(1, r["received"])
            busy = 100 * cpu_us * r["received"] / 1e6 / window_s
            print(f"replay run {run}: {r['received']:,}/{args.messages:,} messages "
                  f"(fill {fill_s:.1f} s), {r['received'] / window_s:,.0f} msgs/s, "
                  f"broker CPU {cpu_us:.2f} us/msg ({busy:.0f}% "
                  f"busy), replayer CPU {r['cpu_s'] * 1e6 / max(1, r['received']):.2f} us/msg, "
                  f"first {r['first']}, last {r['last']}",
                  flush=True)
    finally:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


def bench_drain(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="read-bench-drain-"))
    ids = [f"bench-s4-sub{k}" for k in range(args.sessions)]
    topic = "bench/s4"
    try:
        for run in range(args.runs):
            rb = _start(workdir, [], args.durability, args.edge_cmd)
            try:
                loadgen.setup_offline_sessions(rb.host, rb.port, topic, ids)
                p = loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
                    topic=topic, qos=1, duration_s=600, window=100,
                    max_messages=args.messages, ack_wait_s=30.0), hard_timeout_s=700)
                brokers.wait_quiet(rb.pid)
                sub = loadgen.SubSpec(topic=topic, qos=1, client_ids=ids, clean=False,
                                      subscribe=False, idle_s=15.0, drain_s=600,
                                      connect_timeout_s=60)
                spy = _Spy(rb.pid, args.spy if run == 0 else None)
                grind = _Callgrind(rb.pid, args.callgrind)
                c0 = brokers.cpu_ticks(rb.pid)
                d = loadgen.drain(rb.host, rb.port, sub, p["acked"], sub_procs=2,
                                  hard_timeout_s=3600)
                brokers.wait_quiet(rb.pid, timeout_s=10.0)
                c1 = brokers.cpu_ticks(rb.pid)
                spy.stop()
                ins = grind.instructions()
                if ins is not None:
                    print(f"drain run {run}: {ins / max(1, d['delivered']):,.0f} instructions "
                          f"per message (callgrind)", flush=True)
            finally:
                _stop(rb)
                import shutil
                shutil.rmtree(workdir / "data", ignore_errors=True)
            cpu_us = (c1 - c0) / brokers.CLK_TCK * 1e6 / max(1, d["delivered"])
            print(f"drain run {run}: {d['delivered']:,}/{d['expected']:,} delivered "
                  f"(durability {args.durability}), {d['rate']:,.0f} msgs/s, broker CPU "
                  f"{cpu_us:.2f} us/msg (incl. the acks' commits)", flush=True)
    finally:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


def summary(path: str, top: int) -> None:
    """Self and total samples per function of a py-spy raw file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if "MainThread" not in frames[0] and "process" not in frames[0]:
            pass
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    print(f"{samples} samples")
    print("-- self")
    for frame, n in own.most_common(top):
        print(f"{100 * n / samples:5.1f}%  {frame}")
    print("-- total")
    for frame, n in total.most_common(top):
        print(f"{100 * n / samples:5.1f}%  {frame}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["replay", "drain", "summary"])
    ap.add_argument("file", nargs="?", help="summary: the py-spy raw file")
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--edge-cmd")
    ap.add_argument("--spy", help="py-spy raw output file (first run)")
    ap.add_argument("--callgrind", metavar="OUT",
                    help="run the broker under callgrind (output file prefix) and count the "
                    "instructions of the measured phase; slow: use few messages")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    if args.callgrind:
        args.edge_cmd = ("valgrind --tool=callgrind --callgrind-out-file=" + args.callgrind
                         + ".%p " + (args.edge_cmd or brokers.EDGE_DEFAULT_CMD))
    if args.what == "replay":
        bench_replay(args)
    elif args.what == "drain":
        bench_drain(args)
    else:
        summary(args.file, args.top)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
