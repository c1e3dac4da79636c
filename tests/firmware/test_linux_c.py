"""The Linux C example (firmware_examples/linux-c, Paho C) compiled with its Makefile and run
against the broker, over MQTT 5 (session expiry) and MQTT 3.1.1 (clean session 0).

Needs: apt install build-essential libpaho-mqtt-dev"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import BrokerThread
from tests.firmware.central import Central
from tests.integration.brokerprocess import BrokerProcess, needs_console_script

EXAMPLE = Path(__file__).resolve().parents[2] / "firmware_examples" / "linux-c"
APT = "sudo apt install build-essential libpaho-mqtt-dev"

pytestmark = pytest.mark.skipif(
    not shutil.which("gcc") or not shutil.which("make")
    or not Path("/usr/include/MQTTClient.h").exists(),
    reason=f"gcc, make or the Paho C headers missing: {APT}")


@pytest.fixture(scope="module")
def device_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # as in the README (`make BUILD=/tmp/out`): the Makefile creates the directory
    out = tmp_path_factory.mktemp("linux-c") / "out"
    result = subprocess.run(["make", "-C", str(EXAMPLE), f"BUILD={out}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "edge-device"


@pytest.mark.parametrize("version", ["5", "311"])
def test_c_device_publishes_every_reading_and_obeys_commands(
        device_binary: Path, broker: BrokerThread, version: str) -> None:
    device_id = f"c-{version}"
    central = Central(f"central-{version}").connect(broker.port)
    process = subprocess.Popen(
        [str(device_binary), "--id", device_id, "--port", str(broker.port), "--mqtt", version,
         "--interval-ms", "20", "--backoff-min-ms", "50", "--backoff-max-ms", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(
        line.rstrip("\n") for line in process.stdout or ()), daemon=True)
    reader.start()
    try:
        central.wait(lambda: len(central.telemetry[device_id]) >= 5, 20, "first readings")
        central.publish(f"devices/{device_id}/cmd", json.dumps({"cmd": "interval", "ms": 15}))
        central.wait(lambda: {"ack": "interval", "ms": 15} in central.events(device_id), 20,
                     "the interval command's acknowledgement")
        central.publish(f"devices/{device_id}/cmd", json.dumps({"cmd": "stop"}))
        assert process.wait(30) == 0
        reader.join(10)
        sent = [line.split(" ", 1)[1] for line in lines if line.startswith("READING ")]
        resent = {line.split(" ", 1)[1] for line in lines if line.startswith("RESEND ")}
        central.wait(lambda: set(sent) <= set(central.telemetry[device_id]), 20,
                     "every reading at the central subscriber")
        received = Counter(central.telemetry[device_id])
        assert set(received) == set(sent)
        assert {p for p, n in received.items() if n > 1} <= resent
        assert [json.loads(p)["seq"] for p in sent] == list(range(len(sent)))
        assert any(line.startswith("STOPPED ") and " dropped=0 " in line for line in lines)
        statuses = [p for t, p, _r in central.messages if t == f"devices/{device_id}/status"]
        assert statuses[0] == b"online" and statuses[-1] == b"offline"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        central.stop()


def test_c_device_answers_every_command_including_stop_and_reboot(
        device_binary: Path, broker: BrokerThread) -> None:
    """Each command gets its answer on devices/<id>/event - an error for an interval that is
    not a number (the interval stays), an acknowledgement for stop and reboot before the exit."""
    central = Central("central-answers").connect(broker.port)

    def run_device(*commands: dict[str, object]) -> int:
        process = subprocess.Popen(
            [str(device_binary), "--id", "c-cmd", "--port", str(broker.port), "--mqtt", "311",
             "--interval-ms", "20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            seen = len(central.telemetry["c-cmd"])
            central.wait(lambda: len(central.telemetry["c-cmd"]) > seen, 20, "a reading")
            for command in commands:
                central.publish("devices/c-cmd/cmd", json.dumps(command))
            return process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    try:
        assert run_device({"cmd": "interval"}, {"cmd": "interval", "ms": "abc"},
                          {"cmd": "interval", "ms": 15}, {"cmd": "stop"}) == 0
        bad_interval = {"error": "interval: ms must be a number", "ms": 20}
        central.wait(lambda: len(central.events("c-cmd")) >= 4, 20, "four answers")
        assert central.events("c-cmd") == [bad_interval, bad_interval,
                                           {"ack": "interval", "ms": 15}, {"ack": "stop"}]
        assert run_device({"cmd": "reboot"}) == 3
        central.wait(lambda: len(central.events("c-cmd")) >= 5, 20, "the reboot's answer")
        assert central.events("c-cmd")[4:] == [{"ack": "reboot"}]
    finally:
        central.stop()


def test_c_device_will_reports_it_offline_when_it_dies(device_binary: Path,
                                                      broker: BrokerThread) -> None:
    central = Central("central-will").connect(broker.port)
    process = subprocess.Popen(
        [str(device_binary), "--id", "c-will", "--port", str(broker.port), "--interval-ms", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        central.wait(lambda: len(central.telemetry["c-will"]) >= 1, 20, "a first reading")
        process.kill()  # power loss: no DISCONNECT, so the broker publishes the will
        process.wait()
        central.wait(lambda: [p for t, p, _r in central.messages
                              if t == "devices/c-will/status"][-1:] == [b"offline"], 20,
                     "the will")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        central.stop()


@needs_console_script
def test_c_device_reconnects_after_broker_restart_without_losing_a_reading(
        device_binary: Path, tmp_path: Path) -> None:
    # the device is given one address, so the new broker takes the old one's port: a tiny race
    # with other processes on the machine (a port another process grabbed fails the start)
    data = tmp_path / "data"
    broker = BrokerProcess(data).wait_listening()
    port = broker.port
    central = Central("central-restart").connect(port)
    process = subprocess.Popen(
        [str(device_binary), "--id", "c-restart", "--port", str(port), "--interval-ms", "30",
         "--backoff-min-ms", "50", "--backoff-max-ms", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    cond = threading.Condition()

    def read() -> None:
        for line in process.stdout or ():
            with cond:
                lines.append(line.rstrip("\n"))
                cond.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def offline_readings() -> int:
        starts = [i for i, line in enumerate(lines) if line.startswith("OFFLINE")]
        return sum(x.startswith("READING") for x in lines[starts[0]:]) if starts else 0

    try:
        central.wait(lambda: len(central.telemetry["c-restart"]) >= 5, 20, "first readings")
        central.stop()
        assert broker.stop() == 0
        with cond:
            assert cond.wait_for(lambda: offline_readings() >= 5, 20), lines[-20:]
        broker = BrokerProcess(data, "--port", str(port)).wait_listening()
        central.connect(port)
        with cond:
            assert cond.wait_for(lambda: sum(x == "CONNECTED" for x in lines) >= 2, 20)
        central.publish("devices/c-restart/cmd", json.dumps({"cmd": "stop"}))
        assert process.wait(30) == 0
        with cond:
            sent = [x.split(" ", 1)[1] for x in lines if x.startswith("READING ")]
            resent = {x.split(" ", 1)[1] for x in lines if x.startswith("RESEND ")}
        central.wait(lambda: set(sent) <= set(central.telemetry["c-restart"]), 20,
                     "every reading at the central subscriber")
        received = Counter(central.telemetry["c-restart"])
        assert set(received) == set(sent)
        assert {p for p, n in received.items() if n > 1} <= resent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        central.stop()
        broker.stop()
