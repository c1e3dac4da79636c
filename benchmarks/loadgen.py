"""Load generator: raw-socket MQTT 3.1.1 publishers, subscribers and idle connections, each group
in its own process (multiprocessing, fork).

Theory of operation
-------------------
* A *flow* is: subscriber processes connect and subscribe, report ready; then one publisher
  process connects and publishes (at full speed, or paced to a rate) for `duration_s`; when it is
  done the parent tells the subscribers how many messages to expect; each subscriber stops when it
  has them all, or when nothing arrived for `idle_s`, or at the hard deadline.
* Payload = 8-byte send timestamp (time.perf_counter_ns, CLOCK_MONOTONIC, so comparable across
  processes of one machine) + 8-byte publisher id/sequence + padding. Messages of one write batch
  share the timestamp taken just before that write; a subscriber takes one clock reading per
  recv(), so latencies are counted by run-length: cheap enough to keep every message.
* The publisher writes a batch of packets with one sendall (pipelining). Full speed = as fast as
  TCP lets it (the broker's read side is the brake). Paced = packets due by now are sent each
  `tick_s`, so a rate is held without a busy loop (important on a 2-core box: a spinning load
  generator would steal the broker's core).
* QoS 1: the publisher keeps at most `window` PUBLISHes unacknowledged; subscribers answer every
  QoS 1 PUBLISH with a PUBACK, batched per recv().
* Everything is bounded: every wait has a deadline, and the parent kills what outlives the hard
  timeout. Hosts other than loopback are refused.
* TLS (`cafile` in a spec, S11-S13): the worker wraps its sockets with `ssl` (TLS 1.2 minimum,
  the server verified against `cafile`, host name = the IP address). The hot loops only test a
  local flag once per recv()/ack read, so the plain path costs what it did. An `SSLSocket`
  returns at most one TLS record (16 KB) per recv(), and may hold decrypted bytes that
  select() cannot see: the TLS path reads on without blocking until the kernel buffer is empty
  (up to 256 KB, as one plain recv) and `pending()` is 0, so no bytes wait unseen (tlsio.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import multiprocessing as mp
import os
import queue
import resource
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from . import brokers, tlsio, wire
from .histogram import Histogram

CTX = mp.get_context("fork")


def require_loopback(host: str) -> None:
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    for a in addrs:
        if not ipaddress.ip_address(a).is_loopback:
            raise ValueError(f"refusing non-loopback host {host!r} ({a}): the load generator "
                             "only targets brokers on this machine")


def _pin(cpus: list[int] | None) -> None:
    """Worker start-up: die with the runner, and pin to `cpus` if given."""
    brokers.die_with_parent()
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- specs and results


@dataclass
class PubSpec:
    topic: str
    qos: int = 0
    payload_size: int = 100
    duration_s: float = 5.0
    rate: float | None = None          # msgs/s; None = full speed
    window: int = 100                  # QoS 1 unacked in flight
    batch: int = 256                   # max PUBLISHes per sendall
    tick_s: float = 0.001              # pacing granularity
    max_messages: int | None = None    # stop early after this many
    client_id: str = "bench-pub"
    ack_wait_s: float = 10.0           # after the window, wait this long for the last PUBACKs
    cafile: str | None = None          # TLS: verify the broker against this CA (S11-S13)
    password: str | None = None        # sent with the username `bench` (S13's password file)
    # After DISCONNECT, wait up to this long for the broker to close the connection before
    # closing it (0: close at once, as the plain scenarios do). See README "S11-S13".
    close_wait_s: float = 0.0


@dataclass
class SubSpec:
    topic: str
    qos: int = 0
    client_ids: list[str] = field(default_factory=lambda: ["bench-sub"])
    clean: bool = True
    subscribe: bool = True             # False when resuming a persistent session (S4 drain)
    idle_s: float = 3.0                # stop after this long without a message, once told
    drain_s: float = 30.0              # stop this long after being told, whatever the count
    disconnect_after_subscribe: bool = False   # S4 setup: leave offline sessions behind
    connect_timeout_s: float = 10.0    # per CONNECT/SUBSCRIBE handshake
    cafile: str | None = None          # TLS: verify the broker against this CA (S11-S13)
    password: str | None = None        # sent with the username `bench` (S13's password file)


# --------------------------------------------------------------------------- publisher


def _publisher(host: str, port: int, spec: PubSpec, cpus: list[int] | None,
               out: Any, go: Any, deadline: float) -> None:
    _pin(cpus)
    try:
        sock, buf, _ = wire.open_session(host, port, spec.client_id,
                                         tls=tlsio.client_tls(spec.cafile), password=spec.password)
    except Exception as exc:  # report, the parent decides
        out.put(("error", "pub", f"publisher connect: {exc!r}"))
        return
    out.put(("ready", "pub", None))
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        out.put(("error", "pub", "go signal never came"))
        return
    try:
        res = _publish_loop(sock, buf, spec, deadline)
    except Exception as exc:
        out.put(("error", "pub", f"publisher: {exc!r}"))
        return
    try:
        sock.sendall(wire.DISCONNECT)
        if spec.close_wait_s > 0:
            res["closed_by_broker"] = tlsio.wait_closed(sock, spec.close_wait_s)
        sock.close()
    except OSError:
        pass
    res["cpu_s"] = _cpu_s()
    out.put(("done", "pub", res))


def _publish_loop(sock: socket.socket, buf: bytearray, spec: PubSpec,
                  deadline: float) -> dict:
    pad_len = max(0, spec.payload_size - 16)
    pad = b"x" * pad_len
    prefix = wire.publish_prefix(spec.topic, 16 + pad_len, spec.qos)
    pack_ts = struct.Struct(">QQ").pack
    pack_qos1 = struct.Struct(f">{len(prefix)}sHQQ{pad_len}s").pack
    qos1 = spec.qos == 1
    perf = time.perf_counter_ns
    mono = time.monotonic
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sock.settimeout(max(1.0, deadline - mono()))

    sent = 0
    acked = 0
    inflight = 0
    next_pid = 1
    ack_buf = bytes(buf)
    limit = spec.max_messages if spec.max_messages is not None else 1 << 62
    t_start = mono()
    end = t_start + spec.duration_s
    t_first_ns = perf()
    rate = spec.rate
    tls = isinstance(sock, ssl.SSLSocket)

    def read_acks(timeout: float) -> int:
        nonlocal ack_buf
        # TLS: bytes already decrypted (pending) are invisible to select().
        if not (tls and sock.pending()) and not sel.select(timeout):
            return 0
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError("broker closed the publisher connection")
        if tls:
            data = tlsio.read_ready(sock, sel, data)
        data = ack_buf + data if ack_buf else data
        n = 0
        i = 0
        ln = len(data)
        while i + 4 <= ln:
            if data[i] != 0x40 or data[i + 1] != 2:
                frames, used = wire.split_frames(data, i)
                # Anything but PUBACK (e.g. PINGRESP) is skipped, correctly framed.
                for b0, _s, _e in frames:
                    if b0 >> 4 == wire.PUBACK:
                        n += 1
                i = used
                break
            n += 1
            i += 4
        ack_buf = data[i:]
        return n

    while True:
        now = mono()
        if now >= end or sent >= limit:
            break
        if qos1:
            got = read_acks(0)
            acked += got
            inflight -= got
        due = int((now - t_start) * rate) - sent if rate is not None else spec.batch
        n = min(due, spec.batch, limit - sent)
        if qos1:
            n = min(n, spec.window - inflight)
        if n <= 0:
            if rate is not None:
                wait = max(spec.tick_s, (sent + 1) / rate - (now - t_start))
                wait = min(wait, end - now)
            else:
                wait = min(0.05, end - now)
            if qos1 and rate is None:
                got = read_acks(max(0.0, wait))   # window full: block until acks come
                acked += got
                inflight -= got
            elif wait > 0:
                time.sleep(wait)                  # paced: acks are read at the next tick
            continue
        ts = perf()
        if qos1:
            parts = []
            for k in range(n):
                parts.append(pack_qos1(prefix, next_pid, ts, sent + k, pad))
                next_pid = next_pid + 1 if next_pid < 65535 else 1
            sock.sendall(b"".join(parts))
            inflight += n
        else:
            sock.sendall((prefix + pack_ts(ts, sent) + pad) * n)
        sent += n
    t_sent_ns = perf()
    if qos1:
        ack_deadline = min(deadline, mono() + spec.ack_wait_s)
        while inflight > 0 and mono() < ack_deadline:
            got = read_acks(min(0.2, max(0.0, ack_deadline - mono())))
            acked += got
            inflight -= got
    t_done_ns = perf()
    return {"sent": sent, "acked": acked if qos1 else None, "t_first_ns": t_first_ns,
            "t_sent_ns": t_sent_ns, "t_done_ns": t_done_ns,
            "elapsed_s": (t_sent_ns - t_first_ns) / 1e9}


# --------------------------------------------------------------------------- subscriber


def _subscriber(host: str, port: int, spec: SubSpec, cpus: list[int] | None, out: Any,
                expected: Any, deadline: float, name: str) -> None:
    _pin(cpus)
    socks = []
    try:
        for cid in spec.client_ids:
            sock, buf, _ = wire.open_session(
                host, port, cid, clean=spec.clean, timeout_s=spec.connect_timeout_s,
                subscribe_to=(spec.topic, spec.qos) if spec.subscribe else None,
                tls=tlsio.client_tls(spec.cafile), password=spec.password)
            socks.append((sock, buf))
    except Exception as exc:
        out.put(("error", name, f"subscriber connect: {exc!r}"))
        return
    if spec.disconnect_after_subscribe:
        for sock, _ in socks:
            try:
                sock.sendall(wire.DISCONNECT)
                sock.close()
            except OSError:
                pass
        out.put(("ready", name, None))
        out.put(("done", name, {"received": 0, "per_client": [0] * len(socks)}))
        return
    out.put(("ready", name, None))
    try:
        res = _consume_loop(socks, spec, expected, deadline)
    except Exception as exc:
        out.put(("error", name, f"subscriber: {exc!r}"))
        return
    for sock, _ in socks:
        try:
            sock.sendall(wire.DISCONNECT)
            sock.close()
        except OSError:
            pass
    res["cpu_s"] = _cpu_s()
    out.put(("done", name, res))


def _consume_loop(socks: list[tuple[socket.socket, bytearray]], spec: SubSpec, expected: Any,
                  deadline: float) -> dict:
    """Read PUBLISHes from every socket until each has `expected.value` of them."""
    sel = selectors.DefaultSelector()
    state: list[dict[str, Any]] = []
    for idx, (sock, buf) in enumerate(socks):
        sock.setblocking(False)
        st: dict[str, Any] = {"sock": sock, "buf": bytes(buf), "n": 0, "idx": idx}
        state.append(st)
        sel.register(sock, selectors.EVENT_READ, st)
    hist = Histogram()
    perf = time.perf_counter_ns
    mono = time.monotonic
    t_first_ns = None
    t_last_ns = None
    last_progress = mono()
    told_at = None
    done_socks = 0
    dups_or_extra = 0
    protocol_errors = 0

    # Handle bytes that arrived with the SUBACK (resumed sessions).
    pending = [st for st in state if st["buf"]]
    tls = any(isinstance(sock, ssl.SSLSocket) for sock, _ in socks)

    while True:
        now = mono()
        exp = expected.value
        if exp >= 0:
            if told_at is None:
                told_at = now
                last_progress = max(last_progress, now)
            if all(st["n"] >= exp for st in state):
                break
            if now - last_progress > spec.idle_s or now - told_at > spec.drain_s:
                break
        if now >= deadline:
            break
        if pending:
            events = [(None, st) for st in pending]
            pending = []
            from_buffer = True
        else:
            events = [(k.data, k.data) for k, _ in sel.select(0.05)]
            from_buffer = False
        for _key, st in events:
            sock = st["sock"]
            if from_buffer:
                data = st["buf"]
                st["buf"] = b""
            else:
                try:
                    chunk = sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    sel.unregister(sock)
                    done_socks += 1
                    continue
                if tls:
                    chunk = tlsio.read_more(sock, chunk)
                data = st["buf"] + chunk if st["buf"] else chunk
            now_ns = perf()
            # ---- hot loop: frame, count, latency by run-length, collect PUBACKs
            n = len(data)
            i = 0
            count = 0
            acks = []
            last_ts = b""
            run = 0
            while i + 2 <= n:
                b0 = data[i]
                rl = data[i + 1]
                j = i + 2
                if rl & 0x80:
                    rl &= 0x7F
                    shift = 7
                    while True:
                        if j >= n:
                            rl = -1
                            break
                        byte = data[j]
                        j += 1
                        rl |= (byte & 0x7F) << shift
                        if not byte & 0x80:
                            break
                        shift += 7
                    if rl < 0:
                        break
                end = j + rl
                if end > n:
                    break
                if b0 >> 4 == 3:
                    p = j + 2 + ((data[j] << 8) | data[j + 1])
                    if b0 & 0x06:
                        acks.append(data[p:p + 2])
                        p += 2
                    ts = data[p:p + 8]
                    if ts == last_ts:
                        run += 1
                    else:
                        if run:
                            hist.record(now_ns - int.from_bytes(last_ts, "big"), run)
                        last_ts = ts
                        run = 1
                    count += 1
                elif b0 >> 4 != wire.PINGRESP:
                    protocol_errors += 1
                i = end
            if run:
                hist.record(now_ns - int.from_bytes(last_ts, "big"), run)
            st["buf"] = data[i:] if i < n else b""
            if acks:
                out = b"".join([b"\x40\x02" + a for a in acks])
                try:
                    k = sock.send(out)
                except (BlockingIOError, ssl.SSLWantWriteError):
                    k = 0   # TLS: nothing was written; sendall retries the same bytes
                if k < len(out):
                    sock.setblocking(True)
                    sock.sendall(out[k:])
                    sock.setblocking(False)
            if count:
                if t_first_ns is None:
                    t_first_ns = now_ns
                t_last_ns = now_ns
                st["n"] += count
                last_progress = mono()
        if done_socks == len(state):
            break
    exp = expected.value
    per_client = [st["n"] for st in state]
    if exp >= 0:
        dups_or_extra = sum(max(0, c - exp) for c in per_client)
    return {"received": sum(per_client), "per_client": per_client, "hist": hist.to_dict(),
            "t_first_ns": t_first_ns, "t_last_ns": t_last_ns, "extra": dups_or_extra,
            "protocol_errors": protocol_errors, "closed_by_broker": done_socks}


# --------------------------------------------------------------------------- idle connections


def _idle_holder(host: str, port: int, n: int, prefix: str, keepalive_s: int,
                 cpus: list[int] | None, out: Any, release: Any, deadline: float,
                 name: str, concurrency: int = 64) -> None:
    """Open `n` connections (CONNECT, wait CONNACK, `concurrency` handshakes in flight), report,
    then hold them silently until `release` is set."""
    _pin(cpus)
    sel = selectors.DefaultSelector()
    established: list[socket.socket] = []
    pending: dict[socket.socket, bytes] = {}
    failures = 0
    next_i = 0
    try:
        while (next_i < n or pending) and time.monotonic() < deadline:
            while next_i < n and len(pending) < concurrency:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(5.0)
                try:
                    s.connect((host, port))
                    s.sendall(wire.connect(f"{prefix}-{next_i}", keepalive_s=keepalive_s))
                except OSError:
                    failures += 1
                    s.close()
                    next_i += 1
                    if failures > 50:
                        raise
                    continue
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                pending[s] = b""
                next_i += 1
            for key, _ in sel.select(0.5):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    failures += 1
                    sel.unregister(s)
                    del pending[s]
                    s.close()
                    continue
                got = pending[s] + data
                if len(got) < 4:
                    pending[s] = got
                    continue
                sel.unregister(s)
                del pending[s]
                if got[0] >> 4 == wire.CONNACK and got[3] == 0:
                    established.append(s)
                else:
                    failures += 1
                    s.close()
    except Exception as exc:
        out.put(("error", name, f"idle connections: {exc!r} after {len(established)}"))
        return
    out.put(("done", name, {"established": len(established), "failures": failures,
                            "timed_out": len(pending)}))
    release.wait(timeout=max(0.0, deadline - time.monotonic()))
    for s in established:
        with contextlib.suppress(OSError):
            s.close()


# --------------------------------------------------------------------------- orchestration


class LoadgenError(Exception):
    pass


class Crew:
    """The worker processes of one flow and their message queue."""

    def __init__(self, hard_timeout_s: float) -> None:
        self.deadline = time.monotonic() + hard_timeout_s
        self.out = CTX.Queue()
        self.procs: list[Any] = []
        self.results: dict[str, Any] = {}

    def start(self, target: Any, *args: Any) -> None:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)

    def wait_for(self, names: set[str], kind: str) -> None:
        """Wait until every worker in `names` has reported `kind` (ready|done)."""
        missing = set(names)
        while missing:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise LoadgenError(f"hard timeout waiting for {kind} from {sorted(missing)}")
            try:
                msg_kind, name, payload = self.out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise LoadgenError(f"worker died (exit {dead[0].exitcode})") from None
                continue
            if msg_kind == "error":
                raise LoadgenError(payload)
            if msg_kind == "done":
                self.results[name] = payload
            if msg_kind == kind or (kind == "ready" and msg_kind == "done"):
                missing.discard(name)

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=max(0.1, min(3.0, self.deadline - time.monotonic())))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.out.close()


def split(items: list[str], parts: int) -> list[list[str]]:
    parts = max(1, min(parts, len(items)))
    return [items[k::parts] for k in range(parts)]


def _start_subscribers(crew: Crew, host: str, port: int, sub: SubSpec, sub_procs: int,
                       cpus: list[int] | None, expected: Any) -> set[str]:
    """Spread `sub`'s clients over `sub_procs` subscriber processes; returns their names."""
    names = set()
    for k, ids in enumerate(split(sub.client_ids, sub_procs)):
        name = f"sub{k}"
        names.add(name)
        part = SubSpec(**{**sub.__dict__, "client_ids": ids})
        crew.start(_subscriber, host, port, part, cpus, crew.out, expected, crew.deadline, name)
    return names


def run_flow(host: str, port: int, pub: PubSpec, sub: SubSpec, *, sub_procs: int = 1,
             cpus: list[int] | None = None, hard_timeout_s: float = 60.0,
             sub_port: int | None = None) -> dict:
    """Subscribers first, then one publisher; returns the merged figures. `sub_port`: the
    subscribers' broker when it is not the publisher's (S11: across a bridge)."""
    require_loopback(host)
    crew = Crew(hard_timeout_s)
    expected = CTX.Value("q", -1, lock=False)
    go = CTX.Event()
    try:
        names = _start_subscribers(crew, host, sub_port or port, sub, sub_procs, cpus,
                                   expected)
        crew.wait_for(names, "ready")
        crew.start(_publisher, host, port, pub, cpus, crew.out, go, crew.deadline)
        crew.wait_for({"pub"}, "ready")
        go.set()
        crew.wait_for({"pub"}, "done")
        p = crew.results["pub"]
        expected.value = p["sent"]
        crew.wait_for(names, "done")
    finally:
        crew.close()
    subs = [crew.results[n] for n in sorted(names)]
    return merge_flow(p, subs, n_clients=len(sub.client_ids))


def merge_flow(p: dict, subs: list[dict], n_clients: int) -> dict:
    hist = Histogram()
    for s in subs:
        if "hist" in s:
            hist.merge(Histogram.from_dict(s["hist"]))
    received = sum(s["received"] for s in subs)
    expected_total = p["sent"] * n_clients
    lasts = [s["t_last_ns"] for s in subs if s.get("t_last_ns")]
    t_last = max(lasts) if lasts else None
    window_s = (t_last - p["t_first_ns"]) / 1e9 if t_last else None
    per_client = [c for s in subs for c in s.get("per_client", [])]
    return {
        "published": p["sent"], "acked": p["acked"], "expected": expected_total,
        "delivered": received, "lost": max(0, expected_total - received),
        "extra": sum(s.get("extra", 0) for s in subs),
        "min_per_client": min(per_client) if per_client else 0,
        "publish_s": p["elapsed_s"], "window_s": window_s,
        "publish_rate": p["sent"] / p["elapsed_s"] if p["elapsed_s"] else 0.0,
        "delivered_rate": received / window_s if window_s else 0.0,
        "latency": hist.summary_ms(), "hist": hist.to_dict(),
        "protocol_errors": sum(s.get("protocol_errors", 0) for s in subs),
        "closed_by_broker": sum(s.get("closed_by_broker", 0) for s in subs),
        "loadgen_cpu_s": p.get("cpu_s", 0.0) + sum(s.get("cpu_s", 0.0) for s in subs),
        "pub_cpu_s": p.get("cpu_s", 0.0), "sub_cpu_s": [s.get("cpu_s", 0.0) for s in subs],
    }


def setup_offline_sessions(host: str, port: int, topic: str, client_ids: list[str],
                           *, hard_timeout_s: float = 30.0) -> None:
    """S4 setup: clean-session-0 subscribers subscribe at QoS 1 and disconnect."""
    require_loopback(host)
    crew = Crew(hard_timeout_s)
    expected = CTX.Value("q", 0, lock=False)
    try:
        spec = SubSpec(topic=topic, qos=1, client_ids=client_ids, clean=False,
                       disconnect_after_subscribe=True)
        crew.start(_subscriber, host, port, spec, None, crew.out, expected, crew.deadline, "s")
        crew.wait_for({"s"}, "done")
    finally:
        crew.close()


def publish_only(host: str, port: int, pub: PubSpec, *, cpus: list[int] | None = None,
                 hard_timeout_s: float = 60.0) -> dict:
    require_loopback(host)
    crew = Crew(hard_timeout_s)
    go = CTX.Event()
    try:
        crew.start(_publisher, host, port, pub, cpus, crew.out, go, crew.deadline)
        crew.wait_for({"pub"}, "ready")
        go.set()
        crew.wait_for({"pub"}, "done")
    finally:
        crew.close()
    return crew.results["pub"]


def drain(host: str, port: int, sub: SubSpec, expected_each: int, *, sub_procs: int = 1,
          cpus: list[int] | None = None, hard_timeout_s: float = 120.0) -> dict:
    """S4 drain: resume persistent sessions (no SUBSCRIBE) and read `expected_each` apiece."""
    require_loopback(host)
    crew = Crew(hard_timeout_s)
    expected = CTX.Value("q", expected_each, lock=False)
    t0 = time.perf_counter_ns()
    try:
        names = _start_subscribers(crew, host, port, sub, sub_procs, cpus, expected)
        crew.wait_for(names, "done")
    finally:
        crew.close()
    subs = [crew.results[n] for n in sorted(names)]
    received = sum(s["received"] for s in subs)
    lasts = [s["t_last_ns"] for s in subs if s.get("t_last_ns")]
    window_s = (max(lasts) - t0) / 1e9 if lasts else None
    per_client = [c for s in subs for c in s["per_client"]]
    return {"expected": expected_each * len(sub.client_ids), "delivered": received,
            "per_client": per_client, "window_s": window_s,
            "rate": received / window_s if window_s else 0.0,
            "extra": sum(s.get("extra", 0) for s in subs)}


def hold_idle(host: str, port: int, n: int, *, procs: int = 4, keepalive_s: int = 300,
              cpus: list[int] | None = None, hard_timeout_s: float = 120.0) -> tuple[Crew, Any,
                                                                                  dict]:
    """Open n idle connections over `procs` processes. Returns (crew, release event, counts);
    the caller measures, then sets the event and closes the crew."""
    require_loopback(host)
    crew = Crew(hard_timeout_s)
    release = CTX.Event()
    names = set()
    share = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
    for k, m in enumerate(share):
        if m:
            name = f"idle{k}"
            names.add(name)
            crew.start(_idle_holder, host, port, m, f"idle{k}", keepalive_s, cpus, crew.out,
                       release, crew.deadline, name)
    try:
        crew.wait_for(names, "done")
    except Exception:
        release.set()
        crew.close()
        raise
    counts = {"established": sum(crew.results[x]["established"] for x in names),
              "failures": sum(crew.results[x]["failures"] for x in names),
              "timed_out": sum(crew.results[x]["timed_out"] for x in names)}
    return crew, release, counts
