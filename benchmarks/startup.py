"""Start-up with a persisted backlog (S8): how long until a restarted broker answers CONNECT.

    python -m benchmarks.startup                       # 1,000,000 queued msgs, 1,000 sessions
    python -m benchmarks.startup --quick               # 10,000 msgs, 100 sessions, 2 starts
    python -m benchmarks.startup --profile py-spy      # + one profiled start, summarised
    python -m benchmarks --scenarios S8                # the same, as a row of the runner's table

1. *Build* a data directory with the real store API (`SqliteStore.apply`): `--sessions`
   offline persistent sessions (MQTT 3.1.1, clean session 0, never expire), each subscribed at
   QoS 1 to `bench/startup/<client>/#`, and `--messages` QoS 1 messages spread evenly over
   them: one 100-byte body and one queued delivery per message, ids handed out round robin
   over the sessions (the order in which a broker would have received them). Built once and
   kept as a pristine copy; an empty store (opened and closed once) is built beside it.
2. *Start* `{python} -m edge_broker --data-dir DIR --port PORT` (log level info) on a fresh
   copy of that directory, `--runs` times. Figures per start, all from the runner's clock
   (`time.monotonic()` just before `Popen`):
   - `cpu_s_at_connack`: the broker's CPU time (user + sys from `/proc/PID/stat`) at the
     CONNACK, which other work sharing the cores barely changes (wall time on a loaded
     machine is mostly waiting for a core);
   - `connack_s`: until a CONNECT (clean session, probe client) gets its CONNACK; the probe
     retries every 5 ms while the port refuses (the broker listens only after the restore);
   - `restored_log_s`: until the log line "restored N sessions, M queued messages ..." arrived
     on the broker's stderr; the line's own "in X s" (store open + `core.restore`) is
     `restore_self_s`;
   - RSS (`VmRSS`) right after the CONNACK, the peak so far (`VmHWM`), and RSS after one
     session reconnected and drained its queue.
3. *Check* (correctness, not speed): after each start, one of the sessions reconnects with
   clean session 0, without subscribing again, and must receive exactly its queued messages,
   in order, with the right topic and payload (each payload carries its session and sequence
   number); it PUBACKs each one.
4. Python's bytecode cache is on for the broker (`_broker_env`; PYTHONDONTWRITEBYTECODE is
   removed, the cache goes to a directory of the run), and one unmeasured start on the
   empty store fills it before the measured ones: an installed broker has its bytecode.
5. The same starts on the empty store give the fixed cost (interpreter, imports, schema
   check, listeners): the difference is what the backlog costs.

`--cold-runs N` adds N starts after evicting the copied store from the page cache
(`posix_fadvise(DONTNEED)` on its files, nothing else is touched): closer to a gateway's
first start after a power cut, although on a VM the host may still cache the file.

`--profile py-spy` (or `cprofile`) runs one more start under the profiler and prints where the
start-up time goes: store open (`PRAGMA quick_check`, the clean-up queries, reading and decoding
rows) versus `core.restore` versus everything else (imports, listeners).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import brokers, wire

HERE = Path(__file__).resolve().parent
HOST = brokers.HOST
PAYLOAD_BYTES = 100
FULL = {"messages": 1_000_000, "sessions": 1_000, "runs": 5, "cold_runs": 2}
QUICK = {"messages": 10_000, "sessions": 100, "runs": 2, "cold_runs": 0}
TARGET_S = 1.0   # issue 8: <= 1 s with 1,000,000 queued messages
RESTORED_RE = re.compile(r"restored (\d+) sessions, (\d+) queued messages, (\d+) retained "
                         r"messages in ([0-9.]+) s")
STORE_FILE = "edge-broker.db"


def client_id(k: int) -> str:
    return f"startup-{k:05d}"


def topic_of(k: int) -> str:
    return f"bench/startup/{client_id(k)}/data"


def payload_of(session: int, seq: int) -> bytes:
    head = struct.pack(">II", session, seq)
    return head + b"x" * (PAYLOAD_BYTES - len(head))


# --------------------------------------------------------------------------- build


async def _build(data_dir: Path, messages: int, sessions: int) -> dict[str, Any]:
    from edge_broker.core.changes import (
        EXPIRY_NEVER,
        LogAppended,
        Message,
        ReaderCounted,
        ReaderOpened,
        SessionRecord,
        SessionSaved,
        SubscriptionRecord,
        SubscriptionSaved,
        reader_name,
    )
    from edge_broker.store.sqlite import SqliteStore

    data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(data_dir / STORE_FILE, durability="os")
    await store.open()
    now = time.time()
    try:
        head: list[Any] = []
        for k in range(sessions):
            head.append(SessionSaved(SessionRecord(client_id(k), 4, EXPIRY_NEVER, None,
                                                   disconnected_at=now - 60)))
            head.append(SubscriptionSaved(SubscriptionRecord(
                client_id(k), f"bench/startup/{client_id(k)}/#", 1)))
            # Offline since before the messages: its backlog is a reader of the log
            # (core/backlog.py), each message one log row.
            head.append(ReaderOpened(reader_name(client_id(k)), 0,
                                     ((f"bench/startup/{client_id(k)}/#", 0),)))
        if head:
            await store.apply(head)
        next_id = 1
        pending = []
        for seq in range(-(-messages // max(sessions, 1))):   # rounds of one message each
            batch: list[Any] = []
            for k in range(sessions):
                if next_id > messages:
                    break
                received = now - 30 + next_id * 1e-4
                batch.append(LogAppended(Message(next_id, topic_of(k), payload_of(k, seq), 1,
                                                 False, received_at=received,
                                                 origin="startup-publisher", offset=next_id)))
                next_id += 1
            pending.append(store.apply(batch))
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        per = [0] * sessions  # each session's own count of its backlog (the queue bounds')
        size = [0] * sessions
        for n in range(messages):
            per[n % sessions] += 1
            size[n % sessions] += len(payload_of(n % sessions, n // sessions))
        await store.apply([ReaderCounted(reader_name(client_id(k)), per[k], size[k], 0)
                           for k in range(sessions)])
        stats = await store.stats()
    finally:
        await store.close()
    return {"sessions": stats.sessions, "queued_messages": next_id - 1,
            "file_bytes": _db_bytes(data_dir)}


def _db_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob(STORE_FILE + "*")
               if not p.name.endswith(".ballast"))


def build(data_dir: Path, messages: int, sessions: int) -> dict[str, Any]:
    """Write the data directory (in this process, with the real store)."""
    if str(brokers.REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(brokers.REPO_ROOT))
    t0 = time.monotonic()
    info = asyncio.run(_build(data_dir, messages, sessions))
    info["build_s"] = round(time.monotonic() - t0, 2)
    return info


def _evict(data_dir: Path) -> None:
    """Drop the store's pages from the page cache (only these files)."""
    for p in data_dir.glob(STORE_FILE + "*"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- one start


class LogTail(threading.Thread):
    """Reads the broker's stderr, stamping each line with time.monotonic()."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    def first(self, pattern: re.Pattern[str] | str) -> tuple[float, re.Match[str]] | None:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        for t, line in list(self.lines):
            m = rx.search(line)
            if m:
                return t, m
        return None

    def text(self, n: int = 30) -> str:
        return "\n".join(line for _t, line in self.lines[-n:])


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, /proc/PID/stat utime + stime) the process has used so far:
    unlike wall time, barely affected by other work sharing the cores."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _probe(port: int, proc: subprocess.Popen, deadline: float) -> float:
    """Retry CONNECT until a CONNACK; returns time.monotonic() at the CONNACK."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode} during start-up")
        try:
            sock, _buf, _present = wire.open_session(HOST, port, "startup-probe",
                                                     timeout_s=max(0.1, deadline -
                                                                   time.monotonic()))
        except ConnectionRefusedError as exc:
            last = exc
            time.sleep(0.005)
            continue
        except (OSError, wire.ProtocolError) as exc:
            last = exc
            time.sleep(0.02)
            continue
        t = time.monotonic()
        with contextlib.suppress(OSError):
            sock.sendall(wire.DISCONNECT)
        sock.close()
        return t
    raise TimeoutError(f"no CONNACK before the deadline ({last!r})")


def resume_and_drain(port: int, session: int, expected: int,
                     timeout_s: float = 30.0) -> dict[str, Any]:
    """Reconnect one stored session (clean session 0, no SUBSCRIBE) and read its queue."""
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    sock, buf, present = wire.open_session(HOST, port, client_id(session), clean=False,
                                           timeout_s=timeout_s)
    topic = topic_of(session).encode()
    got: list[int] = []
    problems: list[str] = []
    try:
        sock.settimeout(0.2)
        quiet_since = None
        while time.monotonic() < deadline:
            frames, used = wire.split_frames(buf)
            acks = bytearray()
            for b0, s, e in frames:
                if b0 >> 4 != wire.PUBLISH:
                    problems.append(f"unexpected packet type {b0 >> 4}")
                    continue
                qos = (b0 >> 1) & 3
                tl = int.from_bytes(buf[s:s + 2], "big")
                t = bytes(buf[s + 2:s + 2 + tl])
                i = s + 2 + tl
                pid = None
                if qos:
                    pid = int.from_bytes(buf[i:i + 2], "big")
                    i += 2
                    acks += wire.puback(pid)
                body = bytes(buf[i:e])
                sess, seq = struct.unpack(">II", body[:8])
                if t != topic or sess != session or qos != 1 or body != payload_of(sess, seq):
                    problems.append(f"wrong message: topic {t!r} qos {qos} session {sess}")
                got.append(seq)
            del buf[:used]
            if acks:
                sock.sendall(acks)
            if len(got) >= expected:
                # All there: wait a little for anything extra (a duplicate would be a bug).
                if quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 0.3:
                    break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                problems.append("the broker closed the connection")
                break
            buf += chunk
        with contextlib.suppress(OSError):
            sock.sendall(wire.DISCONNECT)
    finally:
        sock.close()
    in_order = got == list(range(expected))
    return {"client_id": client_id(session), "session_present": present,
            "expected": expected, "received": len(got), "in_order": in_order,
            "drain_s": round(time.monotonic() - t0, 3), "problems": problems[:5],
            "ok": present and in_order and not problems}


def _command(data_dir: Path, port: int, edge_cmd: str | None, workdir: Path) -> list[str]:
    if edge_cmd is None:
        return [sys.executable, "-m", "edge_broker", "--data-dir", str(data_dir),
                "--port", str(port)]
    config = workdir / "edge-broker.toml"
    text = brokers.edge_config(port, data_dir, None).replace('level = "warning"',
                                                             'level = "info"')
    config.write_text(text)
    return brokers.edge_command(edge_cmd, port=port, config=config, data_dir=data_dir)


_PYCACHE: list[Path] = []


def _broker_env() -> dict[str, str]:
    """The broker's environment: the runner's, but with Python's bytecode cache on, kept in a
    directory of this run (PYTHONPYCACHEPREFIX: neither the checkout nor a venv is written
    to). An installed broker always has its bytecode (pip compiles it at install time, a
    checkout writes `__pycache__` on its first start); with PYTHONDONTWRITEBYTECODE=1 in the
    runner's environment, as on the agents' machines, every start of the checkout compiled
    all of its modules again, about as much CPU as the rest of the start-up. `measure`
    makes one unmeasured start first, which fills the cache."""
    if not _PYCACHE:
        root = Path(tempfile.mkdtemp(prefix="bench-startup-pycache-"))
        import atexit
        atexit.register(shutil.rmtree, root, True)
        _PYCACHE.append(root)
    env = brokers._edge_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(_PYCACHE[0])
    return env


def one_start(pristine: Path, *, check_session: int | None, expected: int, cold: bool = False,
              edge_cmd: str | None = None, profile: str | None = None,
              profile_out: Path | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """Copy `pristine`, start the broker on it, measure, check one session, stop."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    data_dir = workdir / "data"
    shutil.copytree(pristine, data_dir)
    if cold:
        _evict(data_dir)
    port = brokers.free_port()
    cmd = _command(data_dir, port, edge_cmd, workdir)
    if profile == "py-spy":
        cmd = ["py-spy", "record", "--format", "raw", "--rate", str(PYSPY_RATE_HZ), "--nonblocking",
               "-o", str(profile_out), "--", *cmd]
    elif profile == "cprofile":
        assert cmd[1:3] == ["-m", "edge_broker"], "cProfile needs the default command"
        cmd = [cmd[0], "-m", "cProfile", "-o", str(profile_out), *cmd[1:]]
    out: dict[str, Any] = {"cold": cold}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=workdir, env=_broker_env(),
                            start_new_session=True, preexec_fn=brokers.die_with_parent)
    tail = LogTail(proc.stderr)
    tail.start()
    broker_pid = proc.pid
    try:
        t_ready = _probe(port, proc, t0 + timeout_s)
        out["connack_s"] = round(t_ready - t0, 3)
        if profile == "py-spy":
            broker_pid = _child_pid(proc.pid) or proc.pid
        out["cpu_s_at_connack"] = _cpu_s(broker_pid)
        mem = _status_kb(broker_pid)
        out["rss_kb_after_start"] = mem.get("VmRSS")
        out["hwm_kb_after_start"] = mem.get("VmHWM")
        for _ in range(100):   # the log line is written before the listener opens
            if tail.first(RESTORED_RE) or tail.first("started"):
                break
            time.sleep(0.01)
        hit = tail.first(RESTORED_RE)
        if hit:
            t_log, m = hit
            out["restored_log_s"] = round(t_log - t0, 3)
            out["restored_sessions"] = int(m.group(1))
            out["restored_queued"] = int(m.group(2))
            out["restore_self_s"] = float(m.group(4))
        if check_session is not None:
            out["check"] = resume_and_drain(port, check_session, expected)
            time.sleep(0.2)
            mem = _status_kb(broker_pid)
            out["rss_kb_after_connect"] = mem.get("VmRSS")
            out["hwm_kb_end"] = mem.get("VmHWM")
    except Exception as exc:
        out["error"] = f"{exc.__class__.__name__}: {exc}\n{tail.text()}"
    finally:
        t_stop = time.monotonic()
        if proc.poll() is None:
            if profile == "py-spy" and broker_pid != proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(broker_pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30 if profile else 10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        out["stop_s"] = round(time.monotonic() - t_stop, 3)
        tail.join(timeout=2)
        out["exit_code"] = proc.returncode
        out["log_tail"] = tail.text(8)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _child_pid(pid: int) -> int | None:
    """The first child of `pid` (the broker under py-spy)."""
    for _ in range(200):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                kids = (task / "children").read_text().split()
                if kids:
                    return int(kids[0])
        time.sleep(0.01)
    return None


# --------------------------------------------------------------------------- the benchmark


class Pristine:
    """The built data directories, kept for the life of the process (S8 repeats reuse them)."""

    _cache: dict[tuple[int, int], tuple[Path, Path, dict[str, Any]]] = {}

    @classmethod
    def get(cls, messages: int, sessions: int) -> tuple[Path, Path, dict[str, Any]]:
        key = (messages, sessions)
        if key not in cls._cache:
            root = Path(tempfile.mkdtemp(prefix="bench-startup-pristine-"))
            import atexit
            atexit.register(shutil.rmtree, root, True)
            full = root / "backlog"
            info = build(full, messages, sessions)
            empty = root / "empty"
            build(empty, 0, 0)
            cls._cache[key] = (full, empty, info)
        return cls._cache[key]


def measure(*, messages: int, sessions: int, runs: int, cold_runs: int = 0,
            empty_runs: int | None = None, edge_cmd: str | None = None,
            log: Any = None) -> dict[str, Any]:
    """Build (once per process), start `runs` (+ `cold_runs`) times on the backlog and
    `empty_runs` times on an empty store; medians and every start's details."""
    say = log or (lambda *_a: None)
    sessions = max(1, sessions)
    per_session = messages // sessions
    messages = per_session * sessions
    say(f"building a store with {messages:,} queued messages in {sessions:,} sessions ...")
    full, empty, info = Pristine.get(messages, sessions)
    say(f"  built in {info['build_s']:.1f} s: {info['file_bytes'] / 1e6:.1f} MB, "
        f"{info['queued_messages']:,} queued in {info['sessions']:,} sessions")
    starts: list[dict[str, Any]] = []
    empties: list[dict[str, Any]] = []
    n_empty = runs if empty_runs is None else empty_runs
    plan = ([("empty", False)] * n_empty + [("backlog", False)] * runs
            + [("backlog", True)] * cold_runs)
    # Interleave: empty, backlog, empty, backlog, ... then the cold starts.
    order = []
    e_runs = [p for p in plan if p[0] == "empty"]
    b_runs = [p for p in plan if p[0] == "backlog" and not p[1]]
    for k in range(max(len(e_runs), len(b_runs))):
        order += e_runs[k:k + 1] + b_runs[k:k + 1]
    order += [p for p in plan if p[1]]
    # Unmeasured: fills the bytecode cache (_broker_env) and the page cache of the code.
    warmup = one_start(empty, check_session=None, expected=0, edge_cmd=edge_cmd)
    say("  warm-up start (not counted): " + _line(warmup))
    for k, (what, cold) in enumerate(order):
        session = (k * 7919) % sessions if what == "backlog" else None
        r = one_start(full if what == "backlog" else empty, check_session=session,
                      expected=per_session, cold=cold, edge_cmd=edge_cmd)
        (starts if what == "backlog" else empties).append(r)
        say(f"  {what}{' (cold cache)' if cold else ''}: " + _line(r))
    warm = [r for r in starts if not r["cold"]]
    cold_l = [r for r in starts if r["cold"]]
    summary = {
        "messages": messages, "sessions": sessions, "per_session": per_session,
        "payload_bytes": PAYLOAD_BYTES, "build": info,
        "connack_s": _median(warm, "connack_s"),
        "connack_s_min": _pick(min, warm, "connack_s"),
        "connack_s_max": _pick(max, warm, "connack_s"),
        "connack_s_cold": _median(cold_l, "connack_s"),
        "cpu_s_at_connack": _median(warm, "cpu_s_at_connack"),
        "cpu_s_at_connack_cold": _median(cold_l, "cpu_s_at_connack"),
        "empty_cpu_s_at_connack": _median(empties, "cpu_s_at_connack"),
        "restored_log_s": _median(warm, "restored_log_s"),
        "restore_self_s": _median(warm, "restore_self_s"),
        "empty_connack_s": _median(empties, "connack_s"),
        "rss_kb_after_start": _median(warm, "rss_kb_after_start"),
        "hwm_kb_after_start": _median(warm, "hwm_kb_after_start"),
        "rss_kb_after_connect": _median(warm, "rss_kb_after_connect"),
        "empty_rss_kb_after_start": _median(empties, "rss_kb_after_start"),
        "stop_s": _median(warm, "stop_s"),
        "bytecode_cache": "warm (PYTHONPYCACHEPREFIX, one unmeasured start first)",
        "starts": starts, "empty_starts": empties, "warmup_start": warmup,
    }
    checks = []
    for k, r in enumerate(starts + empties):
        what = "backlog" if k < len(starts) else "empty store"
        if "error" in r:
            checks.append((f"S8 start {k + 1} ({what})", False, r["error"].splitlines()[0]))
            continue
        if what == "backlog":
            c = r.get("check", {})
            restored = (r.get("restored_sessions"), r.get("restored_queued"))
            checks.append((f"S8 start {k + 1} restored", restored == (sessions, messages),
                           f"log: restored {restored[0]} sessions, {restored[1]} queued "
                           f"(expected {sessions}, {messages})"))
            checks.append((f"S8 start {k + 1} resumed session", bool(c.get("ok")),
                           f"{c.get('client_id')}: {c.get('received')}/{c.get('expected')} "
                           f"received, in order {c.get('in_order')}, session present "
                           f"{c.get('session_present')}"
                           + (f", {c['problems']}" if c.get("problems") else "")))
        else:
            checks.append((f"S8 start {k + 1} (empty store)", "connack_s" in r,
                           f"CONNACK after {r.get('connack_s')} s"))
    summary["checks"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]
    return summary


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _pick(fn: Any, rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return fn(vals) if vals else None


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"].splitlines()[0]
    parts = [f"CONNACK {r['connack_s']:.2f} s"]
    if r.get("cpu_s_at_connack") is not None:
        parts.append(f"CPU {r['cpu_s_at_connack']:.2f} s")
    if r.get("restored_log_s") is not None:
        parts.append(f"restored line {r['restored_log_s']:.2f} s "
                     f"(self-reported {r['restore_self_s']:.2f} s)")
    parts.append(f"RSS {r['rss_kb_after_start'] / 1024:.1f} MB "
                 f"(peak {r['hwm_kb_after_start'] / 1024:.1f})")
    c = r.get("check")
    if c:
        parts.append(f"RSS after a connect {r['rss_kb_after_connect'] / 1024:.1f} MB; "
                     f"{c['client_id']} got {c['received']}/{c['expected']}"
                     f"{'' if c['ok'] else ' CHECK FAILED'}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- profile


def profile_start(pristine: Path, mode: str, out: Path, expected: int, sessions: int,
                  edge_cmd: str | None = None) -> dict[str, Any]:
    r = one_start(pristine, check_session=None, expected=expected, edge_cmd=edge_cmd,
                  profile=mode, profile_out=out)
    r["profile_file"] = str(out)
    if mode == "py-spy" and out.exists():
        r["profile"] = summarise_pyspy(out)
    elif mode == "cprofile" and out.exists():
        r["profile"] = summarise_cprofile(out)
    return r


def summarise_pyspy(path: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks (py-spy --format raw) -> samples by phase, by leaf frame, and by line
    of the store's open / the core's restore. Idle threads are not sampled (py-spy's
    default), so the store thread's work and the main thread's are both counted."""
    stacks: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks[stack] += int(n)
    total = sum(stacks.values())
    phases: Counter[str] = Counter()
    details: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")
        leaves[frames[-1]] += n
        phase, detail = _phase(frames)
        phases[phase] += n
        if detail:
            details[f"{phase}: {detail}"] += n
    return {"samples": total, "rate_hz": PYSPY_RATE_HZ,
            "phases": dict(phases.most_common()),
            "details": details.most_common(top),
            "top_self": leaves.most_common(top)}


PYSPY_RATE_HZ = 250
_FRAME_RE = re.compile(r"^(?P<fn>.*) \((?P<file>[^:]*):(?P<line>\d+)\)$")
_SOURCE: dict[str, list[str]] = {}


def _source_line(file: str, line: int) -> str:
    if file not in _SOURCE:
        try:
            _SOURCE[file] = (brokers.REPO_ROOT / file).read_text().splitlines()
        except OSError:
            _SOURCE[file] = []
    lines = _SOURCE[file]
    return lines[line - 1].strip() if 0 < line <= len(lines) else "?"


def _where(frame: str) -> tuple[str, str, int]:
    m = _FRAME_RE.match(frame)
    if not m:
        return frame, "", 0
    return m["fn"], m["file"], int(m["line"])


def summarise_stacks(path: Path, rate_hz: int, top: int = 20) -> dict[str, Any]:
    """Any py-spy raw profile: busiest leaf frames and edge_broker functions (inclusive)."""
    stacks: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks[stack] += int(n)
    total = sum(stacks.values())
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = [_where(f) for f in stack.split(";")]
        fn, file, line = frames[-1]
        leaves[f"{fn} ({file}:{line})"] += n
        for name in {f"{f[0]} ({f[1]})" for f in frames if f[1].startswith("edge_broker/")}:
            inclusive[name] += n
    return {"samples": total, "rate_hz": rate_hz, "seconds": round(total / rate_hz, 2),
            "top_self": leaves.most_common(top), "top_inclusive": inclusive.most_common(top)}


def _phase(frames: list[str]) -> tuple[str, str]:
    """(phase, detail): which part of the start a stack belongs to, and the source line
    (of the store's open, the snapshot query, or the core's restore) it was in."""
    parsed = [_where(f) for f in frames]
    fns = [p[0].rsplit(".", 1)[-1] for p in parsed]

    def at(name: str) -> int | None:
        return next((i for i, f in enumerate(fns) if f == name), None)

    i_open = at("_open_sync")
    if i_open is not None:
        i_load = at("_load_snapshot")
        if i_load is not None:
            _fn, file, line = parsed[i_load]
            deeper = [f for f in fns[i_load + 1:] if f.startswith(("_message", "_delivery_",
                                                                   "_session_", "_subscr",
                                                                   "_decode"))]
            what = f"decode rows ({deeper[0]})" if deeper else "SQLite step / row tuples"
            return "store.open: _load_snapshot", f"{_source_line(file, line)} -> {what}"
        _fn, file, line = parsed[i_open]
        return "store.open: checks and clean-up queries", _source_line(file, line)
    i_restore = next((i for i, (fn, file, _l) in enumerate(parsed)
                      if fn.endswith("restore") and file.endswith("core/broker.py")), None)
    if i_restore is not None:
        _fn, file, line = parsed[i_restore]
        deeper = [p for p in parsed[i_restore + 1:] if p[1].startswith("edge_broker/")]
        tail = f" -> {deeper[0][0]}" if deeper else ""
        return "core.restore", _source_line(file, line) + tail
    if "_find_and_load" in fns:
        return "imports", ""
    if "_make_ballast" in fns:
        return "store.open: ballast file", ""
    ours = [p for p in parsed if p[1].startswith("edge_broker/")]
    where = f"{ours[-1][0]} ({ours[-1][1]}:{ours[-1][2]})" if ours else fns[-1]
    return "other", where


def summarise_cprofile(path: Path, top: int = 25) -> dict[str, Any]:
    import pstats
    st = pstats.Stats(str(path))
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{fn} ({Path(file).name}:{line})", nc, round(tt, 3), round(ct, 3)))
    by_ct = sorted(rows, key=lambda r: -r[3])[:top]
    by_tt = sorted(rows, key=lambda r: -r[2])[:top]
    return {"top_cumulative": by_ct, "top_self": by_tt}


def render_profile(p: dict[str, Any]) -> str:
    lines = []
    if "phases" in p:
        total = p["samples"] or 1
        hz = p["rate_hz"]
        lines.append(f"py-spy: {p['samples']} samples at {hz} Hz (busy threads only)")
        for k, v in p["phases"].items():
            lines.append(f"  {100 * v / total:5.1f} %  {v / hz:5.2f} s  {k}")
        lines.append("by source line:")
        for k, v in p["details"][:14]:
            lines.append(f"  {100 * v / total:5.1f} %  {v / hz:5.2f} s  {k}")
    else:
        lines.append("cProfile, by cumulative time:")
        for name, nc, tt, ct in p["top_cumulative"]:
            lines.append(f"  {ct:8.3f} s cum  {tt:8.3f} s self  {nc:>9} calls  {name}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def render_table(s: dict[str, Any]) -> str:
    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v / 1024:.1f} MB"

    rows = [
        ("process start -> CONNACK, backlog (median)", sec(s["connack_s"]),
         f"min {sec(s['connack_s_min'])}, max {sec(s['connack_s_max'])}"),
        ("process start -> CONNACK, backlog, cold page cache", sec(s["connack_s_cold"]), ""),
        ("broker CPU (user+sys) at CONNACK, backlog", sec(s.get("cpu_s_at_connack")),
         f"cold {sec(s.get('cpu_s_at_connack_cold'))}, "
         f"empty store {sec(s.get('empty_cpu_s_at_connack'))}"),
        ("process start -> 'restored ...' log line", sec(s["restored_log_s"]), ""),
        ("store open + core.restore (broker's own figure)", sec(s["restore_self_s"]), ""),
        ("process start -> CONNACK, empty store", sec(s["empty_connack_s"]),
         "interpreter, imports, listeners"),
        ("RSS right after start-up, backlog", mb(s["rss_kb_after_start"]),
         f"peak so far {mb(s['hwm_kb_after_start'])}"),
        ("RSS after one session reconnected and drained", mb(s["rss_kb_after_connect"]), ""),
        ("RSS right after start-up, empty store", mb(s["empty_rss_kb_after_start"]), ""),
        ("SIGTERM -> exit, backlog", sec(s["stop_s"]), ""),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a.ljust(w0)}  {b.rjust(w1)}  {c}".rstrip() for a, b, c in rows)


def render_md(s: dict[str, Any], target_s: float = TARGET_S) -> list[str]:
    """The "Start-up" section of RESULTS.md."""
    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v / 1024:.1f}"

    b = s["build"]
    warm = [r for r in s["starts"] if not r.get("cold")]
    lines = [
        f"{s['messages']:,} queued QoS 1 messages ({s['payload_bytes']}-byte payloads, one "
        f"body and one delivery each) in {s['sessions']:,} offline persistent sessions "
        f"({s['per_session']} each); store file {b['file_bytes'] / 1e6:.1f} MB, written with "
        "`SqliteStore.apply`. Each start runs `python -m edge_broker --data-dir COPY --port "
        "PORT` on a fresh copy of that directory (page cache warm unless noted), with Python's "
        "bytecode cache on and filled by one unmeasured start (as for any installed broker). "
        "Times are from process start (`Popen`); the broker's CPU time (user + sys, "
        "`/proc/PID/stat`) is read at the CONNACK. Median of "
        f"{len(warm)} start(s); every start is in the JSON (`scenarios.S8.edge.details`).",
        "",
        "| Figure | Value |",
        "|---|---:|",
        f"| process start -> CONNACK, with the backlog (s) | {sec(s['connack_s'])} "
        f"(min {sec(s['connack_s_min'])}, max {sec(s['connack_s_max'])}) |",
        f"| the same, store evicted from the page cache first (s) | {sec(s['connack_s_cold'])} |",
        f"| broker CPU time (user+sys) at the CONNACK, with the backlog (s) | "
        f"{sec(s.get('cpu_s_at_connack'))} (cold {sec(s.get('cpu_s_at_connack_cold'))}, "
        f"empty store {sec(s.get('empty_cpu_s_at_connack'))}) |",
        f"| process start -> log line \"restored ...\" (s) | {sec(s['restored_log_s'])} |",
        f"| store open + `core.restore`, as the broker logs it (s) | "
        f"{sec(s['restore_self_s'])} |",
        f"| process start -> CONNACK, empty store (s) | {sec(s['empty_connack_s'])} |",
        f"| RSS right after start-up, with the backlog (MB) | {mb(s['rss_kb_after_start'])} "
        f"(peak {mb(s['hwm_kb_after_start'])}) |",
        f"| RSS after one session reconnected and got its {s['per_session']} messages (MB) | "
        f"{mb(s['rss_kb_after_connect'])} |",
        f"| RSS right after start-up, empty store (MB) | {mb(s['empty_rss_kb_after_start'])} |",
        f"| SIGTERM -> exit, with the backlog (s) | {sec(s['stop_s'])} |",
        "",
    ]
    ok = all(c["ok"] for c in s["checks"])
    lines.append(f"Correctness: after every start one session reconnected (clean session 0, no "
                 f"new SUBSCRIBE) and received its {s['per_session']} queued messages in order: "
                 + ("yes, every start." if ok else "**NO** (see Failures)."))
    if s["connack_s"] is not None:
        verdict = "met" if s["connack_s"] <= target_s else "not met"
        lines.append(f"Target start-up <= {target_s:g} s: {verdict} ({s['connack_s']:.2f} s).")
    prof = s.get("profile", {}).get("profile")
    if prof:
        lines += ["", "Profile of one start (`python -m benchmarks.startup --profile py-spy`):",
                  "", "```", render_profile(prof), "```"]
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 messages, 100 sessions, "
                    "2 starts: a smoke test (exit 1 on a failed check)")
    ap.add_argument("--messages", type=int, help="queued messages in all (default 1,000,000)")
    ap.add_argument("--sessions", type=int, help="offline sessions (default 1,000)")
    ap.add_argument("--runs", type=int, help="starts on the backlog (and on the empty store)")
    ap.add_argument("--cold-runs", type=int, help="extra starts after evicting the store "
                    "from the page cache (default 2, --quick 0)")
    ap.add_argument("--edge-cmd", help="launch template as in `python -m benchmarks` "
                    "(default: the flag form `{python} -m edge_broker --data-dir ... --port ...`)")
    ap.add_argument("--profile", choices=["py-spy", "cprofile"],
                    help="one more start under the profiler; prints where the time goes")
    ap.add_argument("--json", type=Path, help="default results/startup.json "
                    "(--quick: results/startup-quick.json)")
    args = ap.parse_args(argv)
    d = QUICK if args.quick else FULL
    messages = args.messages if args.messages is not None else d["messages"]
    sessions = args.sessions if args.sessions is not None else d["sessions"]
    runs = args.runs if args.runs is not None else d["runs"]
    cold = args.cold_runs if args.cold_runs is not None else d["cold_runs"]
    load1 = os.getloadavg()[0]
    print(f"edge-broker start-up benchmark; 1-min load average {load1:.2f}"
          + ("" if load1 <= 0.5 else " (machine busy: figures will be noisy)"))
    s = measure(messages=messages, sessions=sessions, runs=runs, cold_runs=cold,
                edge_cmd=args.edge_cmd, log=lambda m: print(m, flush=True))
    s["loadavg_1min_at_start"] = round(load1, 2)
    if args.profile:
        full, _e, _i = Pristine.get(s["messages"], s["sessions"])
        out = HERE / "results" / ("startup-profile.txt" if args.profile == "py-spy"
                                  else "startup-profile.prof")
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"profiling one start with {args.profile} -> {out} ...", flush=True)
        s["profile"] = profile_start(full, args.profile, out, s["per_session"],
                                     s["sessions"], args.edge_cmd)
        p = s["profile"]
        if "error" in p:
            print("  profiled start failed: " + p["error"].splitlines()[0])
        else:
            print(f"  (under the profiler: CONNACK after {p.get('connack_s')} s)")
        if p.get("profile"):
            print(render_profile(p["profile"]))
    print()
    print(render_table(s))
    failed = [c for c in s["checks"] if not c["ok"]]
    if s["connack_s"] is not None:
        verdict = "met" if s["connack_s"] <= TARGET_S else "NOT met"
        print(f"\ntarget start-up <= {TARGET_S:g} s with the backlog: {verdict} "
              f"({s['connack_s']:.2f} s median)" + (" [quick mode: sizes are not the "
                                                     "target's]" if args.quick else ""))
    json_path = args.json or HERE / "results" / ("startup-quick.json" if args.quick
                                                 else "startup.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(s, indent=1, default=str) + "\n")
    print(f"wrote {json_path}")
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(f"{c['name']}: {c['detail']}" for c in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
