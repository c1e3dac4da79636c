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
about 5 minutes on a 2-core machine (docs/compiled.md), a cached run about 2 minutes. The
builds start in the background (nice 19) when collection ends and these tests run last
(tests/conftest.py, tests/system/compiled_build.py), so that the builds overlap the rest of the
suite.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from tests.integration.rawclient import PUBACK, PUBLISH, connect
from tests.system.compiled_build import (
    BACKGROUND,
    NO_CC,
    NO_CC_REQUIRED,
    SUBSET_RUN,
    VENV,
    build,
    clean_env,
    run,
)

# Modules that must be compiled: the live path of issue 12 beyond mqtt/ and core/.
HOT_MODULES = ("edge_broker.server.client", "edge_broker.server.gate",
               "edge_broker.server.client_guard", "edge_broker.server.drain",
               "edge_broker.server.app", "edge_broker.store.log.log",
               "edge_broker.store.log.backlogs", "edge_broker.store.log.keeper",
               "edge_broker.store.sqlite.plan", "edge_broker.bridge.forward")


@pytest.fixture(scope="module")
def compiled_venv() -> Path:
    # Built in the background since the end of collection (tests/conftest.py), or now.
    venv, problem = BACKGROUND.result(VENV)
    if venv is None:
        pytest.skip(f"cannot test the compiled build: {problem}")
    return venv


@pytest.mark.background_jobs(VENV)
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

# `edge-broker` with `import uvloop` failing (None in sys.modules makes the import raise).
NO_UVLOOP_MAIN = ("import sys; sys.modules['uvloop'] = None; from edge_broker.cli import main; "
                  "sys.exit(main())")


class CompiledBroker:
    """The compiled venv's `edge-broker` on port 0 (the port read from its log)."""

    def __init__(self, venv: Path, data_dir: Path, log: Path, *, uvloop: bool = True) -> None:
        self.log = log
        # uvloop=False: as installed by the README's `pip install .` (no `speed` extra), on
        # asyncio's own event loop; the venv has uvloop, so its import is made to fail.
        command = ([str(venv / "bin" / "edge-broker")] if uvloop else
                   [str(venv / "bin" / "python"), "-c", NO_UVLOOP_MAIN])
        with open(log, "wb") as err:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", "0",
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


@pytest.mark.background_jobs(VENV)
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


@pytest.mark.background_jobs(VENV)
def test_the_compiled_build_passes_the_representative_tests(compiled_venv: Path) -> None:
    # compiled_build.run_subset, now, at normal priority: its tests have deadlines, and
    # running them beside the rest of the suite would slow both down.
    result = BACKGROUND.result(SUBSET_RUN)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.background_jobs(NO_CC)
def test_without_a_c_compiler_the_build_falls_back_to_pure_python() -> None:
    built, wheels = BACKGROUND.result(NO_CC)  # compiled_build.fallback_build
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    assert "NOT compiled" in built.stdout + built.stderr  # shown by `pip install -v`
    wheel = next(wheels.glob("edge_broker-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        status = archive.read("edge_broker/BUILD").decode()
    assert not [n for n in names if n.endswith(".so")], names
    assert "edge_broker/mqtt/codec.py" in names
    assert status.startswith("pure Python: no C compiler")
    assert build.APT_HINT in status


@pytest.mark.background_jobs(NO_CC_REQUIRED)
def test_compile_required_without_a_c_compiler_fails_and_says_why() -> None:
    built, wheels = BACKGROUND.result(NO_CC_REQUIRED)  # compiled_build.fallback_build
    assert built.returncode != 0
    assert "no C compiler" in built.stdout + built.stderr
    assert build.APT_HINT in built.stdout + built.stderr
    assert not list(wheels.glob("*.whl"))


@pytest.mark.background_jobs(VENV)
def test_the_readme_s_compiled_broker_without_uvloop_stops_on_the_first_sigint(
        compiled_venv: Path, tmp_path: Path) -> None:
    """The README's install: compiled, no `speed` extra (asyncio's loop), as the README's Quick
    start uses it (a subscriber and a publisher come and go), then Ctrl-C (SIGINT) once. Every
    other compiled test runs on uvloop; this combination was what `pip install .` gives."""
    broker = CompiledBroker(compiled_venv, tmp_path / "data", tmp_path / "broker.log",
                            uvloop=False)
    try:
        if Path("/proc/self/maps").exists():
            maps = broker.mapped_extensions()
            assert "uvloop" not in maps, "uvloop loaded although its import fails"
            assert re.search(rf"{re.escape(str(compiled_venv))}\S*/\w+__mypyc\.\S*\.so", maps)
        subscriber = connect(broker.port, "sub")
        assert subscriber.subscribe(("sensors/#", 0)) == (0,)
        publisher = connect(broker.port, "pub")
        publisher.publish("sensors/room1/temp", b"21.5")
        got = subscriber.expect(PUBLISH)
        assert (got.topic, got.payload) == ("sensors/room1/temp", b"21.5")
        publisher.disconnect()
        subscriber.disconnect()
        broker.process.send_signal(signal.SIGINT)
        code = broker.process.wait(timeout=20)
    finally:
        if broker.process.poll() is None:
            broker.process.kill()
            broker.process.wait(timeout=20)
    stderr = broker.stderr()
    assert code == 0, stderr
    assert "shutting down" in stderr and "edge-broker stopped" in stderr, stderr
    assert "Traceback" not in stderr, stderr
