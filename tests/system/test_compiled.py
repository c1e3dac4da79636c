"""The compiled build (mypyc, docs/compiled.md) behaves as the pure-Python package.

The rest of the suite runs the checkout, pure Python (`pip install -e`). Here a wheel is built
with EDGE_BROKER_COMPILE=1 from a copy of the checkout, installed into a fresh venv, and a
representative subset of the tests (codec, connection and core unit tests, the router
properties, integration tests of the server and the stores through the broker in-process and
as a real `edge-broker` process, the bridge forwarder) runs against it from a copy of tests/,
so that the checkout cannot shadow the installed package. One more test runs the compiled
venv's `edge-broker` process itself through publish/subscribe, QoS 1 and a persistent session
across a restart, and checks from /proc that the process runs the compiled server and log.
Without a C compiler or the Python headers those tests are skipped, naming the apt command;
the fallback to pure Python is tested everywhere.

The wheel and its venv are cached, keyed by a hash of everything that goes into the wheel, in
$EDGE_BROKER_TEST_CACHE (default ~/.cache/edge-broker/test-compiled); building them takes
about 5 minutes on a 2-core machine (docs/compiled.md), a cached run about 2 minutes.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from tests.integration.rawclient import PUBACK, PUBLISH, connect

REPO = Path(__file__).resolve().parents[2]
# What goes into the wheel (and so into the cache key).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "build_support",
                "edge_broker")
TEST_PACKAGES = ("pytest", "pytest-asyncio", "hypothesis", "paho-mqtt")
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
    "tests/contract/test_store_contract.py",
    "tests/unit/test_forwarding.py",
)
# Modules that must be compiled: the live path of issue 12 beyond mqtt/ and core/.
HOT_MODULES = ("edge_broker.server.client", "edge_broker.server.gate",
               "edge_broker.server.client_guard", "edge_broker.server.drain",
               "edge_broker.server.app", "edge_broker.store.log.log",
               "edge_broker.store.log.backlogs", "edge_broker.store.log.keeper",
               "edge_broker.store.sqlite.plan", "edge_broker.bridge.forward")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info", "BUILD")


def _build_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "edge_broker_build", REPO / "build_support" / "edge_broker_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", build.ENV, "CC", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path, env: dict[str, str],
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def copy_sources(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=_IGNORED)
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
                str(source)], cwd=source.parent, env=clean_env(**env))


def make_compiled_venv(root: Path) -> Path:
    source = copy_sources(root / "src")
    built = build_wheel(source, root / "wheel", **{build.ENV: "1"})
    assert built.returncode == 0, f"compiled wheel build failed:\n{built.stdout[-4000:]}" \
                                  f"{built.stderr[-4000:]}"
    wheel = next((root / "wheel").glob("edge_broker-*.whl"))
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=root, env=clean_env())
    assert made.returncode == 0, made.stderr
    # The test tools at this venv's versions: the same behaviour, found in the same index.
    pins = [f"{name}=={metadata.version(name)}" for name in TEST_PACKAGES]
    installed = run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel),
                     *pins], cwd=root, env=clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(source)
    return venv


@pytest.fixture(scope="module")
def compiled_venv() -> Iterator[Path]:
    problem = build.toolchain_problem()
    if problem is not None:
        pytest.skip(f"cannot test the compiled build: {problem}")
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
    yield entry / "venv"


def test_the_wheel_s_modules_are_compiled(compiled_venv: Path, tmp_path: Path) -> None:
    probe = ("import json, edge_broker, edge_broker.buildinfo as b, edge_broker.mqtt.codec as c\n"
             "print(json.dumps({'package': edge_broker.__path__[0], 'codec': c.__file__,"
             " 'modules': b.modules(), 'status': b.build_status()}))")
    result = run([str(compiled_venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                 env=clean_env())
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["package"].startswith(str(compiled_venv)), found
    assert found["codec"].endswith(".so"), found
    assert found["status"] == "compiled with mypyc"
    assert found["modules"] and all(found["modules"].values()), found["modules"]
    assert set(HOT_MODULES) <= set(found["modules"]), sorted(found["modules"])
    assert any(name.startswith("edge_broker.mqtt.") for name in found["modules"])
    listed = run([str(compiled_venv / "bin" / "python"), "-m", "edge_broker.buildinfo"],
                 cwd=tmp_path, env=clean_env())
    assert listed.returncode == 0, listed.stderr
    for name in HOT_MODULES:
        assert f"  {name}: compiled\n" in listed.stdout + "\n", listed.stdout


class CompiledBroker:
    """The compiled venv's `edge-broker` on port 0 (the port read from its log)."""

    def __init__(self, venv: Path, data_dir: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.process = subprocess.Popen(
                [str(venv / "bin" / "edge-broker"), "--host", "127.0.0.1", "--port", "0",
                 "--data-dir", str(data_dir)], cwd=data_dir.parent, env=clean_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20
        while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", self.stderr())):
            assert self.process.poll() is None, f"edge-broker exited:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"edge-broker not listening:\n{self.stderr()}"
            time.sleep(0.02)  # polling interval, bounded by the deadline
        self.port = int(found.group(1))

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def mapped_extensions(self) -> str:
        """The shared objects this process has loaded (Linux /proc)."""
        return Path(f"/proc/{self.process.pid}/maps").read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def test_a_compiled_broker_process_serves_qos1_and_a_persistent_session_across_a_restart(
        compiled_venv: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = CompiledBroker(compiled_venv, data, tmp_path / "broker-1.log")
    try:
        live = connect(broker.port, "live-sub")
        assert live.subscribe(("t/live", 1)) == (1,)
        offline = connect(broker.port, "offline-sub", clean=False)
        assert offline.subscribe(("t/queued/#", 1)) == (1,)
        offline.disconnect()
        publisher = connect(broker.port, "pub")
        # QoS 1 to an online subscriber: PUBACK to the publisher, delivery at QoS 1.
        assert publisher.publish_acked("t/live", b"hello", qos=1) == 0
        got = live.expect(PUBLISH)
        assert (got.topic, got.payload, got.qos) == ("t/live", b"hello", 1)
        live.ack(PUBACK, got.packet_id)
        # QoS 0 to it as well.
        publisher.publish("t/live", b"zero")
        got = live.expect(PUBLISH)
        assert (got.topic, got.payload, got.qos) == ("t/live", b"zero", 0)
        # Queued for the offline persistent session, then the broker restarts.
        for i in range(20):
            assert publisher.publish_acked(f"t/queued/{i}", b"m%d" % i, qos=1) == 0
        if Path("/proc/self/maps").exists():  # the process runs the compiled code
            maps = broker.mapped_extensions()
            venv = re.escape(str(compiled_venv))
            assert re.search(rf"{venv}\S*/\w+__mypyc\.\S*\.so", maps), maps
            for name in ("server/app", "store/log/log", "store/log/keeper"):
                assert re.search(rf"{venv}\S*/edge_broker/{name}\.\S*\.so", maps), \
                    f"{name} not loaded compiled:\n{maps}"
        publisher.disconnect()
        live.disconnect()
        assert broker.stop() == 0, broker.stderr()

        broker = CompiledBroker(compiled_venv, data, tmp_path / "broker-2.log")
        back = connect(broker.port, "offline-sub", clean=False)
        assert back.connack.session_present  # [MQTT-3.2.2-2] (3.1.1)
        received = []
        for _ in range(20):
            packet = back.expect(PUBLISH)
            back.ack(PUBACK, packet.packet_id)
            received.append((packet.topic, packet.payload, packet.qos))
        # Every acknowledged message, in order [MQTT-4.6.0-6] (3.1.1).
        assert received == [(f"t/queued/{i}", b"m%d" % i, 1) for i in range(20)]
        back.expect_nothing()
        back.disconnect()
    finally:
        code = broker.stop()
    assert code == 0, broker.stderr()
    assert "Traceback" not in broker.stderr(), broker.stderr()


def test_the_compiled_build_passes_the_representative_tests(compiled_venv: Path,
                                                            tmp_path: Path) -> None:
    # A copy of tests/ and the pytest configuration, without the package: pyproject's
    # `pythonpath = ["."]` then puts a directory without edge_broker first.
    shutil.copytree(REPO / "tests", tmp_path / "tests", ignore=_IGNORED)
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    result = run([str(compiled_venv / "bin" / "python"), "-m", "pytest", "-x", "-q",
                  "-p", "no:cacheprovider", *SUBSET], cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_without_a_c_compiler_the_build_falls_back_to_pure_python(tmp_path: Path) -> None:
    source = copy_sources(tmp_path / "src")
    built = build_wheel(source, tmp_path / "wheel", CC="/nonexistent/cc")
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    assert "NOT compiled" in built.stdout + built.stderr  # shown by `pip install -v`
    wheel = next((tmp_path / "wheel").glob("edge_broker-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        status = archive.read("edge_broker/BUILD").decode()
    assert not [n for n in names if n.endswith(".so")], names
    assert "edge_broker/mqtt/codec.py" in names
    assert status.startswith("pure Python: no C compiler")
    assert build.APT_HINT in status


def test_compile_required_without_a_c_compiler_fails_and_says_why(tmp_path: Path) -> None:
    source = copy_sources(tmp_path / "src")
    built = build_wheel(source, tmp_path / "wheel", CC="/nonexistent/cc", **{build.ENV: "1"})
    assert built.returncode != 0
    assert "no C compiler" in built.stdout + built.stderr
    assert build.APT_HINT in built.stdout + built.stderr
    assert not list((tmp_path / "wheel").glob("*.whl"))
