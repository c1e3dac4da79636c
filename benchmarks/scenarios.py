"""The scenarios S1-S10 (S9, the log's replay and ingest: scenarios_log.py; S11-S13, TLS and
ACL: scenarios_security.py). Each takes a `Case` (which broker, which options) and returns a
`Result`: figures (metric id -> number), checks (delivery counts) and details.

Every scenario starts its own broker(s) through `case.launch()`, so one scenario's leftovers
(queues, memory) never colour the next one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import brokers, loadgen


@dataclass(frozen=True)
class Metric:
    id: str
    label: str
    unit: str
    better: str  # "higher" | "lower"
    # Brokers without this figure show `fallback`'s in its row (S4 per durability: mosquitto
    # and amqtt have no durability setting, their one S4 figure is repeated).
    fallback: str | None = None
    compare: bool = True  # judged against amqtt (">= 10x amqtt")


# edge-broker's S4 runs once per `[storage] durability` (Options.s4_durabilities).
DURABILITIES = ("fsync", "os", "none")
S4_NOTE = "(*)"


def _s4_metrics() -> list[Metric]:
    out = [Metric("S4.ingest_msgs_per_s", "S4 QoS 1 into 10 offline sessions: ingest", "msgs/s",
                  "higher"),
           Metric("S4.drain_msgs_per_s", "S4 QoS 1 offline sessions: drain", "msgs/s",
                  "higher")]
    for d in DURABILITIES:
        out.append(Metric(f"S4.{d}.ingest_msgs_per_s",
                          f"S4 ingest into 10 offline sessions, edge durability {d} {S4_NOTE}",
                          "msgs/s", "higher", fallback="S4.ingest_msgs_per_s"))
    for d in DURABILITIES:
        out.append(Metric(f"S4.{d}.drain_msgs_per_s",
                          f"S4 drain of the 10 sessions, edge durability {d} {S4_NOTE}",
                          "msgs/s", "higher", fallback="S4.drain_msgs_per_s"))
    for what in ("commits", "fsyncs"):
        for d in DURABILITIES:
            out.append(Metric(f"S4.{d}.{what}_per_msg",
                              f"S4 ingest: store {what} per message, durability {d}",
                              "per msg", "lower", compare=False))
    return out


# S10 fairness (benchmarks/fairness.py): part -> (label, what the load figure counts).
S10_PARTS = {
    "idle": ("no load (reference)", ""),
    "flood": ("(a) 1 client floods QoS 0, no subscriber", "flood msgs/s accepted"),
    "flood_sub": ("(a) 1 client floods QoS 0 to 1 subscriber", "flood msgs/s accepted"),
    "churn": ("(b) 20 clients churn persistent sessions",
              "churn cycles/s (CONNECT, SUBSCRIBE, DISCONNECT)"),
    "takeover": ("(c) 200 connections take over 1 client id", "takeover CONNACKs/s"),
}


def _s10_metrics() -> list[Metric]:
    out = []
    for part, (label, load) in S10_PARTS.items():
        out.append(Metric(f"S10.{part}.rtt_p99_ms",
                          f"S10 {label}: control QoS 1 round trip p99", "ms", "lower",
                          compare=False))
        out.append(Metric(f"S10.{part}.round_trips_per_s",
                          f"S10 {label}: control round trips/s", "per s", "higher",
                          compare=False))
        if load:
            out.append(Metric(f"S10.{part}.load_per_s", f"S10 {label}: {load}", "per s",
                              "higher", compare=False))
    return out


def _s14_metrics() -> list[Metric]:
    """S14 bridges (benchmarks/scenarios_bridge.py); "mqtt" is mosquitto's bridge."""
    out = []
    for kind, name in (("jetstream", "JetStream"), ("kafka", "Kafka"),
                       ("mqtt", "MQTT (mosquitto bridge)")):
        out += [Metric(f"S14.{kind}.live_fwd_msgs_per_s",
                       f"S14 uplink to {name} while publishing at full speed: forwarded",
                       "msgs/s", "higher", compare=False),
                Metric(f"S14.{kind}.live_pub_msgs_per_s",
                       f"S14 uplink to {name}: publishers' QoS 1 rate (edge: 4 devices)",
                       "msgs/s", "higher", compare=False),
                Metric(f"S14.{kind}.drain_msgs_per_s",
                       f"S14 uplink to {name}: backlog drain after an outage", "msgs/s",
                       "higher", compare=False),
                Metric(f"S14.{kind}.drain_vs_live_pct",
                       f"S14 uplink to {name}: drain rate / live forwarding rate", "%",
                       "higher", compare=False),
                Metric(f"S14.{kind}.live_cpu_us_per_msg",
                       f"S14 uplink to {name}: broker CPU per message, live (ingest + "
                       "forward)", "us", "lower", compare=False),
                Metric(f"S14.{kind}.drain_cpu_us_per_msg",
                       f"S14 uplink to {name}: broker CPU per message, drain (forward)",
                       "us", "lower", compare=False)]
    # JetStream's rates are timed by nats-server's store times; the sampled ones beside them
    # (scenarios_bridge.py, "JetStream, timed by the server").
    out += [Metric("S14.jetstream.live_fwd_sampled_msgs_per_s",
                   "S14 uplink to JetStream, live, forwarded (polled every 0.2 s)", "msgs/s",
                   "higher", compare=False),
            Metric("S14.jetstream.drain_sampled_msgs_per_s",
                   "S14 uplink to JetStream: drain (polled every 0.2 s)", "msgs/s", "higher",
                   compare=False),
            Metric("S14.jetstream.drain_vs_live_sampled_pct",
                   "S14 uplink to JetStream: drain / live, both polled", "%", "higher",
                   compare=False),
            # benchmarks/jetstream_ceiling.py: nats-server's own rate with our frames
            Metric("S14.jetstream.ceiling_msgs_per_s",
                   "S14 JetStream ceiling: nats-server storing our frames from a free client",
                   "msgs/s", "higher", compare=False),
            Metric("S14.jetstream.drain_vs_ceiling_pct",
                   "S14 JetStream: drain / that ceiling", "%", "higher", compare=False),
            Metric("S14.jetstream.ceiling_vs_live_pct",
                   "S14 JetStream: ceiling / live (the most drain / live can be here)", "%",
                   "higher", compare=False)]
    return [
        *out,
        Metric("S14.s1_bridged_msgs_per_s", "S14 S1 with every message uplinked", "msgs/s",
               "higher", compare=False),
        Metric("S14.s1_plain_msgs_per_s", "S14 S1 without a bridge (same run)", "msgs/s",
               "higher", compare=False),
        Metric("S14.s1_bridged_pct", "S14 S1 bridged / S1 without a bridge", "%",
               "higher", compare=False),
    ]


def _flood_metrics(prefix: str, label: str) -> list[Metric]:
    """The unpaced ("flood") runs of S1-S3 (issue 12), for S1-S3 and for S7's pinned copies.

    S1/S2: the first, full-speed run of the max-no-loss search, its delivered rate and the share
    of what was published that never arrived. S3: one more run with a window of 65,535 (the
    publisher never waits on PUBACKs in practice); its figure is given only when every message
    was acknowledged and delivered."""
    return [
        Metric(f"{prefix}S1.flood_msgs_per_s", f"{label}S1 at flood: delivered rate", "msgs/s",
               "higher"),
        Metric(f"{prefix}S1.flood_lost_pct", f"{label}S1 at flood: published, not delivered",
               "%", "lower", compare=False),
        Metric(f"{prefix}S2.flood_deliveries_per_s", f"{label}S2 at flood: delivered rate",
               "deliveries/s", "higher"),
        Metric(f"{prefix}S2.flood_lost_pct", f"{label}S2 at flood: published, not delivered",
               "%", "lower", compare=False),
        Metric(f"{prefix}S3.flood_msgs_per_s",
               f"{label}S3 at flood (window 65,535), none lost", "msgs/s", "higher"),
    ]


METRICS = [
    Metric("S1.msgs_per_s", "S1 QoS 0, 1->1, max no-loss rate", "msgs/s", "higher"),
    Metric("S2.deliveries_per_s", "S2 QoS 0, 1->50 fan-out", "deliveries/s", "higher"),
    Metric("S3.msgs_per_s", "S3 QoS 1, 1->1, window 100", "msgs/s", "higher"),
    *_flood_metrics("", ""),
    *_s4_metrics(),
    Metric("S5.rss_kb_per_conn", "S5 idle connections: RSS per connection", "KB", "lower"),
    Metric("S5.idle_cpu_pct", "S5 idle connections: broker CPU", "%", "lower"),
    Metric("S6.qos0_p50_ms", "S6 paced, QoS 0 latency p50", "ms", "lower"),
    Metric("S6.qos0_p99_ms", "S6 paced, QoS 0 latency p99", "ms", "lower"),
    Metric("S6.qos1_p50_ms", "S6 paced, QoS 1 latency p50", "ms", "lower"),
    Metric("S6.qos1_p99_ms", "S6 paced, QoS 1 latency p99", "ms", "lower"),
    Metric("S7.S1.msgs_per_s", "S7 pinned to 1 core: S1", "msgs/s", "higher"),
    Metric("S7.S2.deliveries_per_s", "S7 pinned to 1 core: S2", "deliveries/s", "higher"),
    Metric("S7.S3.msgs_per_s", "S7 pinned to 1 core: S3", "msgs/s", "higher"),
    *_flood_metrics("S7.", "S7 pinned to 1 core: "),
    Metric("S8.startup_s", "S8 start-up with a queued backlog: process start to CONNACK", "s",
           "lower", compare=False),
    Metric("S8.startup_cpu_s", "S8 start-up with a queued backlog: broker CPU (user+sys) to "
           "CONNACK", "s", "lower", compare=False),
    Metric("S8.cold_startup_s", "S8 start-up with a queued backlog, page cache evicted: "
           "process start to CONNACK", "s", "lower", compare=False),
    Metric("S8.empty_startup_s", "S8 start-up, empty store: process start to CONNACK", "s",
           "lower", compare=False),
    Metric("S8.rss_mb_after_start", "S8 start-up with the backlog: RSS after start-up", "MB",
           "lower", compare=False),
    Metric("S8.rss_mb_after_connect", "S8 start-up with the backlog: RSS after a resume",
           "MB", "lower", compare=False),
    Metric("S9.replay_msgs_per_s", "S9 replay of the stored stream to 1 v5 subscriber, QoS 0",
           "msgs/s", "higher", compare=False),
    Metric("S9.ingest_msgs_per_s",
           "S9 QoS 1 into a sensors/# stream + 10 offline sessions, edge fsync", "msgs/s",
           "higher"),
    Metric("S9.bytes_per_msg", "S9 bytes on disk per stored 100-byte message", "bytes",
           "lower", compare=False),
    *_s10_metrics(),
    # Security (scenarios_security.py): edge-broker and mosquitto with the same files; amqtt
    # is not run (compare=False: no ">= 10x amqtt" verdict).
    Metric("S11.msgs_per_s", "S11 = S1 over TLS: QoS 0, 1->1, max no-loss rate", "msgs/s",
           "higher", compare=False),
    Metric("S12.msgs_per_s", "S12 = S3 over TLS: QoS 1, 1->1, window 100", "msgs/s", "higher",
           compare=False),
    Metric("S13.msgs_per_s", "S13 = S3 with a password file and a 1,000-rule ACL", "msgs/s",
           "higher", compare=False),
    *_s14_metrics(),
]
METRIC_BY_ID = {m.id: m for m in METRICS}


@dataclass
class Options:
    quick: bool = False
    duration_s: float = 5.0
    sub_procs: int = 2                 # subscriber processes for S2
    idle_connections: int = 10_000     # S5
    idle_procs: int = 4                # S5 connection-holding processes
    idle_window_s: float = 30.0        # S5
    s6_rate: float = 10_000.0
    s4_max_messages: int = 100_000     # per run; each of the 10 sessions queues them all
    s4_durabilities: tuple[str, ...] = ("fsync", "os")   # edge-broker's S4 runs, one each
    startup_messages: int = 1_000_000  # S8 backlog (issue 8)
    startup_sessions: int = 1_000
    startup_runs: int = 5              # S8 starts on the backlog (and on an empty store)
    startup_cold_runs: int = 2         # S8 starts with the store evicted from the page cache
    s9_messages: int = 1_000_000       # S9: messages stored in the stream, then replayed
    edge_cmd: str | None = None
    edge_durability: str | None = None
    edge_persistence: str | None = None
    loadgen_cpus: list[int] | None = None   # pinning of the load generator (S7 sets it)
    profile_dir: str | None = None     # py-spy profiles of edge-broker's S4 ingest go here
    s10_duration_s: float = 10.0       # S10: the control client's window, per part
    s10_rate: float = 100.0            # S10: control round trips started per second (0: no pause)
    s10_parts: tuple[str, ...] = tuple(S10_PARTS)
    s10_churn_clients: int = 20
    s10_takeover_conns: int = 200
    s10_load_procs: int = 2            # S10: processes sharing the churn/takeover clients
    s14_process_nice: int = 0          # S14: the edge bridge's process_nice (docs/bridges.md)


@dataclass
class Result:
    figures: dict[str, float | None] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, bool(ok), detail))


@dataclass
class Case:
    broker: str
    opts: Options
    pin_cpu: int | None = None
    settings: dict = field(default_factory=dict)
    sec: brokers.Security | None = None   # TLS listener / password file + ACL (S11-S13)

    @contextlib.contextmanager
    def launch(self, latency: bool = False, durability: str | None = None,
               extra_config: str = "") -> Iterator[brokers.RunningBroker]:
        """Start the broker; `durability` replaces --edge-durability for this start;
        `extra_config` is appended to its configuration file (S14: a bridge)."""
        rb = brokers.start(self.broker, pin_cpu=self.pin_cpu, edge_cmd=self.opts.edge_cmd,
                           latency=latency,
                           edge_durability=durability or self.opts.edge_durability,
                           edge_persistence=self.opts.edge_persistence, sec=self.sec,
                           extra_config=extra_config)
        self.settings = dict(rb.settings)
        if durability is not None and not str(rb.settings.get("durability")).startswith(
                "(not passed"):
            self.settings["durability"] = (self.opts.edge_durability
                                           or "(edge-broker default)")
            self.settings["S4 durability"] = ", ".join(self.opts.s4_durabilities)
        try:
            yield rb
        finally:
            alive = rb.proc.poll() is None
            tail = rb.log_tail() if not alive else ""
            rb.stop()
            if not alive:
                raise RuntimeError(f"{self.broker} died during the scenario "
                                   f"(exit {rb.proc.returncode}):\n{tail}")


def _hard(opts: Options, extra_s: float = 30.0) -> float:
    return opts.duration_s * 3 + extra_s


def _slim(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "hist"}


def _flow(rb: brokers.RunningBroker, case: Case, pub: loadgen.PubSpec, sub: loadgen.SubSpec,
          sub_procs: int = 1) -> dict[str, Any]:
    if rb.cafile or rb.password:   # S11-S13: TLS and/or the password file
        pub = replace(pub, cafile=rb.cafile, password=rb.password)
        sub = replace(sub, cafile=rb.cafile, password=rb.password)
        if rb.cafile and pub.close_wait_s == 0:
            # TLS: the publisher lets the broker close after DISCONNECT (README "S11-S13").
            pub = replace(pub, close_wait_s=10.0)
    settle_s = brokers.wait_quiet(rb.pid)
    meter = brokers.CpuMeter(rb.pid)
    r = loadgen.run_flow(rb.host, rb.port, pub, sub, sub_procs=sub_procs,
                         cpus=case.opts.loadgen_cpus,
                         hard_timeout_s=_hard(case.opts, sub.drain_s + 30))
    r["broker_cpu_pct"] = round(meter.percent(), 1)
    r["settle_s"] = round(settle_s, 2)
    return r


# --------------------------------------------------------------------------- S1, S2: QoS 0


def _max_lossless(rb: brokers.RunningBroker, case: Case, topic: str, n_subs: int,
                  sub_procs: int, res: Result, metric: str) -> None:
    """Full speed first; if anything was lost, step the paced rate down from 0.9x the delivered
    rate (x0.8 per step, 4 steps) until a run loses nothing. Quick mode: one paced run."""
    o = case.opts
    ids = [f"{topic.replace('/', '-')}-sub{k}" for k in range(n_subs)]
    # Whatever has not arrived `drain_s` after the publisher stopped counts as lost (dropped or
    # still queued: either way not sustainable at that rate).
    drain_s = max(5.0, o.duration_s)
    sub = loadgen.SubSpec(topic=topic, qos=0, client_ids=ids, idle_s=3.0, drain_s=drain_s)
    runs: list[tuple[str, float | None, dict[str, Any]]] = []
    if o.quick:
        rate = 5000.0 if n_subs == 1 else 500.0
        r = _flow(rb, case, loadgen.PubSpec(topic=topic, duration_s=o.duration_s, rate=rate),
                  sub, sub_procs)
        runs.append(("paced", rate, r))
        res.figures[metric] = r["delivered_rate"] if r["lost"] == 0 else None
    else:
        r = _flow(rb, case, loadgen.PubSpec(topic=topic, duration_s=o.duration_s), sub,
                  sub_procs)
        runs.append(("full speed", None, r))
        # The flood figures: this unpaced run as it is, losses included (issue 12).
        # (S1, S2 and S7's copies only: S11 and S14 use this search for other figures.)
        flood_id, _ = metric.rsplit(".", 1)
        flood_name = "flood_msgs_per_s" if n_subs == 1 else "flood_deliveries_per_s"
        if f"{flood_id}.{flood_name}" in METRIC_BY_ID:
            res.figures[f"{flood_id}.{flood_name}"] = r["delivered_rate"]
            res.figures[f"{flood_id}.flood_lost_pct"] = (
                100.0 * r["lost"] / r["expected"] if r["expected"] else None)
        # Nothing delivered at all (rate 0) would leave no rate to step down from: start from
        # half of what the publisher managed instead.
        rate = (r["delivered_rate"] / n_subs * 0.9 if r["delivered_rate"]
                else r["publish_rate"] * 0.5)
        figure = r["delivered_rate"] if r["lost"] == 0 else None
        steps = 0
        while figure is None and steps < 4 and rate > 0:
            r = _flow(rb, case, loadgen.PubSpec(topic=topic, duration_s=o.duration_s,
                                                rate=rate), sub, sub_procs)
            runs.append(("paced", round(rate), r))
            if r["lost"] == 0:
                figure = r["delivered_rate"]
            rate *= 0.8
            steps += 1
        res.figures[metric] = figure
    res.details["runs"] = [{"mode": m, "target_rate": t, **_slim(r)} for m, t, r in runs]
    last = runs[-1][2]
    res.check(f"{metric} delivered", last["lost"] == 0 and last["protocol_errors"] == 0,
              f"{last['delivered']}/{last['expected']} delivered"
              f" ({n_subs} subscriber(s)), {last['protocol_errors']} protocol errors")


def s1(case: Case) -> Result:
    res = Result()
    with case.launch() as rb:
        _max_lossless(rb, case, "bench/s1", 1, 1, res, _mid(case, "S1.msgs_per_s"))
    return res


def s2(case: Case) -> Result:
    res = Result()
    with case.launch() as rb:
        _max_lossless(rb, case, "bench/s2", 50, case.opts.sub_procs, res,
                      _mid(case, "S2.deliveries_per_s"))
    return res


# --------------------------------------------------------------------------- S3: QoS 1


def s3(case: Case) -> Result:
    res = Result()
    with case.launch() as rb:
        _qos1_window(rb, case, "bench/s3", _mid(case, "S3.msgs_per_s"), res)
        if not case.opts.quick:
            flood = Result()
            _qos1_window(rb, case, "bench/s3", _mid(case, "S3.flood_msgs_per_s"), flood,
                         window=FLOOD_WINDOW)
            res.figures.update(flood.figures)
            res.checks.extend(flood.checks)
            res.details["flood_run"] = flood.details["run"]
    return res


# S3 at flood: more PUBLISHes in flight than any broker here holds back (packet ids cycle).
FLOOD_WINDOW = 65_535


def _qos1_window(rb: brokers.RunningBroker, case: Case, topic: str, metric: str,
                 res: Result, window: int = 100) -> None:
    """S3's measurement (also S12, S13): QoS 1, 1 -> 1, window 100, for the duration."""
    o = case.opts
    pub = loadgen.PubSpec(topic=topic, qos=1, duration_s=o.duration_s, window=window)
    sub = loadgen.SubSpec(topic=topic, qos=1, client_ids=[f"{topic.replace('/', '-')}-sub"],
                          drain_s=max(10.0, 2 * o.duration_s))
    r = _flow(rb, case, pub, sub)
    res.figures[metric] = r["delivered_rate"] if r["lost"] == 0 else None
    res.details["run"] = _slim(r)
    res.check(f"{metric} acked", r["acked"] == r["published"],
              f"{r['acked']}/{r['published']} PUBACKs to the publisher")
    res.check(f"{metric} delivered", r["lost"] == 0,
              f"{r['delivered']}/{r['expected']} delivered ({r['extra']} duplicates)")


def _mid(case: Case, metric: str) -> str:
    return f"S7.{metric}" if case.pin_cpu is not None else metric


# --------------------------------------------------------------------------- S4: offline queues


def s4_variants(case: Case) -> list[str | None]:
    """edge-broker with its SQLite store: one S4 run per durability. Others: one run (None)."""
    if case.broker != "edge" or case.opts.edge_persistence == "memory":
        return [None]
    return list(case.opts.s4_durabilities) or [None]


def s4(case: Case) -> Result:
    res = Result()
    res.details["variants"] = {}
    for durability in s4_variants(case):
        _s4_once(case, durability, res)
    return res


STORE_COUNTERS = ("commits", "fsyncs", "batches", "changes_written", "rows_written")


def _store_sample(rb: brokers.RunningBroker, errors: list[str]) -> dict[str, Any] | None:
    """The running edge-broker's store counters (`edge-broker store stats` over its admin
    socket); None (and the reason in `errors`) when they cannot be had."""
    if rb.name != "edge" or rb.data_dir is None:
        return None
    try:
        return brokers.edge_store_stats(rb.data_dir)
    except Exception as exc:  # a missing counter must not lose the scenario's figures
        errors.append(f"{exc.__class__.__name__}: {exc}")
        return None


def _store_delta(before: dict | None, after: dict | None, per: int) -> dict[str, Any] | None:
    if not before or not after or "store" not in before or "store" not in after:
        return None
    b, a = before["store"], after["store"]
    out: dict[str, Any] = {k: a[k] - b[k] for k in STORE_COUNTERS if k in a and k in b}
    if per:
        out["per_msg"] = {k: round(v / per, 5) for k, v in out.items()}
    if out.get("commits"):
        out["batches_per_commit"] = round(out.get("batches", 0) / out["commits"], 1)
        out["changes_per_commit"] = round(out.get("changes_written", 0) / out["commits"], 1)
    return out


def _profiler(case: Case, rb: brokers.RunningBroker, name: str) -> tuple | None:
    """With --profile-edge DIR: py-spy records edge-broker during a phase (raw stacks)."""
    if not case.opts.profile_dir or rb.name != "edge":
        return None
    out = Path(case.opts.profile_dir) / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["py-spy", "record", "--pid", str(rb.pid), "--format", "raw",
                             "--rate", "200", "--nonblocking", "-o", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(0.5)   # attached before the phase starts
    return proc, out


def _stop_profiler(spy: tuple | None) -> dict[str, Any] | None:
    if spy is None:
        return None
    proc, out = spy
    proc.send_signal(signal.SIGINT)
    try:
        _o, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _o, err = proc.communicate()
    if not out.exists():
        return {"error": (err or b"").decode(errors="replace")[-500:]}
    from .startup import summarise_stacks
    return {"file": str(out), **summarise_stacks(out, 200)}


def _s4_once(case: Case, durability: str | None, res: Result) -> None:
    o = case.opts
    n_sessions = 10
    ids = [f"bench-s4-sub{k}" for k in range(n_sessions)]
    topic = "bench/s4"
    cap = 500 if o.quick else o.s4_max_messages
    pre = "S4." if durability is None else f"S4.{durability}."
    tag = "S4" if durability is None else f"S4 {durability}"
    stat_errors: list[str] = []
    with case.launch(durability=durability) as rb:
        loadgen.setup_offline_sessions(rb.host, rb.port, topic, ids)
        time.sleep(0.2)   # let the broker register the disconnects
        st0 = _store_sample(rb, stat_errors)
        rss0 = brokers.rss_kb(rb.pid)
        meter = brokers.CpuMeter(rb.pid)
        spy = _profiler(case, rb, f"s4-{durability or 'default'}-ingest")
        p = loadgen.publish_only(rb.host, rb.port,
                                 loadgen.PubSpec(topic=topic, qos=1, duration_s=o.duration_s,
                                                 window=100, max_messages=cap,
                                                 ack_wait_s=30.0),
                                 cpus=o.loadgen_cpus, hard_timeout_s=_hard(o, 60))
        ingest_cpu = meter.percent()
        profile = _stop_profiler(spy)
        rss1 = brokers.rss_kb(rb.pid)
        # Every PUBACK came after its commit, so the ingest's commits are all counted.
        st1 = _store_sample(rb, stat_errors)
        ingest_s = (p["t_done_ns"] - p["t_first_ns"]) / 1e9
        drain_cap_s = 20.0 if o.quick else max(60.0, 6 * o.duration_s)
        sub = loadgen.SubSpec(topic=topic, qos=1, client_ids=ids, clean=False, subscribe=False,
                              idle_s=15.0, drain_s=drain_cap_s,
                              connect_timeout_s=drain_cap_s)
        settle_s = brokers.wait_quiet(rb.pid)
        meter = brokers.CpuMeter(rb.pid)
        d = loadgen.drain(rb.host, rb.port, sub, p["acked"], sub_procs=2, cpus=o.loadgen_cpus,
                          hard_timeout_s=drain_cap_s + 60)
        drain_cpu = meter.percent()
        if st1 is not None:
            brokers.wait_quiet(rb.pid, timeout_s=10.0)   # the last acks' commits
        st2 = _store_sample(rb, stat_errors)
    res.figures[pre + "ingest_msgs_per_s"] = p["acked"] / ingest_s if ingest_s else None
    # A short drain still reports its rate; the failed check flags it in the table.
    res.figures[pre + "drain_msgs_per_s"] = d["rate"] or None
    ingest = _store_delta(st0, st1, p["acked"])
    if durability is not None and ingest and "per_msg" in ingest:
        res.figures[pre + "commits_per_msg"] = ingest["per_msg"].get("commits")
        res.figures[pre + "fsyncs_per_msg"] = ingest["per_msg"].get("fsyncs")
    details = {"durability": durability, "published": p["sent"], "acked": p["acked"],
               "ingest_s": round(ingest_s, 3),
               "ingest_msgs_per_s": res.figures[pre + "ingest_msgs_per_s"],
               "sessions": n_sessions,
               "queued_total": p["acked"] * n_sessions,
               "drain": d, "rss_kb_before": rss0, "rss_kb_after_ingest": rss1,
               "broker_cpu_pct_ingest": round(ingest_cpu, 1),
               "broker_cpu_pct_drain": round(drain_cpu, 1),
               "settle_before_drain_s": round(settle_s, 2),
               "edge_persistence": o.edge_persistence if case.broker == "edge" else None,
               "edge_durability": (durability or o.edge_durability)
               if case.broker == "edge" else None}
    if profile:
        details["profile"] = profile
    if case.broker == "edge":
        details["store"] = {
            "ingest": ingest, "drain": _store_delta(st1, st2, d["delivered"]),
            "file_bytes_after_ingest": (st1 or {}).get("store", {}).get("file_bytes"),
            "queued_after_ingest": (st1 or {}).get("queued_messages"),
            "before_ingest": st0, "after_ingest": st1, "after_drain": st2,
            "errors": stat_errors}
    memory = case.broker != "edge" or o.edge_persistence == "memory"
    res.details["variants"][durability or ("memory" if memory else "default")] = details
    res.check(f"{tag} acked", p["acked"] == p["sent"], f"{p['acked']}/{p['sent']} PUBACKs")
    short = [c for c in d["per_client"] if c < p["acked"]]
    res.check(f"{tag} drained", not short and len(d["per_client"]) == n_sessions,
              f"{d['delivered']}/{d['expected']} drained from {n_sessions} sessions"
              + (f"; short sessions got {short}" if short else ""))
    if case.broker == "edge" and case.opts.edge_persistence != "memory":
        res.check(f"{tag} store counters", ingest is not None,
                  "commits/fsyncs sampled with `edge-broker store stats`" if ingest is not None
                  else "no store counters: " + "; ".join(stat_errors or ["no store section"]))


# --------------------------------------------------------------------------- S5: idle connections


def s5(case: Case) -> Result:
    res = Result()
    o = case.opts
    n = 1000 if o.quick else o.idle_connections
    window_s = 2.0 if o.quick else o.idle_window_s
    with case.launch() as rb:
        time.sleep(1.0)
        rss0 = brokers.rss_kb(rb.pid)
        t0 = time.monotonic()
        crew, release, counts = loadgen.hold_idle(
            rb.host, rb.port, n, procs=o.idle_procs, keepalive_s=300, cpus=o.loadgen_cpus,
            hard_timeout_s=window_s + 240)
        connect_s = time.monotonic() - t0
        try:
            time.sleep(2.0)   # let the broker finish its per-connection work
            rss1 = brokers.rss_kb(rb.pid)
            meter = brokers.CpuMeter(rb.pid)
            time.sleep(window_s)
            cpu = meter.percent()
            rss2 = brokers.rss_kb(rb.pid)
        finally:
            release.set()
            crew.close()
    est = counts["established"]
    res.figures["S5.rss_kb_per_conn"] = (rss1 - rss0) / est if est else None
    res.figures["S5.idle_cpu_pct"] = cpu
    res.details = {"connections": n, **counts, "connect_s": round(connect_s, 2),
                   "rss_kb_before": rss0, "rss_kb_after": rss1, "rss_kb_end": rss2,
                   "idle_window_s": window_s, "keepalive_s": 300}
    res.check("S5 connected", est == n, f"{est}/{n} connections got CONNACK "
              f"({counts['failures']} failed, {counts['timed_out']} timed out)")
    return res


# --------------------------------------------------------------------------- S6: paced latency


def s6(case: Case) -> Result:
    res = Result()
    o = case.opts
    rate = 1000.0 if o.quick else o.s6_rate
    with case.launch(latency=True) as rb:
        for qos in (0, 1):
            pub = loadgen.PubSpec(topic=f"bench/s6/{qos}", qos=qos, duration_s=o.duration_s,
                                  rate=rate)
            sub = loadgen.SubSpec(topic=f"bench/s6/{qos}", qos=qos,
                                  client_ids=[f"bench-s6-sub{qos}"],
                                  drain_s=max(10.0, 2 * o.duration_s))
            r = _flow(rb, case, pub, sub)
            lat = r["latency"]
            res.figures[f"S6.qos{qos}_p50_ms"] = lat["p50_ms"]
            res.figures[f"S6.qos{qos}_p99_ms"] = lat["p99_ms"]
            res.details[f"qos{qos}"] = _slim(r)
            res.check(f"S6 QoS {qos} delivered", r["lost"] == 0,
                      f"{r['delivered']}/{r['expected']} at {rate:.0f} msgs/s")
            ach = r["publish_rate"]
            res.check(f"S6 QoS {qos} rate held", ach >= 0.95 * rate,
                      f"publisher achieved {ach:.0f}/{rate:.0f} msgs/s")
    return res


# --------------------------------------------------------------------------- S7: pinned


def s7(case: Case) -> Result:
    res = Result()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        res.details["skipped"] = "needs at least 2 cores"
        return res
    pinned = Case(case.broker, Options(**{**case.opts.__dict__, "loadgen_cpus": cores[1:]}),
                  pin_cpu=cores[0])
    for fn in (s1, s2, s3):
        sub = fn(pinned)
        res.figures.update(sub.figures)
        res.checks.extend(sub.checks)
        res.details[fn.__name__.upper()] = sub.details
    case.settings = pinned.settings
    res.details["broker_cpu"] = cores[0]
    res.details["loadgen_cpus"] = cores[1:]
    return res


# --------------------------------------------------------------------------- S8: start-up


def s8(case: Case) -> Result:
    """Restart with a persisted backlog (benchmarks/startup.py): edge-broker only."""
    res = Result()
    if case.broker != "edge":
        res.details["skipped"] = "edge-broker only (start-up from its SQLite store)"
        return res
    from . import startup

    o = case.opts
    s = startup.measure(messages=10_000 if o.quick else o.startup_messages,
                        sessions=100 if o.quick else o.startup_sessions,
                        runs=1 if o.quick else o.startup_runs,
                        cold_runs=0 if o.quick else o.startup_cold_runs,
                        edge_cmd=o.edge_cmd)
    res.figures["S8.startup_s"] = s["connack_s"]
    res.figures["S8.startup_cpu_s"] = s.get("cpu_s_at_connack")
    res.figures["S8.cold_startup_s"] = s.get("connack_s_cold")
    res.figures["S8.empty_startup_s"] = s["empty_connack_s"]
    for key in ("rss_kb_after_start", "rss_kb_after_connect"):
        v = s[key]
        res.figures["S8." + key.replace("_kb_", "_mb_")] = None if v is None else v / 1024
    for c in s["checks"]:
        res.check(c["name"], c["ok"], c["detail"])
    res.details = s
    return res


# --------------------------------------------------------------------------- S9: the log


def s9(case: Case) -> Result:
    """Replay of a stored stream, and ingest into a stream with 10 offline sessions
    (benchmarks/scenarios_log.py)."""
    from . import scenarios_log
    return scenarios_log.s9(case)


# --------------------------------------------------------------------------- S10: fairness


def s10(case: Case) -> Result:
    """A control client's QoS 1 round trips under a flood, churn, a takeover storm
    (benchmarks/fairness.py)."""
    from . import fairness
    return fairness.run(case)


def _security(name: str) -> Callable[[Case], Result]:
    """S11-S13 live in scenarios_security.py (TLS, password file, 1,000-rule ACL)."""
    def run(case: Case) -> Result:
        from . import scenarios_security
        fn: Callable[[Case], Result] = getattr(scenarios_security, name)
        return fn(case)
    run.__name__ = name
    return run


def s14(case: Case) -> Result:
    """Bridges: uplink forwarding, drain after an outage, S1 with a bridge
    (benchmarks/scenarios_bridge.py)."""
    from . import scenarios_bridge
    return scenarios_bridge.s14(case)


SCENARIOS: dict[str, Callable[[Case], Result]] = {
    "S1": s1, "S2": s2, "S3": s3, "S4": s4, "S5": s5, "S6": s6, "S7": s7, "S8": s8,
    "S9": s9, "S10": s10, "S11": _security("s11"), "S12": _security("s12"),
    "S13": _security("s13"), "S14": s14}
