"""What an operator's tools see: /metrics (parsed by prometheus_client), /healthz, the status
page in a real headless Chromium (figures equal to /metrics, a screenshot kept in
test-artifacts/), and the systemd notifications on a real datagram socket, including a
watchdog that stops pinging while the store's writer is stuck.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_broker.bridge.config import parse_bridges
from edge_broker.config import HttpConfig, StreamConfig
from edge_broker.errors import ConfigError
from edge_broker.server import observe
from tests.conftest import BrokerThread, broker_config
from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.integration.rawclient import connect, subscriber

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def http_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    # A stream, and a bridge whose upstream does not answer: the page shows both.
    bridges = parse_bridges([{"name": "cloud", "kind": "mqtt", "servers": [
        f"mqtt://127.0.0.1:{closed_port()}"], "topics": ["nothing/# out 1"]}],
        file="test", gateway_id="gw7")
    config = dataclasses.replace(broker_config(tmp_path),
                                 http=HttpConfig(host="127.0.0.1", port=0),
                                 streams=(StreamConfig("telemetry", "s/#"),), bridges=bridges)
    broker = BrokerThread(config).start()
    yield broker
    broker.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(broker: BrokerThread, path: str) -> tuple[int, bytes]:
    assert broker.app is not None and broker.app.http_address is not None
    host, port = broker.app.http_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metrics(broker: BrokerThread) -> dict[str, float]:
    status, body = get(broker, "/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_and_health_follow_the_traffic(http_broker: BrokerThread) -> None:
    sub = subscriber(http_broker.port, "watcher", ("t/#", 1), version=5)
    pub = connect(http_broker.port, "sender", version=5)
    for index in range(5):
        pub.publish("t/x", b"%d" % index, qos=1, packet_id=index + 1)
        pub.expect(4)  # PUBACK
    for _ in range(5):
        sub.expect_publish()
    values = metrics(http_broker)
    assert values["edge_broker_publish_received_total"] == 5
    assert values["edge_broker_clients_connected"] == 2
    assert values["edge_broker_sessions"] == 2
    assert values["edge_broker_dropped_messages_total{reason=queue_full}"] == 0
    assert values["edge_broker_commit_latency_seconds_count"] >= 0
    assert values["process_resident_memory_bytes"] > 1_000_000
    status, body = get(http_broker, "/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["healthy"] is True and health["store_full"] is False
    assert get(http_broker, "/nope")[0] == 404
    sub.close()
    pub.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium")
def test_status_page_in_a_real_browser(http_broker: BrokerThread) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    online = connect(http_broker.port, "dashboard-test-online", version=5)
    offline = subscriber(http_broker.port, "sensor-offline", ("s/#", 1), version=4, clean=False)
    offline.close()
    publisher = connect(http_broker.port, "sensor-pub", version=4)
    for index in range(3):
        publisher.publish("s/temp", b"21.%d" % index, qos=1, packet_id=index + 1)
        publisher.expect(4)
    assert http_broker.app is not None and http_broker.app.http_address is not None
    host, port = http_broker.app.http_address

    # The sessions table lists the queued session first; wait for the broker to see the close.
    deadline = time.monotonic() + 10
    while metrics(http_broker)["edge_broker_clients_connected"] != 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)  # polling interval, bounded by the deadline
    expected = metrics(http_broker)

    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(f"http://{host}:{port}/")
            page.wait_for_selector("body[data-loaded='1']", timeout=15000)

            def number(selector: str) -> float:
                return float(page.inner_text(selector).replace(",", ""))

            assert number("#clients") == expected["edge_broker_clients_connected"]
            assert number("#sessions") == expected["edge_broker_sessions"]
            assert number("#queued") == expected["edge_broker_queued_messages"] == 3
            assert number("#received") == expected["edge_broker_publish_received_total"]
            first_row = page.inner_text("#sessions-table tbody tr:first-child")
            assert "sensor-offline" in first_row and "offline" in first_row
            assert page.inner_text("#state") == "healthy"
            # Before, the page always said "none configured" for both.
            assert page.inner_text("#streams") == "telemetry: 3 messages"
            assert page.inner_text("#bridges") == "cloud: down"
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "status-page.png").stat().st_size > 1000
    online.close()
    publisher.close()


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if predicate(message):
                return message
        while time.monotonic() < deadline:
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no matching notification; got {self.messages}")

    def drain(self) -> list[str]:
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(0.2)
        self.messages.extend(got)
        return got

    def close(self) -> None:
        self.sock.close()


@needs_console_script
def test_sd_notify_ready_status_reloading_stopping(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    config = tmp_path / "edge-broker.toml"
    config.write_text('[log]\nlevel = "info"\n')
    env_extra = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    broker = BrokerProcess(tmp_path / "data", "--config", str(config), env_extra=env_extra)
    try:
        broker.wait_listening()
        notify.wait_for(lambda m: m == "READY=1")
        notify.wait_for(lambda m: m == "WATCHDOG=1")
        notify.wait_for(lambda m: m.startswith("STATUS=0 clients connected"))
        broker.process.send_signal(signal.SIGHUP)
        notify.wait_for(lambda m: m.startswith("RELOADING=1\nMONOTONIC_USEC="))
        ready_count = sum(m == "READY=1" for m in notify.messages)
        notify.wait_for(lambda m: m == "READY=1" and
                        sum(x == "READY=1" for x in notify.messages) > ready_count)
        broker.process.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: m == "STOPPING=1")
        assert broker.wait_exit() == 0, broker.stderr
    finally:
        broker.kill()
        notify.close()


def test_watchdog_stops_while_the_store_is_stuck(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(observe, "STORE_PING_EVERY_S", 0.1)
    monkeypatch.setattr(observe, "STORE_STALE_S", 1.0)
    broker = BrokerThread(broker_config(tmp_path)).start()
    release = threading.Event()
    try:
        app = broker.app
        assert app is not None and broker.loop is not None
        task = asyncio.run_coroutine_threadsafe(_run_watchdog(app.observer), broker.loop)
        notify.wait_for(lambda m: m == "WATCHDOG=1")
        # Block the store's writer thread, as a stuck disk would.
        executor: Any = app.store._executor  # type: ignore[attr-defined]
        executor.submit(release.wait)
        notify.wait_for(lambda m: "UNHEALTHY" in m)
        notify.drain()
        # While unhealthy, no ping: two ping intervals pass with none.
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            assert "WATCHDOG=1" not in notify.drain()
            time.sleep(0.05)  # polling interval, bounded by the deadline
        release.set()
        notify.wait_for(lambda m: m == "WATCHDOG=1" and
                        notify.messages.count("WATCHDOG=1") > 1)
        task.cancel()
    finally:
        release.set()
        broker.stop()
        notify.close()


async def _run_watchdog(observer: observe.Observer) -> None:
    await observe.watchdog(observer)


def _readable_by_everyone(path: Path) -> bool:
    return all(part.stat().st_mode & 0o005 == 0o005 for part in (path, *path.parents))


def test_a_data_dir_the_service_user_cannot_write_is_one_line_and_exit_2() -> None:
    """As after one run as root: the directory belongs to root, the service runs as another
    user. One line naming the path, the owner and the chown; exit 2 (the unit's
    RestartPreventExitStatus), no traceback. Root may write anything, so under root the
    broker runs as `nobody` with Debian's python3 and this checkout on PYTHONPATH."""
    base = Path(tempfile.mkdtemp(prefix="eb-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        data = base / "data"
        data.mkdir(mode=0o755)
        command = [sys.executable, "-m", "edge_broker", "--port", "0", "--data-dir", str(data)]
        if os.geteuid() == 0:
            python = Path("/usr/bin/python3")
            if not python.exists() or not _readable_by_everyone(REPO):
                pytest.skip(f"needs /usr/bin/python3 and {REPO} readable by other users")
            command[0] = str(python)
            run_as: dict[str, Any] = {"user": "nobody", "group": "nogroup",
                                      "extra_groups": []}
        else:
            data.chmod(0o500)  # our own directory, made unwritable
            run_as = {}
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                cwd=base, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                                stdin=subprocess.DEVNULL, **run_as)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1, result.stderr
        assert str(data) in errors[0] and "chown" in errors[0] and "cannot write" in errors[0]
    finally:
        (base / "data").chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)


def test_a_mistyped_data_dir_does_not_grow_a_tree(tmp_path: Path) -> None:
    config = broker_config(tmp_path)
    config = dataclasses.replace(config, broker=dataclasses.replace(
        config.broker, data_dir=tmp_path / "no-such-parent" / "data"))
    with pytest.raises(ConfigError, match="does not exist"):
        observe.prepare_data_dir(config)
    assert not (tmp_path / "no-such-parent").exists()


def test_status_command_shows_the_live_figures_on_one_screen(tmp_path: Path) -> None:
    from edge_broker import cli

    config = broker_config(tmp_path)
    broker = BrokerThread(config).start()
    try:
        backlog = subscriber(broker.port, "meter-7", ("m/#", 1), version=4, clean=False)
        backlog.close()
        pub = connect(broker.port, "meter-pub", version=5)
        for index in range(4):
            pub.publish("m/kwh", b"%d" % index, qos=1, packet_id=index + 1)
            pub.expect(4)
        data_dir = str(config.broker.data_dir)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["status", "--data-dir", data_dir]) == 0, err.getvalue()
        screen = out.getvalue()
        assert "healthy" in screen
        assert "clients connected 1" in screen
        assert "messages received 4" in screen
        assert "meter-7 (offline): 4 queued" in screen
        # Every reason the broker counts drops by (before: three of its five).
        assert all(f"{reason} 0" in screen for reason in (
            "queue_full", "memory_full", "expired", "stream_store_full", "store_full"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["--data-dir", data_dir, "status", "--json"]) == 0
        reply = json.loads(out.getvalue())
        assert reply["metrics"]["edge_broker_publish_received_total"] == 4
        pub.close()
    finally:
        broker.stop()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["status", "--data-dir", str(config.broker.data_dir)]) == 3
    assert "no broker is running" in err.getvalue()


def test_exposed_http_asks_for_a_user_of_the_password_file(tmp_path: Path) -> None:
    from edge_broker.auth.passwd import PasswordFile
    from edge_broker.config import AuthConfig, load_config

    passwd = tmp_path / "passwd"
    users = PasswordFile()
    users.set("ops", "s3cret")
    users.save(passwd)
    config = broker_config(tmp_path)
    config = dataclasses.replace(
        config, http=HttpConfig(host="0.0.0.0", port=0),
        auth=AuthConfig(allow_anonymous=True, allow_anonymous_explicit=True,
                        password_file=passwd))
    broker = BrokerThread(config).start()
    try:
        assert broker.app is not None and broker.app.http_address is not None
        port = broker.app.http_address[1]

        def status_with(credentials: bytes | None) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
            if credentials is not None:
                request.add_header("Authorization",
                                   "Basic " + base64.b64encode(credentials).decode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert status_with(None) == 401
        assert status_with(b"ops:wrong") == 401
        assert status_with(b"nobody:s3cret") == 401
        assert status_with(b"ops:s3cret\0") == 401
        assert status_with(b"ops:s3cret") == 200
    finally:
        broker.stop()
    # Without a password file, an HTTP listener reachable from other hosts is refused.
    file = tmp_path / "exposed.toml"
    file.write_text('[http]\nhost = "0.0.0.0"\nport = 9883\n')
    with pytest.raises(ConfigError, match="password_file"):
        load_config(file)


def test_status_command_shows_the_streams_and_the_bridges(http_broker: BrokerThread) -> None:
    from edge_broker import cli

    publisher = connect(http_broker.port, "sensor-pub", version=4)
    publisher.publish("s/temp", b"21.5", qos=1, packet_id=1)
    publisher.expect(4)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["status", "--data-dir", str(http_broker.config.broker.data_dir)]) == 0
    screen = out.getvalue()
    assert "streams: telemetry 1 messages" in screen, screen
    assert "bridges: cloud down, backlog 0" in screen, screen
    publisher.close()
