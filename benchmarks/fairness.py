"""S10 fairness: a control client's QoS 1 round trips while other clients load the broker.

Each part starts a fresh broker and runs, side by side:

* the **control client** (its own process, normal priority): a clean-session MQTT 3.1.1 client
  subscribed at QoS 1 to its own topic. It publishes QoS 1 to that topic, `rate` times a second
  (one round trip at a time), and times publish -> PUBACK and publish -> delivery; a round trip
  is over when both have arrived. It PUBACKs every delivery, as a real client does.
* the **load** (its own processes, `nice +LOAD_NICE`), one kind per part:
  - `flood`: one client publishes QoS 0 at full speed to a topic nobody subscribes to;
  - `flood_sub`: the same flood with one QoS 0 subscriber on that topic;
  - `churn`: 20 clients, each in a loop: CONNECT with clean session 0, wait for CONNACK,
    SUBSCRIBE QoS 1, wait for SUBACK, DISCONNECT and close, reconnect at once;
  - `takeover`: 200 connections, each in a loop: CONNECT with one shared client id and clean
    session 0, wait for CONNACK, hold the connection until the broker closes it (the next
    CONNECT takes the session over), reconnect at once;
  - `idle`: no load (the control client's reference on that broker).

The load starts first, the control client starts `warmup_s` later and runs for `duration_s`;
the load stops when the control client is done. Every wait has a deadline: a step of a churn or
takeover client that gets no answer in `step_timeout_s` is abandoned (counted) and retried, and
the runner kills what outlives the hard timeout.

Why the load runs niced: on a 2-core machine the broker, the control client and the load
generator share the cores. The load generator must not be what delays the control client (or
the broker), so its processes run at nice +10: whenever the broker or the control client want a
core they get it first, and the load takes what is left. Each part records the load's CPU
seconds and the control client's run-queue wait (`/proc/self/schedstat`), which shows whether
the control client ever waited for a core.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import time
from pathlib import Path
from typing import Any

from . import brokers, loadgen, wire
from .fairness_load import (
    COUNTERS,
    FLOOD_TOPIC,
    LOAD_NICE,
    PAYLOAD,
    cycler,
    flood,
    flood_subscriber,
)
from .histogram import Histogram
from .scenarios import S10_PARTS, Case, Result

CONTROL_ID = "bench-s10-control"
CONTROL_TOPIC = "bench/s10/control"
TAKEOVER_ID = "bench-s10-takeover"


def _schedstat() -> tuple[int, int]:
    """(ns on a CPU, ns waiting on a run queue) of this process's main thread."""
    try:
        run, wait, _slices = Path("/proc/self/schedstat").read_text().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return 0, 0


# --------------------------------------------------------------------------- control client


def _parse_publish(b0: int, body: bytes) -> tuple[int, bytes, int]:
    """(qos, payload, packet id) of a PUBLISH body [MQTT-3.3.2] (3.1.1)."""
    qos = (b0 >> 1) & 3
    p = 2 + ((body[0] << 8) | body[1])
    pid = 0
    if qos:
        pid = (body[p] << 8) | body[p + 1]
        p += 2
    return qos, body[p:], pid


def _control(host: str, port: int, rate: float, duration_s: float, grace_s: float,
             out: Any, go: Any, deadline: float, name: str) -> None:
    brokers.die_with_parent()
    try:
        sock, buf, _ = wire.open_session(host, port, CONTROL_ID, clean=True,
                                         subscribe_to=(CONTROL_TOPIC, 1))
    except Exception as exc:
        out.put(("error", name, f"control client connect: {exc!r}"))
        return
    out.put(("ready", name, None))
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        out.put(("error", name, "control: go signal never came"))
        return
    try:
        res = _control_loop(sock, buf, rate, duration_s, grace_s, deadline)
    except Exception as exc:
        out.put(("error", name, f"control client: {exc!r}"))
        return
    with contextlib.suppress(OSError):
        sock.sendall(wire.DISCONNECT)
        sock.close()
    out.put(("done", name, res))


def _control_loop(sock: socket.socket, buf: bytearray, rate: float, duration_s: float,
                  grace_s: float, deadline: float) -> dict[str, Any]:
    perf = time.perf_counter_ns
    mono = time.monotonic
    pad = b"c" * (PAYLOAD - 16)
    h_ack, h_del, h_rt = Histogram(), Histogram(), Histogram()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    interval = 1.0 / rate if rate > 0 else 0.0
    run0, wait0 = _schedstat()
    cpu0 = loadgen._cpu_s()
    started = completed = unexpected = 0
    unfinished = False
    closed: str | None = None
    pid = 1
    t_start = mono()
    t_start_ns = perf()
    t_last_ns = t_start_ns
    end = t_start + duration_s
    next_at = t_start
    while True:
        now = mono()
        if now >= end:
            break
        if now < next_at:
            time.sleep(next_at - now)    # pacing, not synchronisation
        seq = started
        t0 = perf()
        started += 1
        ack_ns = del_ns = 0
        # A round trip started in the window may finish up to grace_s after it: a stall of
        # the broker is measured, not cut off.
        limit = min(deadline, max(end, mono()) + grace_s)
        try:
            sock.sendall(wire.publish(CONTROL_TOPIC, struct.pack(">QQ", t0, seq) + pad, qos=1,
                                      packet_id=pid))
            ack_ns, del_ns, unexpected = _await_round_trip(sock, buf, sel, pid, seq, limit,
                                                           unexpected)
        except OSError as exc:     # closed or reset by the broker: the figures so far stand
            closed = repr(exc)
        if not (ack_ns and del_ns):
            # Given up on: its time so far is a lower bound of its round trip, and counts.
            h_rt.record(perf() - t0)
            unfinished = True
            break
        h_ack.record(ack_ns - t0)
        h_del.record(del_ns - t0)
        h_rt.record(max(ack_ns, del_ns) - t0)
        completed += 1
        t_last_ns = max(ack_ns, del_ns)
        pid = pid + 1 if pid < 65535 else 1
        next_at += interval
        if next_at < mono():
            next_at = mono()      # behind schedule after a stall: no catch-up burst
    run1, wait1 = _schedstat()
    window_s = (t_last_ns - t_start_ns) / 1e9
    return {"rate": rate, "duration_s": duration_s, "scheduled": round(duration_s * rate)
            if rate > 0 else None,
            "started": started, "completed": completed, "unfinished": unfinished,
            "closed": closed, "unexpected_packets": unexpected,
            "round_trips_per_s": completed / window_s if window_s > 0 else 0.0,
            "rtt": h_rt.summary_ms(), "puback": h_ack.summary_ms(),
            "delivery": h_del.summary_ms(),
            "cpu_s": round(loadgen._cpu_s() - cpu0, 3),
            "cpu_ms_on_core": round((run1 - run0) / 1e6, 1),
            "runq_wait_ms": round((wait1 - wait0) / 1e6, 1)}


def _await_round_trip(sock: socket.socket, buf: bytearray, sel: selectors.BaseSelector,
                      pid: int, seq: int, limit: float, unexpected: int) -> tuple[int, int, int]:
    """Read until the PUBACK of `pid` and the delivery of `seq` are in, or `limit` (monotonic).
    Returns (PUBACK time, delivery time; 0 = not arrived, unexpected packets so far)."""
    perf = time.perf_counter_ns
    ack_ns = del_ns = 0
    while not (ack_ns and del_ns):
        left = limit - time.monotonic()
        if left <= 0:
            break
        if not sel.select(min(left, 0.5)):
            continue
        chunk = sock.recv(65536)
        now_ns = perf()
        if not chunk:
            raise ConnectionError("broker closed the control connection")
        buf += chunk
        frames, used = wire.split_frames(buf)
        acks = []
        for b0, s, e in frames:
            kind = b0 >> 4
            if kind == wire.PUBACK and e - s == 2:
                if (buf[s] << 8 | buf[s + 1]) == pid:
                    ack_ns = now_ns
                else:
                    unexpected += 1
            elif kind == wire.PUBLISH:
                qos, payload, in_pid = _parse_publish(b0, bytes(buf[s:e]))
                if qos:
                    acks.append(wire.puback(in_pid))
                if len(payload) >= 16 and struct.unpack_from(">Q", payload, 8)[0] == seq:
                    del_ns = now_ns
                else:
                    unexpected += 1
            else:
                unexpected += 1
        del buf[:used]
        if acks:
            sock.sendall(b"".join(acks))
    return ack_ns, del_ns, unexpected


# --------------------------------------------------------------------------- one part


def _sum_counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(r[k] for r in results) for k in COUNTERS}
    out["clients"] = sum(r["clients"] for r in results)
    out["elapsed_s"] = max(r["elapsed_s"] for r in results)
    out["cpu_s"] = round(sum(r["cpu_s"] for r in results), 3)
    return out


def run_part(rb: brokers.RunningBroker, case: Case, part: str) -> dict[str, Any]:
    o = case.opts
    quick = o.quick
    duration = o.s10_duration_s
    grace = 5.0 if quick else max(10.0, duration)
    drain = 10.0 if quick else 30.0
    warmup = 0.3 if quick else 1.0
    step_timeout = 5.0
    crew = loadgen.Crew(warmup + duration + grace + drain + 30.0)
    load_go, control_go, stop = loadgen.CTX.Event(), loadgen.CTX.Event(), loadgen.CTX.Event()
    expected = loadgen.CTX.Value("q", -1, lock=False)
    settle_s = brokers.wait_quiet(rb.pid)
    load: set[str] = set()
    subs: set[str] = set()
    try:
        crew.start(_control, rb.host, rb.port, o.s10_rate, duration, grace, crew.out,
                   control_go, crew.deadline, "control")
        crew.wait_for({"control"}, "ready")
        if part in ("flood", "flood_sub"):
            if part == "flood_sub":
                spec = loadgen.SubSpec(topic=FLOOD_TOPIC, qos=0,
                                       client_ids=["bench-s10-flood-sub"], idle_s=2.0,
                                       drain_s=drain)
                crew.start(flood_subscriber, rb.host, rb.port, spec, None, crew.out, expected,
                           crew.deadline, "sub")
                subs.add("sub")
                crew.wait_for(subs, "ready")
            crew.start(flood, rb.host, rb.port, drain, crew.out, load_go, stop,
                       crew.deadline, "flood")
            load.add("flood")
        elif part in ("churn", "takeover"):
            if part == "churn":
                ids = [f"bench-s10-churn-{k}" for k in range(o.s10_churn_clients)]
            else:
                ids = [TAKEOVER_ID] * o.s10_takeover_conns
            for k, share in enumerate(loadgen.split(ids, o.s10_load_procs)):
                crew.start(cycler, rb.host, rb.port, part, share, step_timeout, crew.out,
                           load_go, stop, crew.deadline, f"{part}{k}")
                load.add(f"{part}{k}")
        crew.wait_for(load, "ready")
        load_go.set()
        t_go = time.monotonic()
        time.sleep(warmup)              # the load is running before the first round trip
        meter = brokers.CpuMeter(rb.pid)
        control_go.set()
        crew.wait_for({"control"}, "done")
        broker_cpu = meter.percent()
        stop.set()
        crew.wait_for(load, "done")
        load_s = time.monotonic() - t_go
        if subs:
            expected.value = crew.results["flood"]["sent"]
            crew.wait_for(subs, "done")
    finally:
        stop.set()
        load_go.set()
        control_go.set()
        crew.close()
    ctl = crew.results["control"]
    r: dict[str, Any] = {"part": part, "control": ctl, "broker_cpu_pct": round(broker_cpu, 1),
                         "settle_s": round(settle_s, 2), "load_s": round(load_s, 2),
                         "load_nice": LOAD_NICE}
    if "flood" in crew.results:
        f = crew.results["flood"]
        r["load"] = {k: v for k, v in f.items() if not k.startswith("t_")}
        r["load_rate"] = f["accepted_per_s"]
        if subs:
            flow = loadgen.merge_flow(f, [crew.results["sub"]], n_clients=1)
            r["load"]["delivered"] = flow["delivered"]
            r["load"]["delivered_per_s"] = flow["delivered_rate"]
            r["load"]["not_delivered"] = flow["lost"]
            r["load"]["sub_cpu_s"] = flow["sub_cpu_s"]
            r["load"]["cpu_s"] = round(f["cpu_s"] + sum(flow["sub_cpu_s"]), 3)
    elif load:
        c = _sum_counts([crew.results[n] for n in sorted(load)])
        r["load"] = c
        r["load_rate"] = c["cycles"] / c["elapsed_s"] if c["elapsed_s"] else None
    if "load" in r:
        r["loadgen_cpu_pct"] = round(100 * r["load"]["cpu_s"] / load_s, 1) if load_s else None
    return r


def run(case: Case) -> Result:
    res = Result()
    res.details["parts"] = {}
    o = case.opts
    for part in o.s10_parts:
        try:
            with case.launch(latency=True) as rb:
                r = run_part(rb, case, part)
        except (loadgen.LoadgenError, brokers.BrokerStartError, RuntimeError, OSError) as exc:
            # One part gone wrong (a worker failed, the broker died) keeps the other parts.
            res.details["parts"][part] = {"part": part, "error": f"{exc.__class__.__name__}: "
                                                                 f"{exc}"[:2000]}
            res.check(f"S10 {part} ran", False, str(exc)[:500])
            continue
        res.details["parts"][part] = r
        ctl = r["control"]
        res.figures[f"S10.{part}.rtt_p99_ms"] = ctl["rtt"]["p99_ms"]
        res.figures[f"S10.{part}.round_trips_per_s"] = ctl["round_trips_per_s"]
        if part != "idle":
            res.figures[f"S10.{part}.load_per_s"] = r.get("load_rate")
        label = S10_PARTS[part][0]
        res.check(f"S10 {part} control round trips",
                  ctl["completed"] > 0 and not ctl["unfinished"],
                  f"{ctl['completed']}/{ctl['started']} round trips completed (PUBACK and "
                  f"delivery) under {label}, {ctl['unexpected_packets']} unexpected packets"
                  + (f"; control connection lost: {ctl['closed']}" if ctl["closed"] else ""))
        load = r.get("load", {})
        if part in ("flood", "flood_sub"):
            res.check(f"S10 {part} flood drained", load.get("closed") is None,
                      f"{load.get('sent', 0)} QoS 0 sent, "
                      + (load["closed"] if load.get("closed") else "PINGRESP after the last"))
        elif part in ("churn", "takeover"):
            res.check(f"S10 {part} load served", load.get("connacks", 0) > 0,
                      f"{load.get('connacks', 0)} CONNACKs, {load.get('cycles', 0)} cycles "
                      f"from {load.get('connects', 0)} connections, "
                      f"{load.get('timeouts', 0)} steps timed out")
    return res


# --------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def render_md(per_broker: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """RESULTS.md section: every part, every broker (`per_broker`: broker -> details)."""
    head = ["Part", "Broker", "Round trip p50 / p99 / max ms", "PUBACK p50 / p99 / max ms",
            "Delivery p50 / p99 / max ms", "Round trips (done/started)", "Round trips/s",
            "Load", "Load CPU %", "Broker CPU %", "Control run-queue wait ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    parts: list[str] = []
    for d in per_broker.values():
        parts += [p for p in d.get("parts", {}) if p not in parts]
    for part in parts:
        for broker, d in per_broker.items():
            r = d.get("parts", {}).get(part)
            if r is None:
                continue
            if "error" in r:
                why = (r["error"].splitlines() or [""])[0][:200].replace("|", "/")
                lines.append(f"| {S10_PARTS[part][0]} | {labels.get(broker, broker)} | "
                             f"error: {why} |" + " |" * (len(head) - 3))
                continue
            c = r["control"]
            trip = " / ".join(_ms(c[k][f]) for k in ("rtt",) for f in ("p50_ms", "p99_ms",
                                                                       "max_ms"))
            ack = " / ".join(_ms(c["puback"][f]) for f in ("p50_ms", "p99_ms", "max_ms"))
            dlv = " / ".join(_ms(c["delivery"][f]) for f in ("p50_ms", "p99_ms", "max_ms"))
            lines.append("| " + " | ".join([
                S10_PARTS[part][0], labels.get(broker, broker), trip, ack, dlv,
                f"{c['completed']:,}/{c['started']:,}"
                + (" (last unfinished)" if c["unfinished"] else ""),
                f"{c['round_trips_per_s']:,.1f}", _load_text(part, r),
                "-" if r.get("loadgen_cpu_pct") is None else f"{r['loadgen_cpu_pct']:.0f}",
                f"{r['broker_cpu_pct']:.0f}", f"{c['runq_wait_ms']:,.1f}"]) + " |")
    return lines


def _load_text(part: str, r: dict[str, Any]) -> str:
    ld = r.get("load")
    if not ld:
        return "none"
    if part in ("flood", "flood_sub"):
        rate = ld.get("accepted_per_s")
        text = (f"{ld['sent']:,} QoS 0 sent, "
                + (f"{rate:,.0f} msgs/s accepted" if rate else f"not drained ({ld['closed']})"))
        if "delivered" in ld:
            text += (f", {ld['delivered']:,} delivered ({ld['delivered_per_s']:,.0f}/s, "
                     f"{ld['not_delivered']:,} not)")
        return text
    what = "cycles" if part == "churn" else "CONNACKs"
    rate = r.get("load_rate") or 0.0
    return (f"{ld['cycles']:,} {what} ({rate:,.0f}/s) from {ld['connects']:,} connections; "
            f"{ld['timeouts']:,} steps timed out, {ld['connect_errors']:,} connect errors"
            + (f", {ld['taken_over']:,} taken over, {ld['closed_before_connack']:,} closed "
               "before CONNACK" if part == "takeover" else ""))
