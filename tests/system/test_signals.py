"""Signals as systemd and an operator send them to the real process.

SIGHUP reads the configuration again (reloadable keys now, the others logged as needing a
restart, a broken file keeps the running configuration) and keeps every connection; SIGUSR1
logs a status line; SIGUSR2 is ignored; SIGTERM at any moment of start-up stops the broker
cleanly (exit 0), never with the signal's default action.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.brokerprocess import (
    EDGE_BROKER,
    BrokerProcess,
    clean_env,
    needs_console_script,
)
from tests.integration.rawclient import connect

pytestmark = needs_console_script


def wait_for_log(broker: BrokerProcess, text: str, timeout: float = 10.0, *,
                 count: int = 1) -> None:
    """Until `text` is in the broker's log `count` times."""
    deadline = time.monotonic() + timeout
    while broker.stderr.count(text) < count:
        assert broker.process.poll() is None, f"broker exited:\n{broker.stderr}"
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{broker.stderr}"
        time.sleep(0.02)  # polling interval, bounded by the deadline


def write_config(path: Path, *, level: str, max_inflight: int) -> None:
    path.write_text(f'[log]\nlevel = "{level}"\n[mqtt]\nmax_inflight_messages = {max_inflight}\n')


def test_sighup_reloads_without_dropping_clients(tmp_path: Path) -> None:
    config = tmp_path / "edge-broker.toml"
    write_config(config, level="info", max_inflight=20)
    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening()
    try:
        client = connect(broker.port, "stays-connected", version=5)
        write_config(config, level="debug", max_inflight=30)
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "reload (SIGHUP): configuration read again; applied log.level")
        assert "mqtt.max_inflight_messages changed; it takes effect after a restart" \
            in broker.stderr
        config.write_text("[mqtt\nbroken")
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "keeping the running configuration")
        broker.process.send_signal(signal.SIGUSR1)
        wait_for_log(broker, "status: 1 clients connected")
        broker.process.send_signal(signal.SIGUSR2)
        client.ping()  # still served, on the same connection, after all of that
        assert broker.process.poll() is None
        client.close()
    finally:
        code = broker.stop()
    assert code == 0, broker.stderr


@pytest.mark.parametrize("delay_polls", [0, 1, 3])
def test_sigterm_during_start_up_is_a_clean_stop(tmp_path: Path, delay_polls: int) -> None:
    broker = BrokerProcess(tmp_path / "data")
    # Send SIGTERM as soon as the process logs anything (before or around "listening").
    deadline = time.monotonic() + 10
    polls = 0
    while not broker.stderr and time.monotonic() < deadline:
        time.sleep(0.005)  # polling interval, bounded by the deadline
    while polls < delay_polls and time.monotonic() < deadline:
        time.sleep(0.005)
        polls += 1
    broker.process.send_signal(signal.SIGTERM)
    code = broker.wait_exit()
    assert code == 0, broker.stderr
    assert "Traceback" not in broker.stderr


@needs_console_script
def test_a_config_error_reaches_the_journal_as_an_error(tmp_path: Path) -> None:
    """Under systemd stderr is the journal (JOURNAL_STREAM names it): the line carries the
    priority prefix <3>, so `journalctl -p warning` shows it."""
    config = tmp_path / "bad.toml"
    config.write_text("[mqtt]\nmax_qos = 7\n")
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as err:
        status = os.fstat(err.fileno())
        result = subprocess.run(
            [str(EDGE_BROKER), "--config", str(config)], stderr=err, stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, timeout=60,
            env={**clean_env(), "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    assert result.returncode == 2
    lines = stderr_path.read_text().splitlines()
    assert lines and lines[-1].startswith("<3>edge-broker: error: "), lines
    assert "[mqtt] max_qos" in lines[-1]
