"""Start and stop the brokers under test: edge-broker, mosquitto, amqtt.

Each start gets a free loopback port (bind port 0), a fresh temp directory holding the config
file and the broker's log, and is stopped (SIGTERM, then SIGKILL) by the runner. Optional
`pin_cpu` prefixes the command with `taskset -c N` (taskset execs, so the PID is the broker's).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import security, wire
from .security import Security

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# Settings written into the mosquitto config; recorded in the results.
MOSQUITTO_SETTINGS = {
    "persistence": "false",
    "max_inflight_messages": 100,        # = the load generator's QoS 1 window
    "max_queued_messages": 1_000_000,    # >= S4's per-session backlog
    "max_queued_bytes": 0,               # unlimited
    "max_connections": -1,
    "set_tcp_nodelay": "false",          # mosquitto's default; S6, S10 use true (below)
}
# Nagle (set_tcp_nodelay false) batches mosquitto's per-packet writes: ~1.5x the QoS 0
# throughput of nodelay true here, but ~40 ms on the QoS 0 p99 at 10k msgs/s. Each scenario gets
# mosquitto's better setting: false for throughput (S1-S5, S7), true for latency (S6, S10).
MOSQUITTO_LATENCY_SETTINGS = {"set_tcp_nodelay": "true"}

# The edge-broker command; placeholders are filled by `edge_command`.
EDGE_DEFAULT_CMD = "{python} -m edge_broker run --config {config}"
EDGE_FLAGS_CMD = "{python} -m edge_broker --host {host} --port {port} --data-dir {data_dir}"

INSTALL_HINT = {
    "mosquitto": "sudo apt-get install mosquitto",
    "amqtt": "pip install amqtt",
    "edge": "pip install -e . (from the repository root)",
}


class BrokerUnavailable(Exception):
    """The broker is not installed: its column is skipped."""


class BrokerStartError(Exception):
    """The broker is installed but did not come up."""


def die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this process when the runner dies,
    even by SIGKILL (a timed-out CI job), so no broker outlives its benchmark. Linux only;
    mosquitto loses it when it drops root privileges (the runner's SIGTERM handler and
    RunningBroker.stop cover the ordinary cases)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningBroker:
    name: str
    proc: subprocess.Popen
    port: int
    workdir: Path
    command: list[str]
    config_path: Path | None
    settings: dict = field(default_factory=dict)
    host: str = HOST
    data_dir: Path | None = None   # edge-broker's (its admin socket lives there)
    # What a client needs against this broker (S11-S13, security.py): the CA to verify its
    # TLS listener (None: plain TCP) and the password of the user `bench` (None: anonymous).
    cafile: str | None = None
    password: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = (self.workdir / "broker.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- discovery/versions


def mosquitto_path() -> str | None:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def amqtt_path() -> str | None:
    beside = Path(sys.executable).parent / "amqtt"
    if beside.exists():
        return str(beside)
    return shutil.which("amqtt")


def edge_available() -> bool:
    import importlib.util
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.util.find_spec("edge_broker.__main__") is not None
    except (ImportError, ValueError):
        return False


def available(name: str, edge_cmd: str | None = None) -> str | None:
    """None if usable, else the reason (with the install command)."""
    if name == "mosquitto" and not mosquitto_path():
        return f"mosquitto not found: install it with `{INSTALL_HINT['mosquitto']}`"
    if name == "amqtt" and not amqtt_path():
        return f"amqtt not found: install it with `{INSTALL_HINT['amqtt']}`"
    if name == "edge" and edge_cmd is None and not edge_available():
        return ("edge_broker is not runnable yet (no edge_broker/__main__.py); "
                f"`{INSTALL_HINT['edge']}` once it exists, or pass --edge-cmd")
    return None


def version(name: str) -> str:
    try:
        if name == "mosquitto":
            path = mosquitto_path()
            if not path:
                return "absent"
            r = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=10)
            first = (r.stdout or r.stderr).splitlines()[0]
            return first.replace("mosquitto version ", "").strip()
        if name == "amqtt":
            path = amqtt_path()
            if not path:
                return "absent"
            r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            return r.stdout.strip() or "unknown"
        if name == "edge":
            r = subprocess.run(
                [sys.executable, "-c",
                 "import importlib.metadata as m, edge_broker as e\n"
                 "v = getattr(e, '__version__', None)\n"
                 "try:\n    v = v or m.version('edge-broker')\n"
                 "except m.PackageNotFoundError:\n    pass\n"
                 "print(v or '')"],
                capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
                env=_edge_env())
            v = r.stdout.strip()
            if not v:
                import tomllib
                v = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
                    "version"] + " (source tree)"
            rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            return f"{v} {rev}".strip()
    except Exception as exc:  # versions are informative only
        return f"unknown ({exc.__class__.__name__})"
    return "unknown"


# --------------------------------------------------------------------------- configs


def mosquitto_config(port: int, workdir: Path, *, latency: bool = False,
                     sec: Security | None = None) -> str:
    s = {**MOSQUITTO_SETTINGS, **(MOSQUITTO_LATENCY_SETTINGS if latency else {})}
    return "\n".join([
        "# written by benchmarks/brokers.py",
        "per_listener_settings false",
        f"listener {port} {HOST}",
        *security.mosquitto_lines(sec),
        f"persistence {s['persistence']}",
        f"max_inflight_messages {s['max_inflight_messages']}",
        f"max_queued_messages {s['max_queued_messages']}",
        f"max_queued_bytes {s['max_queued_bytes']}",
        f"max_connections {s['max_connections']}",
        f"set_tcp_nodelay {s['set_tcp_nodelay']}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "",
    ])


def amqtt_config(port: int) -> str:
    # No logging or $SYS plugins (amqtt's best case). allow_anonymous false + the load
    # generator's username: amqtt keeps offline QoS 1 messages only for non-anonymous sessions.
    return "\n".join([
        "# written by benchmarks/brokers.py",
        "listeners:",
        "  default:",
        "    type: tcp",
        f"    bind: {HOST}:{port}",
        "    max_connections: 0",
        "plugins:",
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:",
        "    allow_anonymous: false",
        "",
    ])


def edge_config(port: int, data_dir: Path, durability: str | None,
                persistence: str | None = None, sec: Security | None = None) -> str:
    """edge-broker's TOML (schema: edge_broker/config/schema.py). The [mqtt] limits mirror the
    mosquitto settings above, so both brokers run with the same windows and queue bounds."""
    s = MOSQUITTO_SETTINGS
    lines = [
        "# written by benchmarks/brokers.py",
        "[broker]",
        f"data_dir = {_toml_str(str(data_dir))}",
        "",
        "[[listeners]]",
        f'host = "{HOST}"',
        f"port = {port}",
        *security.edge_listener_lines(sec),
        "",
        "[auth]",
        *security.edge_auth_lines(sec),
        "",
        "[mqtt]",
        f"max_inflight_messages = {s['max_inflight_messages']}",
        f"max_queued_messages = {s['max_queued_messages']}",
        f"max_queued_bytes = {s['max_queued_bytes']}",
        "",
        "[storage]",
    ]
    if persistence:
        lines.append(f'persistence = "{persistence}"')
    if durability:
        lines.append(f'durability = "{durability}"')
    lines += ["", "[log]", 'level = "warning"', ""]
    return "\n".join(lines)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _edge_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def edge_command(template: str, *, port: int, config: Path, data_dir: Path) -> list[str]:
    text = template.format(python=shlex.quote(sys.executable), host=HOST, port=port,
                           config=shlex.quote(str(config)),
                           data_dir=shlex.quote(str(data_dir)))
    return shlex.split(text)


# --------------------------------------------------------------------------- start


def _wait_ready(rb: RunningBroker, timeout_s: float) -> None:
    """Ready = an MQTT CONNECT gets a CONNACK (not just an open port)."""
    deadline = time.monotonic() + timeout_s
    last = None
    tls = security.client_context(rb.cafile)
    while time.monotonic() < deadline:
        if rb.proc.poll() is not None:
            raise BrokerStartError(f"{rb.name} exited with {rb.proc.returncode} during start-up:"
                                   f"\n{rb.log_tail()}")
        try:
            sock, _, _ = wire.open_session(rb.host, rb.port, "bench-probe", timeout_s=2.0,
                                           tls=tls, password=rb.password)
            sock.sendall(wire.DISCONNECT)
            sock.close()
            return
        except (OSError, wire.ProtocolError, TimeoutError) as exc:
            last = exc
            time.sleep(0.05)
    raise BrokerStartError(f"{rb.name} not ready after {timeout_s:.0f}s ({last!r}):\n"
                           f"{rb.log_tail()}")


def start(name: str, *, pin_cpu: int | None = None, edge_cmd: str | None = None,
          edge_durability: str | None = None, edge_persistence: str | None = None,
          latency: bool = False, ready_timeout_s: float = 20.0,
          sec: Security | None = None, extra_config: str = "") -> RunningBroker:
    """Start `name` on a free port and wait until it answers CONNECT. `latency` = the
    scenario measures latency (mosquitto then gets set_tcp_nodelay true). `sec`: a TLS
    listener and/or the password file and ACL (S11-S13; edge-broker and mosquitto only).
    `extra_config` is appended to mosquitto's or edge-broker's configuration file (S14:
    a bridge)."""
    why = available(name, edge_cmd)
    if why:
        raise BrokerUnavailable(why)
    if sec is not None and sec.active and name == "amqtt":
        raise BrokerUnavailable("the TLS/ACL scenarios compare edge-broker and mosquitto only")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    port = free_port()
    env = dict(os.environ)
    cwd = workdir
    settings: dict = {}
    config_path: Path | None
    if name == "mosquitto":
        config_path = workdir / "mosquitto.conf"
        config_path.write_text(mosquitto_config(port, workdir, latency=latency, sec=sec)
                               + "\n" + extra_config)
        cmd = [mosquitto_path() or "mosquitto", "-c", str(config_path)]
        settings = dict(MOSQUITTO_SETTINGS)
        settings["set_tcp_nodelay"] = "false (S6, S10: true)"
    elif name == "amqtt":
        config_path = workdir / "amqtt.yaml"
        config_path.write_text(amqtt_config(port))
        cmd = [amqtt_path() or "amqtt", "-c", str(config_path)]
        settings = {"plugins": "AnonymousAuthPlugin only (allow_anonymous false, username sent)",
                    "max_inflight/max_queued": "n/a (amqtt has no such limits)"}
    elif name == "edge":
        data_dir = workdir / "data"
        data_dir.mkdir()
        config_path = workdir / "edge-broker.toml"
        config_path.write_text(edge_config(port, data_dir, edge_durability, edge_persistence,
                                           sec) + "\n" + extra_config)
        cmd = edge_command(edge_cmd or EDGE_DEFAULT_CMD, port=port, config=config_path,
                           data_dir=data_dir)
        env = _edge_env()
        settings = {"persistence": edge_persistence or "(edge-broker default)",
                    "durability": edge_durability or "(edge-broker default)",
                    **{k: MOSQUITTO_SETTINGS[k] for k in (
                        "max_inflight_messages", "max_queued_messages", "max_queued_bytes")},
                    "command": " ".join(cmd)}
    else:
        raise ValueError(f"unknown broker {name!r}")
    if pin_cpu is not None:
        cmd = ["taskset", "-c", str(pin_cpu), *cmd]
        settings["pinned_cpu"] = pin_cpu
    log = open(workdir / "broker.log", "wb")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=cwd, env=env, start_new_session=True,
                            preexec_fn=die_with_parent)  # the runner has no threads
    log.close()
    if sec is not None and sec.active:
        settings.update(security.settings(sec))
    rb = RunningBroker(name, proc, port, workdir, cmd, config_path, settings,
                       data_dir=workdir / "data" if name == "edge" else None,
                       **security.client_side(sec))
    try:
        _wait_ready(rb, ready_timeout_s)
    except BrokerStartError:
        tail = rb.log_tail()
        rb.stop()
        if name == "edge" and edge_cmd is None and not (sec is not None and sec.active):
            # Fallback while the config schema settles: the flag form the CLI also accepts.
            return _start_edge_flags(pin_cpu, edge_durability, ready_timeout_s, tail)
        raise
    return rb


def _start_edge_flags(pin_cpu: int | None, durability: str | None, ready_timeout_s: float,
                      first_error: str) -> RunningBroker:
    print(f"  edge-broker did not start with `{EDGE_DEFAULT_CMD}`; trying `{EDGE_FLAGS_CMD}`"
          + (" (durability not passed)" if durability else ""), file=sys.stderr)
    try:
        rb = start("edge", pin_cpu=pin_cpu, edge_cmd=EDGE_FLAGS_CMD,
                   ready_timeout_s=ready_timeout_s)
    except BrokerStartError as exc:
        raise BrokerStartError(f"edge-broker did not start either way.\nconfig form:\n"
                               f"{first_error}\nflag form:\n{exc}") from None
    rb.settings["durability"] = "(not passed: flag form)"
    return rb


def edge_store_stats(data_dir: Path, timeout_s: float = 60.0) -> dict:
    """`edge-broker store --data-dir DIR --json stats`: the running broker answers over its
    admin socket (`DIR/admin.sock`); `["store"]` holds the store's counters since it started
    (commits, fsyncs, batches, changes_written, rows_written, file_bytes, ...)."""
    cmd = [sys.executable, "-m", "edge_broker", "store", "--data-dir", str(data_dir), "--json",
           "stats"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                       cwd=data_dir.parent, env=_edge_env(), stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited with {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    stats: dict = json.loads(r.stdout)["stats"]
    return stats


# --------------------------------------------------------------------------- /proc readings


CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def stat_times(path: str) -> tuple[str, int, int]:
    """(name, utime, stime in clock ticks) from a /proc stat file: `/proc/PID/stat` (the
    process, threads included) or `/proc/PID/task/TID/stat` (one thread). Raises OSError
    when it is gone."""
    raw = Path(path).read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return raw[raw.index("(") + 1:raw.rindex(")")], int(fields[11]), int(fields[12])


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process (threads included), in clock ticks."""
    _name, user, system = stat_times(f"/proc/{pid}/stat")
    return user + system


def wait_quiet(pid: int, *, below_pct: float = 15.0, window_s: float = 0.5,
               timeout_s: float = 30.0) -> float:
    """Wait until the broker's CPU stays under `below_pct` for `window_s` (it has finished the
    previous run's backlog). Returns the seconds waited; gives up quietly at `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        meter = CpuMeter(pid)
        time.sleep(window_s)
        if meter.percent() < below_pct:
            break
    return time.monotonic() - t0


class CpuMeter:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.c0 = cpu_ticks(pid)

    def percent(self) -> float:
        dt = time.monotonic() - self.t0
        return 100.0 * (cpu_ticks(self.pid) - self.c0) / CLK_TCK / dt if dt > 0 else 0.0
