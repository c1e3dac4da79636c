"""Fleet simulator for edge-broker: N devices (default 1,000) with random offline periods and
reboots, and a central subscriber that checks that every acknowledged reading arrived.

    python firmware_examples/fleet-simulator/simulate.py --devices 1000 --duration 600 \\
        --host 127.0.0.1 --port 1883 [--broker-pid PID] [--json report.json]

Exit status 0 when no acknowledged reading is missing at the central subscriber, 1 otherwise.
See README.md in this directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import run_worker  # this directory is not a package

DROPPED_SYS = "$SYS/broker/publish/messages/dropped"  # edge-broker's count of queue-full drops
QUEUED_SYS = "$SYS/broker/publish/messages/queued_memory"  # "N bytes": estimate of all queues


class Central:
    """Persistent session (clean session 0), QoS 1, on devices/+/telemetry; also follows the
    broker's count of deliveries dropped on full queues (to explain a loss) and its estimate of
    the memory its queues take (a backlog, for example this subscriber falling behind, explains
    a rise in the broker's RSS)."""

    def __init__(self, host: str, port: int, client_id: str, topic: str) -> None:
        self.broker_dropped: list[int] = []  # the values seen, first and last matter
        self.queued_memory: int | None = None  # the last value seen
        self.queued_memory_max = 0
        self.received: dict[str, list[int]] = defaultdict(list)
        self.lock = threading.Lock()
        self.count = 0
        self.subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=False)
        client.on_connect = lambda c, *_a: c.subscribe([(topic, 1), (DROPPED_SYS, 0),
                                                                 (QUEUED_SYS, 0)])
        client.on_subscribe = lambda *_a: self.subscribed.set()
        client.on_message = self._on_message
        client.reconnect_delay_set(0.1, 2)
        client.connect(host, port, keepalive=30)
        client.loop_start()
        self.client = client
        if not self.subscribed.wait(20):
            raise SystemExit(f"central subscriber: no SUBACK from {host}:{port}")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == DROPPED_SYS:
            self.broker_dropped.append(int(msg.payload))
            return
        if msg.topic == QUEUED_SYS:
            self.queued_memory = int(msg.payload.split()[0])
            self.queued_memory_max = max(self.queued_memory_max, self.queued_memory)
            return
        device = msg.topic.split("/")[1]
        seq = json.loads(msg.payload)["seq"]
        with self.lock:
            self.received[device].append(seq)
            self.count += 1

    def has(self, acked: dict[str, list[int]]) -> bool:
        with self.lock:
            return all(set(seqs) <= set(self.received.get(dev, ())) for dev, seqs in acked.items())

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--duration", type=float, default=600, help="seconds of readings")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    p.add_argument("--offline-rate", type=float, default=1 / 120,
                   help="chance per device per second of going offline")
    p.add_argument("--offline-max", type=float, default=20.0, help="longest offline period (s)")
    p.add_argument("--reboot-fraction", type=float, default=0.25,
                   help="share of offline events that are reboots (RAM lost)")
    p.add_argument("--buffer", type=int, default=100, help="readings buffered per device")
    p.add_argument("--max-inflight", type=int, default=10)
    p.add_argument("--backoff-min", type=float, default=0.5)
    p.add_argument("--backoff-max", type=float, default=30.0)
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds allowed after --duration for buffers and deliveries to empty")
    p.add_argument("--prefix", default=None, help="device id prefix (default: a per-run one)")
    p.add_argument("--seed", default="0")
    p.add_argument("--broker-pid", type=int, default=None, help="sample this process's RSS")
    p.add_argument("--rss-every", type=float, default=10.0)
    p.add_argument("--json", type=Path, default=None, help="write the report here too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    prefix = args.prefix or f"sim{os.getpid()}-"
    ids = [f"{prefix}{n:05d}" for n in range(args.devices)]
    central = Central(args.host, args.port, f"{prefix}central", "devices/+/telemetry")
    rss: list[tuple[float, int, int | None]] = []  # (time, RSS, broker's queued memory)
    stop_sampling = threading.Event()

    def sample() -> None:
        while args.broker_pid and not stop_sampling.is_set():
            value = rss_kib(args.broker_pid)
            if value is not None:
                rss.append((round(time.monotonic() - started, 1), value, central.queued_memory))
            stop_sampling.wait(args.rss_every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    opts = {"host": args.host, "port": args.port, "interval": args.interval,
            "buffer": args.buffer, "max_inflight": args.max_inflight,
            "offline_rate": args.offline_rate, "offline_max": args.offline_max,
            "reboot_fraction": args.reboot_fraction, "backoff_min": args.backoff_min,
            "backoff_max": args.backoff_max, "duration": args.duration, "drain": args.drain,
            "seed": args.seed}
    ctx = multiprocessing.get_context("spawn")  # no fork with the central's thread running
    results = ctx.Queue()
    workers = [ctx.Process(target=run_worker, args=(ids[i::args.processes], opts, results))
               for i in range(min(args.processes, len(ids)))]
    for worker in workers:
        worker.start()
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.duration + args.drain + 120
    for _ in workers:
        while True:
            try:
                got = results.get(timeout=1)
                break
            except queue.Empty:
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise SystemExit(f"a worker died (exit codes {dead}) or timed out") from None
        if isinstance(got, dict):
            raise SystemExit(f"a worker failed:\n{got['error']}")
        reports.extend(got)
    for worker in workers:
        worker.join(30)
    acked = {r["id"]: r["acked"] for r in reports}
    deadline = time.monotonic() + args.drain
    while not central.has(acked) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval for the last deliveries, bounded by the deadline
    central.stop()
    stop_sampling.set()
    sampler.join(5)
    if args.broker_pid and (value := rss_kib(args.broker_pid)) is not None:
        rss.append((round(time.monotonic() - started, 1), value, central.queued_memory))

    with central.lock:
        received = {dev: list(seqs) for dev, seqs in central.received.items()}
    missing = {dev: sorted(set(seqs) - set(received.get(dev, ())))
               for dev, seqs in acked.items()}
    missing = {dev: seqs for dev, seqs in missing.items() if seqs}
    total_received = sum(len(seqs) for seqs in received.values())
    unique = sum(len(set(seqs)) for seqs in received.values())
    # gaps: sequence numbers a device produced that never arrived (acknowledged or not)
    per_device_gaps = {r["id"]: sorted(set(range(r["produced"]))
                                       - set(received.get(r["id"], ()))) for r in reports}
    per_device_gaps = {dev: seqs for dev, seqs in per_device_gaps.items() if seqs}
    gaps = sum(len(seqs) for seqs in per_device_gaps.values())
    report = {
        "devices": args.devices, "duration_s": args.duration,
        "elapsed_s": round(time.monotonic() - started, 1),
        "produced": sum(r["produced"] for r in reports),
        "acknowledged": sum(len(r["acked"]) for r in reports),
        "received": total_received, "duplicates": total_received - unique,
        "missing_acknowledged": sum(len(s) for s in missing.values()),
        "missing_examples": dict(list(missing.items())[:10]),
        "gaps": gaps, "devices_with_gaps": len(per_device_gaps),
        "gap_examples": {dev: seqs[:20] for dev, seqs in list(per_device_gaps.items())[:5]},
        "dropped_buffer_full": sum(r["dropped"] for r in reports),
        "lost_on_reboot": sum(r["lost_on_reboot"] for r in reports),
        "unacked_at_end": sum(r["unacked"] for r in reports),
        "broker_dropped_deliveries": (central.broker_dropped[-1] - central.broker_dropped[0]
                                      if central.broker_dropped else None),
        "offline_events": sum(r["offline_events"] for r in reports),
        "reboots": sum(r["reboots"] for r in reports),
        "rss_kib_start": rss[0][1] if rss else None,
        "rss_kib_end": rss[-1][1] if rss else None,
        "rss_kib_max": max(v for _t, v, _q in rss) if rss else None,
        "rss_kib_samples": [f"{t}s:{v}" for t, v, _q in rss],
        "broker_queued_memory_max": central.queued_memory_max,
        "broker_queued_memory_samples": [f"{t}s:{q}" for t, _v, q in rss],
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
