"""S10 fairness: the load generators (benchmarks/fairness.py runs them next to its control
client). Each runs in its own process at nice +LOAD_NICE, which fairness.py's docstring
explains:

* `flood`: one client publishes QoS 0 at full speed until told to stop, then sends PINGREQ and
  waits for the PINGRESP, which tells when the broker had read the whole flood;
* `flood_subscriber`: loadgen's subscriber, niced;
* `cycler`: churn (CONNECT with clean session 0, SUBSCRIBE, DISCONNECT, again) or takeover
  (CONNECT with one shared client id, hold until the broker closes it, again) clients, driven
  non-blocking through one selector per process; every step waits for the broker's answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import time
from typing import Any

from . import brokers, loadgen, wire

LOAD_NICE = 10
FLOOD_TOPIC = "bench/s10/flood"
PAYLOAD = 100            # bytes: 8-byte timestamp, 8-byte sequence, padding (as loadgen)
FLOOD_BATCH = 256        # QoS 0 PUBLISHes per write


def _load_start() -> None:
    """Load worker start-up: die with the runner, and yield the CPU to the broker and the
    control client (see the module docstring)."""
    brokers.die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(LOAD_NICE)



# --------------------------------------------------------------------------- QoS 0 flood


def flood(host: str, port: int, drain_s: float, out: Any, go: Any, stop: Any,
           deadline: float, name: str) -> None:
    """Publish QoS 0 at full speed until `stop`, then PINGREQ: the PINGRESP says the broker has
    read every PUBLISH before it (it handles one connection's packets in order)."""
    _load_start()
    try:
        sock, _buf, _ = wire.open_session(host, port, "bench-s10-flood")
    except Exception as exc:
        out.put(("error", name, f"flood connect: {exc!r}"))
        return
    out.put(("ready", name, None))
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        out.put(("error", name, "flood: go signal never came"))
        return
    cpu0 = loadgen._cpu_s()
    prefix = wire.publish_prefix(FLOOD_TOPIC, PAYLOAD, 0)
    pad = b"f" * (PAYLOAD - 16)
    pack = struct.Struct(">QQ").pack
    perf = time.perf_counter_ns
    mono = time.monotonic
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_WRITE)
    sent = 0
    closed: str | None = None
    pending = memoryview(b"")
    in_batch = 0
    t_first_ns = perf()
    try:
        # A batch once started is written to the end (no half packet on the wire).
        while pending or (not stop.is_set() and mono() < deadline):
            if not pending:
                sent += in_batch
                pending = memoryview((prefix + pack(perf(), sent) + pad) * FLOOD_BATCH)
                in_batch = FLOOD_BATCH
            try:
                n = sock.send(pending)
                pending = pending[n:]
            except BlockingIOError:
                # The broker is not reading: wait for room, looking at `stop` now and then.
                sel.select(0.05)
                if mono() >= deadline:
                    break
        if not pending:
            sent += in_batch
    except OSError as exc:
        closed = repr(exc)
    t_sent_ns = perf()
    t_drained_ns = None
    if closed is None:
        t_drained_ns, closed = _ping_drain(sock, min(deadline, mono() + drain_s))
    with contextlib.suppress(OSError):
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall(wire.DISCONNECT)
    sock.close()
    drained_s = (t_drained_ns - t_first_ns) / 1e9 if t_drained_ns else None
    out.put(("done", name, {
        "sent": sent, "acked": None, "t_first_ns": t_first_ns, "t_sent_ns": t_sent_ns,
        "t_drained_ns": t_drained_ns, "elapsed_s": (t_sent_ns - t_first_ns) / 1e9,
        "drained_s": drained_s,
        "accepted_per_s": sent / drained_s if drained_s else None,
        "closed": closed, "cpu_s": round(loadgen._cpu_s() - cpu0, 3)}))


def _ping_drain(sock: socket.socket, until: float) -> tuple[int | None, str | None]:
    """Send PINGREQ and wait for PINGRESP. Returns (time it came or None, what went wrong)."""
    sock.setblocking(True)
    sock.settimeout(max(0.1, until - time.monotonic()))
    try:
        sock.sendall(wire.PINGREQ_BYTES)
        buf = bytearray()
        while True:
            b0, _body = wire.recv_packet(sock, buf, until)
            if b0 >> 4 == wire.PINGRESP:
                return time.perf_counter_ns(), None
    except (OSError, TimeoutError) as exc:
        return None, f"no PINGRESP after the flood: {exc!r}"


def flood_subscriber(*args: Any) -> None:
    with contextlib.suppress(OSError):
        os.nice(LOAD_NICE)
    loadgen._subscriber(*args)


# --------------------------------------------------------------------------- churn, takeover


class _Client:
    __slots__ = ("buf", "cid", "since", "sock", "state")

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.sock: socket.socket | None = None
        self.state = "idle"        # connecting | connack | suback | online | backoff
        self.since = 0.0
        self.buf = bytearray()


COUNTERS = ("connects", "connect_errors", "connacks", "refused", "subacks", "cycles",
            "closed_before_connack", "closed_before_suback", "taken_over", "timeouts",
            "unexpected_packets")


def cycler(host: str, port: int, mode: str, client_ids: list[str], step_timeout_s: float,
            out: Any, go: Any, stop: Any, deadline: float, name: str) -> None:
    """Drive `client_ids` through connect cycles until `stop` (see the module docstring):
    `mode` "churn" (CONNECT, SUBSCRIBE, DISCONNECT) or "takeover" (CONNECT, hold until closed).
    Every client is a real client: each step waits for the broker's answer."""
    _load_start()
    out.put(("ready", name, None))
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        out.put(("error", name, f"{mode}: go signal never came"))
        return
    cpu0 = loadgen._cpu_s()
    counts = dict.fromkeys(COUNTERS, 0)
    sel = selectors.DefaultSelector()
    clients = [_Client(c) for c in client_ids]
    mono = time.monotonic
    connect_pkt = {c.cid: wire.connect(c.cid, clean=False) for c in clients}
    subscribe_pkt = {c.cid: wire.subscribe(1, f"bench/s10/churn/{c.cid}", 1) for c in clients}

    def drop(c: _Client, backoff: bool = False) -> None:
        if c.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(c.sock)
            c.sock.close()
            c.sock = None
        c.buf.clear()
        c.state = "backoff" if backoff else "idle"
        c.since = mono()
        if not backoff:
            start(c)

    def start(c: _Client) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex((host, port))
        c.since = mono()
        if err not in (0, errno.EINPROGRESS):
            counts["connect_errors"] += 1
            s.close()
            c.state = "backoff"     # e.g. no free local port: retry in 10 ms
            return
        c.sock = s
        c.state = "connecting"
        sel.register(s, selectors.EVENT_WRITE, c)

    def on_writable(c: _Client) -> None:
        assert c.sock is not None
        if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            counts["connect_errors"] += 1
            drop(c, backoff=True)
            return
        counts["connects"] += 1
        c.sock.send(connect_pkt[c.cid])     # a few dozen bytes into an empty buffer
        c.state = "connack"
        c.since = mono()
        sel.modify(c.sock, selectors.EVENT_READ, c)

    def on_readable(c: _Client) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            counts[{"connack": "closed_before_connack", "suback": "closed_before_suback",
                    "online": "taken_over"}.get(c.state, "closed_before_connack")] += 1
            drop(c)
            return
        c.buf += data
        frames, used = wire.split_frames(c.buf)
        for b0, s, e in frames:
            kind = b0 >> 4
            if kind == wire.CONNACK and c.state == "connack" and e - s == 2:
                if c.buf[s + 1] != 0:
                    counts["refused"] += 1
                    drop(c)
                    return
                counts["connacks"] += 1
                c.since = mono()
                if mode == "churn":
                    c.sock.send(subscribe_pkt[c.cid])
                    c.state = "suback"
                else:
                    counts["cycles"] += 1
                    c.state = "online"
            elif kind == wire.SUBACK and c.state == "suback":
                counts["subacks"] += 1
                counts["cycles"] += 1
                # [MQTT-3.14.4-1] (3.1.1): after DISCONNECT the client closes the connection.
                with contextlib.suppress(OSError):
                    c.sock.send(wire.DISCONNECT)
                drop(c)
                return
            else:
                counts["unexpected_packets"] += 1
        del c.buf[:used]

    t0 = mono()
    for c in clients:
        start(c)
    last_sweep = t0
    try:
        while not stop.is_set() and mono() < deadline:
            for key, mask in sel.select(0.05):
                c = key.data
                if c.sock is None or key.fileobj is not c.sock:
                    continue
                try:
                    if mask & selectors.EVENT_WRITE and c.state == "connecting":
                        on_writable(c)
                    elif mask & selectors.EVENT_READ:
                        on_readable(c)
                except OSError:
                    counts["connect_errors"] += 1
                    drop(c, backoff=True)
            now = mono()
            if now - last_sweep >= 0.01:
                last_sweep = now
                for c in clients:
                    if c.state == "backoff" and now - c.since >= 0.01:
                        start(c)
                    elif (c.state in ("connecting", "connack", "suback")
                          and now - c.since > step_timeout_s):
                        counts["timeouts"] += 1
                        drop(c)
    except Exception as exc:
        out.put(("error", name, f"{mode}: {exc!r}"))
        return
    elapsed = mono() - t0
    for c in clients:
        if c.sock is not None:
            c.sock.close()
    out.put(("done", name, {**counts, "clients": len(clients), "elapsed_s": round(elapsed, 3),
                            "cpu_s": round(loadgen._cpu_s() - cpu0, 3)}))
