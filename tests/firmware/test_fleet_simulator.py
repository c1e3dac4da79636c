"""The fleet simulator (firmware_examples/fleet-simulator) for a few seconds against a real
edge-broker process: devices go offline, reconnect and reboot, and every reading the broker
acknowledged reaches the central subscriber. The 1,000-device soak is a benchmark, not this."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.brokerprocess import BrokerProcess, needs_console_script

SIMULATE = (Path(__file__).resolve().parents[2] / "firmware_examples" / "fleet-simulator"
            / "simulate.py")
README = SIMULATE.with_name("README.md")


@needs_console_script
def test_fleet_loses_no_acknowledged_reading(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data").wait_listening()
    report_path = tmp_path / "report.json"
    try:
        result = subprocess.run(
            [sys.executable, str(SIMULATE), "--devices", "20", "--duration", "6",
             "--interval", "0.1", "--offline-rate", "0.3", "--offline-max", "1",
             "--reboot-fraction", "0.3", "--processes", "2", "--backoff-min", "0.05",
             "--backoff-max", "0.5", "--drain", "20", "--port", str(broker.port),
             "--broker-pid", str(broker.pid), "--rss-every", "1", "--seed", "test",
             "--json", str(report_path)],
            capture_output=True, text=True, timeout=90)
    finally:
        assert broker.stop() == 0
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["acknowledged"] > 100
    assert report["missing_acknowledged"] == 0
    # the run exercised what it claims to: abrupt and clean offline periods, reboots
    assert report["offline_events"] > 0 and report["reboots"] > 0
    # every sequence number that never arrived was never acknowledged: lost to a reboot or the
    # buffer bound or still unacknowledged at the end (all counted by the devices)
    assert report["gaps"] <= (report["lost_on_reboot"] + report["dropped_buffer_full"]
                              + report["unacked_at_end"])
    assert report["rss_kib_start"] and report["rss_kib_end"]


@needs_console_script
def test_readme_broker_pid_command_finds_a_running_broker(tmp_path: Path) -> None:
    """The README's `--broker-pid "$(...)"` names an edge-broker process (the broker is a Python
    script: a lookup by executable name finds nothing, and the simulator rejects "")."""
    lookup = re.search(r'--broker-pid "\$\((.*?)\)"', README.read_text())
    assert lookup, "the README's soak command has no --broker-pid \"$(...)\""
    if not shutil.which(lookup.group(1).split()[0]):
        pytest.skip(f"{lookup.group(1).split()[0]} not installed")
    broker = BrokerProcess(tmp_path / "data").wait_listening()
    try:
        result = subprocess.run(["sh", "-c", lookup.group(1)], capture_output=True, text=True,
                                timeout=30)
        pid = result.stdout.strip()
        assert pid.isdigit(), f"{lookup.group(1)!r} printed {pid!r}"
        # another test's broker may be the one found: any edge-broker process will do
        assert b"edge-broker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        assert broker.stop() == 0
