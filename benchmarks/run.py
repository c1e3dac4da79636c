"""Runner: every scenario against every broker, side by side, in one run.

    python -m benchmarks                       # all scenarios, edge + mosquitto + amqtt
    python -m benchmarks --quick               # smoke: edge alone, delivery counts, exit 1 on loss
    python -m benchmarks --brokers mosquitto,amqtt --scenarios S1,S3 --duration 10
    python -m benchmarks --brokers edge,mosquitto --scenarios S10   # fairness under load

A run of some scenarios only writes results/partial-<ids>.json and .md (not latest.json and
RESULTS.md, which hold the last full run), unless --json / --markdown say otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import signal
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import brokers, ceiling, scenarios
from .report import LABEL, fmt, render_report, s4_store_rows
from .scenarios import METRIC_BY_ID, METRICS, Case, Options

HERE = Path(__file__).resolve().parent
ALL_BROKERS = ["edge", "mosquitto", "amqtt"]

# Targets for edge-broker, judged on ratios measured in the same run: the live path (issue 12,
# also pinned to one core: S7), the log (issue 8) and the bridges (issue 9).
_LIVE = [("S1", "S1.msgs_per_s", 0.75), ("S2", "S2.deliveries_per_s", 1.5),
         ("S3", "S3.msgs_per_s", 1.0), ("S1 at flood", "S1.flood_msgs_per_s", 0.6),
         ("S2 at flood", "S2.flood_deliveries_per_s", 1.0),
         ("S3 at flood (none lost)", "S3.flood_msgs_per_s", 1.0)]
TARGETS = [
    *[(f"{name} >= {bound}x mosquitto", "ratio", mid, "mosquitto", bound)
      for name, mid, bound in _LIVE],
    *[(f"S7 pinned to 1 core: {name} >= {bound}x mosquitto", "ratio", f"S7.{mid}",
       "mosquitto", bound) for name, mid, bound in _LIVE],
    ("S5 <= 10 KB RSS per idle connection", "max", "S5.rss_kb_per_conn", None, 10.0),
    ("S5 idle CPU < 1 %", "below", "S5.idle_cpu_pct", None, 1.0),
    ("S6 QoS 0 p99 <= 5 ms", "max", "S6.qos0_p99_ms", None, 5.0),
    ("S6 QoS 1 p99 <= 5 ms", "max", "S6.qos1_p99_ms", None, 5.0),
    ("S4 ingest with durability fsync >= 20,000 msgs/s on this machine", "min",
     "S4.fsync.ingest_msgs_per_s", None, 20_000.0),
    ("S4 drain with durability fsync >= 2x 31,520 msgs/s (the figure before the log)", "min",
     "S4.fsync.drain_msgs_per_s", None, 63_040.0),
    ("S8 start-up <= 1 s with 1,000,000 queued messages in 1,000 sessions", "max",
     "S8.startup_s", None, 1.0),
    ("S8 RSS after start-up <= 60 MB with 1,000,000 queued messages", "max",
     "S8.rss_mb_after_start", None, 60.0),
    # "own": a ratio to edge-broker's own figure `ref` of the same run.
    ("S9 replay of 1,000,000 stored messages >= 0.8x the same run's S1", "own",
     "S9.replay_msgs_per_s", "S1.msgs_per_s", 0.8),
    ("S9 bytes on disk per stored 100-byte message <= 200", "max", "S9.bytes_per_msg", None,
     200.0),
    *[(f"S10 {label}: control round trip p99 <= 10 ms", "max", f"S10.{part}.rtt_p99_ms",
       None, 10.0) for part, (label, _load) in scenarios.S10_PARTS.items() if part != "idle"],
    *[(f"S14 uplink to {name} while publishing at full speed >= 15,000 msgs/s", "min",
       f"S14.{kind}.live_fwd_msgs_per_s", None, 15_000.0)
      for kind, name in (("jetstream", "JetStream"), ("kafka", "Kafka"))],
    *[(f"S14 {name} backlog drain >= 2x the live forwarding rate", "min",
       f"S14.{kind}.drain_vs_live_pct", None, 200.0)
      for kind, name in (("jetstream", "JetStream"), ("kafka", "Kafka"))],
    ("S14 S1 with every message uplinked >= 50 % of S1 without a bridge", "min",
     "S14.s1_bridged_pct", None, 50.0),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", help="comma list of edge,mosquitto,amqtt "
                    "(default: all three; --quick: edge)")
    ap.add_argument("--scenarios", help="comma list of S1..S14 (default: all; "
                    "--quick: S1-S6, S8, S10)")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds per scenario; checks delivery counts, not speed; "
                    "exits 1 on a delivery-count failure")
    ap.add_argument("--duration", type=float, help="seconds per measured run "
                    "(default 5, --quick 1)")
    ap.add_argument("--edge-cmd", help="how to launch edge-broker; placeholders {python} "
                    "{host} {port} {config} {data_dir} (default: "
                    f"'{brokers.EDGE_DEFAULT_CMD}')")
    ap.add_argument("--edge-durability", choices=["fsync", "os", "none"],
                    help="edge-broker [storage] durability (default: its own default)")
    ap.add_argument("--edge-persistence", choices=["memory", "sqlite"],
                    help="edge-broker [storage] persistence (default: its own default)")
    ap.add_argument("--sub-procs", type=int, default=2, help="subscriber processes in S2")
    ap.add_argument("--idle-connections", type=int, default=10_000, help="S5 connections")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="S5 idle window")
    ap.add_argument("--s6-rate", type=float, default=10_000.0, help="S6 paced rate, msgs/s")
    ap.add_argument("--s4-messages", type=int, default=100_000,
                    help="S4 cap on messages published into the offline sessions")
    ap.add_argument("--s4-durability",
                    help="comma list of edge-broker durabilities, one S4 run each (default: "
                    "fsync,os; with --edge-durability: that one)")
    ap.add_argument("--s9-messages", type=int, default=1_000_000,
                    help="S9 messages stored in the stream, then replayed (--quick: 10,000)")
    ap.add_argument("--startup-messages", type=int, default=1_000_000,
                    help="S8 queued messages in the store (--quick: 10,000)")
    ap.add_argument("--startup-sessions", type=int, default=1_000,
                    help="S8 offline sessions holding them (--quick: 100)")
    ap.add_argument("--startup-runs", type=int, default=5,
                    help="S8 starts on the backlog, and on an empty store (--quick: 1)")
    ap.add_argument("--startup-cold-runs", type=int, default=2,
                    help="S8 extra starts with the store evicted from the page cache "
                    "(--quick: 0)")
    ap.add_argument("--s10-duration", type=float,
                    help="S10 seconds of control round trips per part (default 10, --quick 1)")
    ap.add_argument("--s10-rate", type=float, default=100.0,
                    help="S10 control round trips started per second (0 = back to back)")
    ap.add_argument("--s10-parts", default=",".join(scenarios.S10_PARTS),
                    help="S10 parts to run (default: all: %(default)s)")
    ap.add_argument("--s14-process-nice", type=int, default=0, metavar="N",
                    help="S14: the edge bridge's process_nice (0-19; default 0, the "
                    "configuration's default: the uplink process at the broker's priority)")
    ap.add_argument("--profile-edge", type=Path, metavar="DIR",
                    help="record edge-broker with py-spy during each S4 ingest (raw stacks "
                    "in DIR, summary in the JSON); the profiler costs the broker some speed")
    ap.add_argument("--json", type=Path, help="results JSON (default results/latest.json, "
                    "--quick: results/quick.json)")
    ap.add_argument("--markdown", type=Path, help="markdown report (default RESULTS.md; "
                    "--quick writes none unless given)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each scenario N times (brokers interleaved) and report the "
                    "median figure; 3 damps one-off stalls on a shared machine")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite the markdown report (--markdown, default RESULTS.md) "
                    "from a results JSON of an earlier run")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip measuring the load generator's own ceiling")
    return ap.parse_args(argv)


def raise_fd_limit(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    u = os.uname()
    return {"hostname": socket.gethostname(),
            "uname": f"{u.sysname} {u.release} {u.version} {u.machine}",
            "cpu_model": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version()}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_table(results: dict, broker_names: list[str], metric_ids: list[str],
                flagged: dict[str, set] | None = None) -> list[list[str]]:
    """Header + rows: metric, unit, then per broker value (and x mosquitto for the others).
    A value whose scenario failed a delivery check is marked with `!`."""
    flagged = flagged or {}
    head = ["Metric", "Unit"]
    for b in broker_names:
        head.append(LABEL[b])
        if b != "mosquitto" and "mosquitto" in broker_names:
            head.append(f"{LABEL[b]} / mosquitto")
    rows = [head]
    for mid in metric_ids:
        m = METRIC_BY_ID[mid]
        lower = m.better == "lower" and m.compare
        row = [m.label + (" (lower is better)" if lower else ""), m.unit]
        mosq = figure(results, "mosquitto", mid)
        for b in broker_names:
            v = figure(results, b, mid)
            key = mid if mid in results.get(b, {}) else m.fallback
            row.append(fmt(v, m.unit) + (" !" if key in flagged.get(b, ()) else ""))
            if b != "mosquitto" and "mosquitto" in broker_names:
                r = ratio(v, mosq)
                row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    return rows


def figure(results: dict, broker: str, mid: str) -> float | None:
    """The broker's figure for a row: its own, else (a broker without edge-broker's
    durability variants) the row's fallback metric."""
    mine = results.get(broker, {})
    if mid in mine:
        v: float | None = mine[mid]
        return v
    fb = METRIC_BY_ID[mid].fallback
    return mine.get(fb) if fb and broker != "edge" else None


def table_metrics(figs: dict[str, dict], brokers_: list[str]) -> list[str]:
    """Rows to show: every metric some broker has; a plain S4 row is left out when the
    per-durability rows already carry the other brokers' figure."""
    ids = [m.id for m in METRICS if any(m.id in figs.get(b, {}) for b in brokers_)]
    covered = {METRIC_BY_ID[i].fallback for i in ids if METRIC_BY_ID[i].fallback}
    edge = figs.get("edge", {})
    return [i for i in ids if i not in covered or i in edge]


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def judge_targets(figs: dict[str, dict[str, float | None]]) -> list[tuple[str, str, str]]:
    """[(target, met|not met|n/a, evidence)] for the figures edge-broker produced."""
    edge = figs.get("edge", {})
    out = []
    for name, kind, mid, ref, bound in TARGETS:
        if mid not in edge:
            continue
        v = edge[mid]
        if kind == "ratio":
            r = ratio(v, figure(figs, ref or "", mid))
            if r is None:
                out.append((name, "n/a", f"no {ref} figure"))
            else:
                out.append((name, "met" if r >= bound else "not met", f"{r:.2f}x"))
        elif kind == "own":
            r = ratio(v, edge.get(ref or ""))
            if r is None:
                out.append((name, "n/a", f"no {ref} figure in this run"))
            else:
                out.append((name, "met" if r >= bound else "not met", f"{r:.2f}x"))
        elif v is None:
            out.append((name, "not met", "no figure (delivery failed)"))
        else:
            ok = {"max": v <= bound, "min": v >= bound}.get(kind, v < bound)
            out.append((name, "met" if ok else "not met", f"{v:,.2f}"))
    # Every figure >= 10x amqtt (for lower-is-better figures: <= amqtt / 10).
    if "amqtt" in figs:
        for m in METRICS:
            if m.id not in edge or not m.compare:
                continue
            v, a = edge[m.id], figure(figs, "amqtt", m.id)
            name = f"{m.id} >= 10x amqtt"
            if v is None or a is None:
                out.append((name, "n/a", "figure missing"))
                continue
            if m.better == "lower" and v == 0:
                out.append((name, "met" if a > 0 else "n/a", f"0 vs {a:.2f}"))
                continue
            if a == 0:
                out.append((name, "n/a", "amqtt figure is 0"))
                continue
            r = v / a if m.better == "higher" else a / v
            out.append((name, "met" if r >= 10 else "not met", f"{r:.1f}x better"))
    return out


def merge_attempts(runs: list[scenarios.Result]) -> scenarios.Result:
    """One result from `--repeat` runs: the median of each figure, every check, and each
    run's details under "repeats" (one run: its details as they are)."""
    if len(runs) == 1:
        return runs[0]
    merged = scenarios.Result()
    for mid in dict.fromkeys(k for r in runs for k in r.figures):
        values = [r.figures[mid] for r in runs if r.figures.get(mid) is not None]
        merged.figures[mid] = statistics.median(values) if values else None
    for k, r in enumerate(runs):
        merged.checks += [(f"#{k + 1} {n}", ok, d) for n, ok, d in r.checks]
    merged.details = {"repeats": [{"figures": r.figures, **r.details} for r in runs]}
    return merged


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SystemExit unwinds through Case.launch, which stops the broker it started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.render:
        return rerender(args.render, args.markdown or HERE / "RESULTS.md")
    quick = args.quick
    names = [b.strip() for b in (args.brokers or ("edge" if quick else ",".join(ALL_BROKERS)))
             .split(",") if b.strip()]
    bad = [b for b in names if b not in ALL_BROKERS]
    if bad:
        print(f"unknown broker(s) {bad}; choose from {ALL_BROKERS}", file=sys.stderr)
        return 2
    default_sc = "S1,S2,S3,S4,S5,S6,S8,S10" if quick else ",".join(scenarios.SCENARIOS)
    sc_ids = [s.strip().upper() for s in (args.scenarios or default_sc).split(",") if s.strip()]
    bad = [s for s in sc_ids if s not in scenarios.SCENARIOS]
    if bad:
        print(f"unknown scenario(s) {bad}; choose from {list(scenarios.SCENARIOS)}",
              file=sys.stderr)
        return 2
    s4_dur = [d.strip() for d in (args.s4_durability or args.edge_durability or "fsync,os")
              .split(",") if d.strip()]
    bad = [d for d in s4_dur if d not in scenarios.DURABILITIES]
    if bad:
        print(f"unknown durability {bad}; choose from {list(scenarios.DURABILITIES)}",
              file=sys.stderr)
        return 2
    parts = tuple(p.strip() for p in args.s10_parts.split(",") if p.strip())
    bad = [p for p in parts if p not in scenarios.S10_PARTS]
    if bad or not parts:
        print(f"unknown S10 part(s) {bad}; choose from {list(scenarios.S10_PARTS)}",
              file=sys.stderr)
        return 2
    opts = Options(quick=quick, duration_s=args.duration or (1.0 if quick else 5.0),
                   sub_procs=args.sub_procs, idle_connections=args.idle_connections,
                   idle_window_s=args.idle_seconds, s6_rate=args.s6_rate,
                   s4_max_messages=args.s4_messages, edge_cmd=args.edge_cmd,
                   edge_durability=args.edge_durability,
                   edge_persistence=args.edge_persistence,
                   s4_durabilities=tuple(s4_dur), startup_messages=args.startup_messages,
                   startup_sessions=args.startup_sessions, startup_runs=args.startup_runs,
                   startup_cold_runs=args.startup_cold_runs, s9_messages=args.s9_messages,
                   profile_dir=str(args.profile_edge) if args.profile_edge else None,
                   s10_duration_s=args.s10_duration or (1.0 if quick else 10.0),
                   s10_rate=args.s10_rate, s10_parts=parts,
                   s14_process_nice=args.s14_process_nice)
    limit = raise_fd_limit(opts.idle_connections + 1024)
    if "S5" in sc_ids and limit[0] < opts.idle_connections + 256:
        print(f"warning: RLIMIT_NOFILE is {limit[0]}; S5 needs {opts.idle_connections + 256}",
              file=sys.stderr)

    usable, skipped = [], {}
    for b in names:
        why = brokers.available(b, args.edge_cmd)
        if why:
            print(f"skipping {LABEL[b]}: {why}", file=sys.stderr)
            skipped[b] = why
        else:
            usable.append(b)
    if not usable:
        print("no broker to run", file=sys.stderr)
        return 3

    info = machine_info()
    load1 = os.getloadavg()[0]
    info["loadavg_1min_at_start"] = round(load1, 2)
    if load1 > 0.5 and not quick:
        print(f"warning: load average is {load1:.2f} before starting: something else is using "
              "the CPU, figures will be noisy (run on an otherwise idle machine)",
              file=sys.stderr)
    versions = {b: brokers.version(b) for b in names}
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    print(f"edge-broker benchmarks {'(quick) ' if quick else ''}{started.isoformat()} on "
          f"{info['hostname']}: {info['cpu_model']}, {info['cores']} cores")
    print("versions: " + ", ".join(f"{LABEL[b]} {v}" for b, v in versions.items())
          + f", python {info['python']}")

    ceil = None
    if not quick and not args.no_ceiling:
        print("measuring the load generator's ceiling (no broker) ...", flush=True)
        ceil = ceiling.measure(2.0)
        print(f"  publisher QoS 0: {ceil['publisher_qos0']['msgs_per_s']:,} msgs/s per process;"
              f" subscriber QoS 0: {ceil['subscriber_qos0']['msgs_per_s']:,} msgs/s per process")

    figs: dict[str, dict] = {b: {} for b in usable}
    flagged: dict[str, set] = {b: set() for b in usable}   # figures whose checks failed
    record: dict = {"scenarios": {}, "settings": {}}
    failures: list[str] = []
    for sc in sc_ids:
        record["scenarios"][sc] = {}
        attempts: dict[str, list[scenarios.Result]] = {b: [] for b in usable}
        seconds: dict[str, float] = {b: 0.0 for b in usable}
        errors: dict[str, str] = {}
        for rep in range(args.repeat):   # brokers interleaved within each repetition
            for b in usable:
                if b in errors:
                    continue
                t0 = time.monotonic()
                tag = f" #{rep + 1}" if args.repeat > 1 else ""
                print(f"{sc}{tag} {LABEL[b]} ...", end=" ", flush=True)
                case = Case(b, opts)
                try:
                    res = scenarios.SCENARIOS[sc](case)
                except brokers.BrokerUnavailable as exc:
                    print(f"skipped: {exc}")
                    errors[b] = str(exc)
                    continue
                except Exception as exc:
                    print(f"ERROR: {exc}")
                    traceback.print_exc(file=sys.stderr)
                    errors[b] = f"{exc.__class__.__name__}: {exc}"
                    failures.append(f"{sc} {b}: {exc}")
                    continue
                seconds[b] += time.monotonic() - t0
                # First seen wins; S7's pinning is described by the scenario, not a setting.
                kept = record["settings"].setdefault(b, {})
                for k, val in case.settings.items():
                    if k != "pinned_cpu":
                        kept.setdefault(k, val)
                attempts[b].append(res)
                shown = ", ".join(f"{k}={fmt(v, METRIC_BY_ID[k].unit)}"
                                  for k, v in res.figures.items())
                bad_checks = [f"{n}: {d}" for n, ok, d in res.checks if not ok]
                print(f"{shown} ({time.monotonic() - t0:.1f}s)"
                      + ("" if not bad_checks else "  CHECK FAILED: " + "; ".join(bad_checks)))
                failures += [f"{sc} {b}: {c}" for c in bad_checks]
        for b in usable:
            runs = attempts[b]
            if not runs:
                record["scenarios"][sc][b] = {"error": errors.get(b, "no run")}
                continue
            res = merge_attempts(runs)
            figs[b].update(res.figures)
            if any(not ok for _n, ok, _d in res.checks):
                flagged[b].update(res.figures)
            record["scenarios"][sc][b] = {"figures": res.figures,
                                          "checks": [{"name": n, "ok": ok, "detail": d}
                                                     for n, ok, d in res.checks],
                                          "details": res.details,
                                          "seconds": round(seconds[b], 1)}
            if b in errors:
                record["scenarios"][sc][b]["error"] = errors[b]

    metric_ids = table_metrics(figs, usable)
    rows = build_table(figs, usable, metric_ids, flagged)
    print()
    print(render_text(rows))
    if any("!" in cell for row in rows[1:] for cell in row):
        print("  ! = a delivery check failed in that scenario (see FAILED below)")
    if any(scenarios.S4_NOTE in row[0] for row in rows[1:]):
        print(f"  {scenarios.S4_NOTE} mosquitto/amqtt: their one S4 figure (offline messages "
              "in memory), repeated per edge-broker durability")
    s4_rows = s4_store_rows({"scenarios": record["scenarios"]})
    if s4_rows:
        print("\nS4 edge-broker store counters during the ingest:")
        print(render_text(s4_rows))
    # Targets judge speed: not in quick mode, and only for figures edge-broker produced.
    targets = [] if quick or "edge" not in usable else judge_targets(figs)
    if targets:
        print()
        for name, verdict, ev in targets:
            print(f"  {verdict:8} {name} ({ev})")
    if skipped:
        print()
        for b, why in skipped.items():
            print(f"  {LABEL[b]} column skipped: {why}")

    doc = {"date": started.isoformat(), "quick": quick, "repeat": args.repeat,
           "machine": info, "versions": versions,
           "options": {k: v for k, v in opts.__dict__.items()}, "fd_limit": list(limit),
           "loadgen_ceiling": ceil, "skipped": skipped, "figures": figs,
           "targets": [{"target": n, "verdict": v, "evidence": e} for n, v, e in targets],
           "failures": failures, **record}
    # latest.json and RESULTS.md hold the last full run: a run of some scenarios only goes to
    # results/partial-<ids>.json and .md instead, so it never replaces them.
    partial = None if quick or set(sc_ids) >= set(scenarios.SCENARIOS) else \
        HERE / "results" / f"partial-{'-'.join(sc_ids)}"
    json_path = args.json or (HERE / "results" / "quick.json" if quick else
                              partial.with_suffix(".json") if partial else
                              HERE / "results" / "latest.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(json_path)
    print(f"\nwrote {json_path}")
    md_path = args.markdown or (None if quick else partial.with_suffix(".md") if partial
                                else HERE / "RESULTS.md")
    if md_path:
        md_path.write_text(render_report(doc, rows, targets, sc_ids))
        print(f"wrote {md_path}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1 if quick else 0
    return 0


def rerender(json_path: Path, md_path: Path) -> int:
    doc = json.loads(json_path.read_text())
    usable = list(doc["figures"])
    flagged: dict[str, set[str]] = {b: set() for b in usable}
    for per_broker in doc["scenarios"].values():
        for b, entry in per_broker.items():
            if any(not c["ok"] for c in entry.get("checks", [])):
                flagged[b].update(entry.get("figures", {}))
    metric_ids = table_metrics(doc["figures"], usable)
    rows = build_table(doc["figures"], usable, metric_ids, flagged)
    targets = [(t["target"], t["verdict"], t["evidence"]) for t in doc["targets"]]
    md_path.write_text(render_report(doc, rows, targets, list(doc["scenarios"])))
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
