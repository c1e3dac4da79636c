"""The installed `edge-broker` command, used as the README tells a new user to use it.

Each test runs the console script as a subprocess in a fresh working directory, on a free
port, and talks to it with real clients (mosquitto_pub/mosquitto_sub when installed, paho).
Waiting is deadline polling (connect attempts, process exit), never a fixed sleep.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import free_port

EDGE_BROKER = Path(sys.executable).parent / "edge-broker"
REPO = Path(__file__).resolve().parents[2]
HAVE_MOSQUITTO_CLIENTS = bool(shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub"))
START_TIMEOUT = 10.0
STOP_LIMIT_S = 2.0

pytestmark = pytest.mark.skipif(
    not EDGE_BROKER.exists(),
    reason=f"{EDGE_BROKER} not found: install the package as the README says "
           "(python3 -m venv .venv && .venv/bin/pip install -e '.[test]')")


class BrokerProcess:
    """`edge-broker <args>` running in `cwd`; stdout/stderr go to files there."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.stdout_path = cwd / "stdout.txt"
        self.stderr_path = cwd / "stderr.txt"
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([str(EDGE_BROKER), *args], cwd=cwd, env=env,
                                            stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_accepting(self, port: int) -> None:
        """Poll until the broker accepts TCP connections on 127.0.0.1:port."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"edge-broker exited with {self.process.returncode} before "
                            f"accepting connections:\n{self.stderr}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"edge-broker not accepting on port {port} after "
                                f"{START_TIMEOUT} s:\n{self.stderr}")
                time.sleep(0.02)  # polling interval, bounded by the deadline

    def stop(self, signum: int) -> tuple[int, float]:
        """Send `signum`; return (exit code, seconds until the process exited)."""
        sent_at = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"edge-broker ignored signal {signum}:\n{self.stderr}")
        return code, time.monotonic() - sent_at

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def run_broker(tmp_path: Path) -> Iterator[Any]:
    started: list[BrokerProcess] = []

    def run(*args: str) -> BrokerProcess:
        broker = BrokerProcess(tmp_path, *args)
        started.append(broker)
        return broker

    yield run
    for broker in started:
        broker.kill()


def assert_clean_exit(broker: BrokerProcess, code: int, took: float) -> None:
    stderr = broker.stderr
    assert code == 0, f"exit code {code}:\n{stderr}"
    assert took < STOP_LIMIT_S, f"took {took:.2f} s to stop:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert " ERROR " not in stderr and " CRITICAL " not in stderr, stderr
    assert "edge-broker stopped" in stderr, stderr


class PahoV5:
    """A connected MQTT 5 paho client recording messages and the DISCONNECT it gets."""

    def __init__(self, port: int, client_id: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        connacks: queue.Queue[int] = queue.Queue()
        subacks: queue.Queue[int] = queue.Queue()
        client = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                           client_id=client_id, protocol=mqtt.MQTTv5,
                                           reconnect_on_failure=False)
        client.on_connect = lambda c, u, f, reason, p: connacks.put(reason.value)
        client.on_subscribe = lambda c, u, mid, codes, p: subacks.put(mid)
        client.on_message = lambda c, u, message: self.messages.put(message)
        client.on_disconnect = lambda c, u, f, reason, p: self.disconnects.put(reason.value)
        self._subacks = subacks
        client.connect("127.0.0.1", port)
        client.loop_start()
        assert connacks.get(timeout=5) == 0

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, 1)
        assert self._subacks.get(timeout=5) == mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def exchange_with_mosquitto_clients(port: int) -> None:
    """The README's quick start: mosquitto_sub prints what mosquitto_pub sent."""
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", "sensors/#", "-v", "-q", "1",
         "-C", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # mosquitto_sub cannot say when it has subscribed: publish until it got one message.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            published = subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port),
                 "-t", "sensors/room1/temp", "-m", "21.5", "-q", "1"],
                capture_output=True, text=True, timeout=START_TIMEOUT)
            assert published.returncode == 0, published.stderr
            try:
                stdout, stderr = sub.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "mosquitto_sub received nothing"
        assert sub.returncode == 0, stderr
        assert stdout == "sensors/room1/temp 21.5\n"
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()


def test_first_run_exchange_and_ctrl_c(run_broker: Any, tmp_path: Path) -> None:
    port = free_port()
    broker = run_broker("--port", str(port))
    broker.wait_accepting(port)
    # The default data directory is created in the working directory.
    assert (tmp_path / "edge-broker-data").is_dir()

    if HAVE_MOSQUITTO_CLIENTS:
        exchange_with_mosquitto_clients(port)
    subscriber = PahoV5(port, "subscriber")
    subscriber.subscribe("sensors/#")
    publisher = PahoV5(port, "publisher")
    publisher.client.publish("sensors/room2/temp", b"19.0", qos=1).wait_for_publish(5)
    message = subscriber.messages.get(timeout=5)
    assert (message.topic, message.payload) == ("sensors/room2/temp", b"19.0")
    publisher.close()

    code, took = broker.stop(signal.SIGINT)  # what Ctrl-C sends
    # A connected MQTT 5 client is told why: DISCONNECT 0x8B, Server shutting down.
    assert subscriber.disconnects.get(timeout=5) == 0x8B
    subscriber.client.loop_stop()
    assert_clean_exit(broker, code, took)


def test_sigterm_stops_cleanly(run_broker: Any) -> None:
    port = free_port()
    broker = run_broker("--port", str(port), "--data-dir", "state")
    broker.wait_accepting(port)
    client = PahoV5(port, "listener")
    code, took = broker.stop(signal.SIGTERM)  # what systemctl stop sends
    assert client.disconnects.get(timeout=5) == 0x8B
    client.client.loop_stop()
    assert_clean_exit(broker, code, took)
    assert (broker.cwd / "state").is_dir()


def test_stop_with_no_clients_connected_is_fast(run_broker: Any) -> None:
    port = free_port()
    broker = run_broker("--port", str(port))
    broker.wait_accepting(port)
    code, took = broker.stop(signal.SIGINT)
    assert_clean_exit(broker, code, took)


def test_listening_on_all_interfaces_needs_allow_anonymous(run_broker: Any) -> None:
    port = free_port()
    broker = run_broker("--host", "0.0.0.0", "--port", str(port))
    code = broker.process.wait(timeout=START_TIMEOUT)
    stderr = broker.stderr
    assert code == 2, stderr
    assert "--host" in stderr and "allow_anonymous" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_check_config_accepts_the_shipped_example() -> None:
    result = subprocess.run([str(EDGE_BROKER), "check-config", "deploy/edge-broker.toml"],
                            cwd=REPO, capture_output=True, text=True, timeout=START_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout.splitlines()[0]
    assert "Traceback" not in result.stderr
