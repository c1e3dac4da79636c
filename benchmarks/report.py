"""The markdown report (RESULTS.md) of a run, from its results document (latest.json)."""

from __future__ import annotations

from pathlib import Path

from . import scenarios

HERE = Path(__file__).resolve().parent
LABEL = {"edge": "edge-broker", "mosquitto": "mosquitto", "amqtt": "amqtt"}


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("ms", "%", "KB", "s"):
        return f"{v:,.2f}"
    if unit == "MB":
        return f"{v:,.1f}"
    if unit == "per s":
        return f"{v:,.1f}"
    if unit == "per msg":
        return f"{v:.4f}"
    return f"{v:,.0f}"


def render_md(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(rows[0]) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


S4_FOOTNOTE = (
    f"{scenarios.S4_NOTE} edge-broker runs S4 once per durability, each on a fresh broker and "
    "store (`[storage] durability`: `fsync` = the WAL is fsynced before any PUBACK, survives a "
    "power cut; `os` = written to the OS before any PUBACK, survives a crash of the broker). "
    "mosquitto and amqtt have no such setting: their columns repeat their one S4 figure, with "
    "the offline messages held in memory only (mosquitto `persistence false`; even with "
    "`persistence true` mosquitto writes its database only at `autosave_interval` and at "
    "shutdown, never per message).")


def first_details(doc: dict, sc: str, broker: str = "edge") -> dict | None:
    """The details of one scenario's run (the first one when --repeat merged several)."""
    entry = doc.get("scenarios", {}).get(sc, {}).get(broker)
    if not entry or "details" not in entry:
        return None
    d: dict = entry["details"]
    return d["repeats"][0] if "repeats" in d else d


def s4_store_rows(doc: dict) -> list[list[str]] | None:
    entry = doc.get("scenarios", {}).get("S4", {}).get("edge")
    if not entry or "details" not in entry:
        return None
    d = entry["details"]
    runs = d.get("repeats", [d])
    head = ["Durability", "Run", "Acked msgs", "Ingest msgs/s", "Drain msgs/s", "Commits",
            "Commits/msg", "Fsyncs", "Fsyncs/msg", "Batches/commit", "Changes/msg",
            "Broker CPU ingest %", "Store MB after ingest"]
    rows = [head]
    for k, run in enumerate(runs):
        for dur, v in run.get("variants", {}).items():
            st = (v.get("store") or {})
            ing = st.get("ingest") or {}
            per = ing.get("per_msg", {})
            fb = st.get("file_bytes_after_ingest")
            ingest_rate = v.get("ingest_msgs_per_s")
            rows.append([dur, f"#{k + 1}", f"{v['acked']:,}", fmt(ingest_rate, "msgs/s"),
                         fmt(v["drain"].get("rate") or None, "msgs/s"),
                         f"{ing['commits']:,}" if "commits" in ing else "-",
                         fmt(per.get("commits"), "per msg"),
                         f"{ing['fsyncs']:,}" if "fsyncs" in ing else "-",
                         fmt(per.get("fsyncs"), "per msg"),
                         str(ing.get("batches_per_commit", "-")),
                         f"{per['changes_written']:.1f}" if "changes_written" in per else "-",
                         f"{v.get('broker_cpu_pct_ingest', 0):.0f}",
                         "-" if fb is None else f"{fb / 1e6:,.1f}"])
    return rows if len(rows) > 1 else None


def render_report(doc: dict, rows: list[list[str]], targets: list, sc_ids: list[str]) -> str:
    m = doc["machine"]
    v = doc["versions"]
    o = doc["options"]
    lines = [
        "# edge-broker benchmark results",
        "",
        "Written by `python -m benchmarks` (see `benchmarks/README.md` for the method). "
        "Ratios are measured in the same run, brokers interleaved scenario by scenario.",
        "",
        f"- Date: {doc['date']}"
        + (" (quick mode: figures are not meaningful)" if doc["quick"] else ""),
        f"- Machine: {m['hostname']} ({m['uname']})",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable); "
        f"1-min load average at start {m.get('loadavg_1min_at_start', '?')} "
        "(anything well above 0 means another workload shared the machine)",
        f"- Versions: python {m['python']}, "
        + ", ".join(f"{LABEL[b]} {ver}" for b, ver in v.items()),
        f"- Scenarios: {', '.join(sc_ids)}; {o['duration_s']:g} s per measured run; "
        + (f"S5 {o['idle_connections']:,} connections, {o['idle_window_s']:g} s idle; "
           if "S5" in sc_ids else "")
        + (f"S6 {o['s6_rate']:,.0f} msgs/s; " if "S6" in sc_ids else "")
        + (f"S10 {o.get('s10_duration_s', 10):g} s per part; " if "S10" in sc_ids else "")
        + f"{doc.get('repeat', 1)} run(s) per figure (median); "
        "edge persistence/durability: "
        f"{o['edge_persistence'] or 'default'}/{o['edge_durability'] or 'default'}"
        + (f"; S4 edge durability: {', '.join(o['s4_durabilities'])}"
           if "S4" in sc_ids and o.get("s4_durabilities") else "")
        + (f"; S8 {o['startup_messages']:,} queued msgs in {o['startup_sessions']:,} sessions, "
           f"{o['startup_runs']} starts (+{o['startup_cold_runs']} cold)"
           if "S8" in sc_ids and not doc["quick"] else ""),
    ]
    c = doc.get("loadgen_ceiling")
    if c:
        lines.append(f"- Load generator ceiling (no broker, one process each): publisher "
                     f"{c['publisher_qos0']['msgs_per_s']:,} msgs/s, subscriber "
                     f"{c['subscriber_qos0']['msgs_per_s']:,} msgs/s (QoS 0, 100-byte payload)")
    lines += ["", "## Figures", "", render_md(rows), ""]
    if any("!" in cell for row in rows[1:] for cell in row):
        lines += ["`!` = that scenario failed a delivery check for that broker (see Failures "
                  "below): the figure is what was delivered, not a clean result.", ""]
    if any(scenarios.S4_NOTE in row[0] for row in rows[1:]):
        lines += [S4_FOOTNOTE, ""]
    if targets:
        lines += ["## Targets (edge-broker)", "", "| Target | Verdict | Measured |",
                  "|---|---|---|"]
        lines += [f"| {n} | {verdict} | {ev} |" for n, verdict, ev in targets]
        lines.append("")
    s4 = s4_store_rows(doc)
    if s4:
        lines += ["## S4: edge-broker's store during the ingest", "",
                  "Counters of the running broker's store (`edge-broker store --json stats`, "
                  "over its admin socket), sampled before and after the ingest phase: every "
                  "PUBACK is sent after its commit, so the ingest's commits are all counted. "
                  "Each message is appended once to the log (one `LogAppended` change), "
                  "whatever the number of offline sessions that take it; the sessions' "
                  "readers are updated once per batch. One commit per group of batches shows "
                  "group commit "
                  "working: with a window of 100 unacknowledged PUBLISHes, the best case is "
                  "about 1/100 commit per message. `fsync` issues one fsync of the WAL per "
                  "commit (checkpoints fsync the database file too and are not counted); `os` "
                  "issues none.", "", render_md(s4), ""]
    s8 = first_details(doc, "S8")
    if s8 and "connack_s" in s8:
        from . import startup
        lines += ["## S8: start-up with a queued backlog (edge-broker)", ""]
        if doc.get("repeat", 1) > 1:
            lines += [f"The details below are run #1 of {doc['repeat']}; the table above has "
                      "the median over the runs.", ""]
        lines += startup.render_md(s8)
    s10 = {b: e["details"] for b, e in doc.get("scenarios", {}).get("S10", {}).items()
           if "details" in e}
    if s10:
        from . import fairness
        lines += ["## S10: fairness, a control client under load", "",
                  "One control client (its own process) publishes QoS 1 to a topic it subscribes "
                  f"to, {o.get('s10_rate', 100):g} round trips a second, for "
                  f"{o.get('s10_duration_s', 10):g} s per part, each part on a fresh broker, "
                  "while the load runs in processes at nice +10. A round trip ends when both "
                  "the PUBACK and the delivery have arrived. Target: round trip p99 <= 10 ms. "
                  "Method: `benchmarks/README.md`, S10.", ""]
        if doc.get("repeat", 1) > 1:
            lines += [f"The details below are run #1 of {doc['repeat']}.", ""]
        lines += fairness.render_md({b: d["repeats"][0] if "repeats" in d else d
                                     for b, d in s10.items()}, LABEL)
        lines.append("")
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists() and not doc["quick"]:
        # Hand-written: the profile of where the time goes and the log of changes that
        # mattered, kept with every regenerated report.
        lines += [analysis.read_text().strip(), ""]
    lines += ["## Broker settings", ""]
    for b, s in doc["settings"].items():
        lines.append(f"- {LABEL[b]}: " + ", ".join(f"`{k}` = {val}" for k, val in s.items()))
    for b, why in doc["skipped"].items():
        lines.append(f"- {LABEL[b]}: skipped ({why})")
    if doc["failures"]:
        lines += ["", "## Failures and failed checks", ""]
        lines += [f"- {f}" for f in doc["failures"]]
    lines += ["", "## Notes", "",
              "- The figures come from one shared machine. Compare ratios from the same run "
              "rather than absolute figures across runs. A load average above 0 at the start "
              "means other work shared the cores, which shows up mostly in S3 and in the S6 "
              "tails.",
              "- mosquitto runs with `set_tcp_nodelay false` (its default, faster) except in S6 "
              "(`true`: Nagle adds tens of ms to its QoS 0 p99). edge-broker has the same "
              "`[mqtt]` inflight and queue limits as mosquitto.",
              "- amqtt queues offline messages only for non-anonymous sessions, so the load "
              "generator always sends a username. After several sessions reconnect at once "
              "with a large backlog, amqtt 0.12.1 sometimes delivers nothing to one of them "
              "(its log shows PUBACK timeouts). That is the S4 `!`.",
              "- S1/S2 figure = highest delivered rate with nothing lost. Full speed first, then "
              "paced steps down when the full-speed run left messages undelivered. Every step "
              "is in the JSON (`details.runs`)."]
    lines += ["", "Raw numbers, per-run details and latency histograms: "
              "`benchmarks/results/latest.json`.", ""]
    return "\n".join(lines)
