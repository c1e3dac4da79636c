"""The installed `edge-broker` console script as a subprocess, for tests that need a real process
(exit codes, stderr, the data directory's lock, the admin CLI against a live broker).

The broker listens on port 0 (a free port the kernel picks, no race with other tests) and the
port is read from its log line "listening on 127.0.0.1:PORT". Waiting is deadline polling.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGE_BROKER = Path(sys.executable).parent / "edge-broker"
START_TIMEOUT_S = 10.0
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

needs_console_script = pytest.mark.skipif(
    not EDGE_BROKER.exists(),
    reason=f"{EDGE_BROKER} not found: install the package (pip install -e '.[test]')")


def clean_env() -> dict[str, str]:
    """The environment without systemd's variables (the broker would notify or log to them)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `edge-broker ARGS` to completion (admin commands, a start that must fail)."""
    return subprocess.run([str(EDGE_BROKER), *args], capture_output=True, text=True,
                          env=clean_env(), stdin=subprocess.DEVNULL, timeout=timeout)


def run_in_process(*argv: str) -> tuple[int, str, str]:
    """`edge-broker ARGV` in this process (`cli.main`): exit code, stdout, stderr (a usage
    error's SystemExit included)."""
    from edge_broker import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()


class BrokerProcess:
    """`edge-broker --host 127.0.0.1 --port 0 --data-dir DIR ARGS`; stderr goes to a file."""

    def __init__(self, data_dir: Path, *args: str, log_dir: Path | None = None,
                 env_extra: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        log_dir = log_dir or data_dir.parent
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"broker-{time.monotonic_ns()}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [str(EDGE_BROKER), "--host", "127.0.0.1", "--port", "0",
                 "--data-dir", str(data_dir), *args],
                env={**clean_env(), **(env_extra or {})}, stdout=subprocess.DEVNULL, stderr=err,
                stdin=subprocess.DEVNULL)
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> BrokerProcess:
        """Poll the log until the broker says where it listens; fail if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = _LISTENING.search(self.stderr)
            if found:
                self.port = int(found.group(1))
                return self
            if self.process.poll() is not None:
                pytest.fail(f"edge-broker exited with {self.process.returncode} before "
                            f"listening:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"edge-broker not listening after {timeout} s:\n{self.stderr}")
            time.sleep(0.02)  # polling interval, bounded by the deadline

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"edge-broker still running after {timeout} s:\n{self.stderr}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (a graceful stop) and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
