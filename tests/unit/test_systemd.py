"""sd_notify over a real AF_UNIX datagram socket, and the watchdog interval."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_broker.server import systemd


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # A unix socket path must fit in 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="eb-sd-"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def systemd_socket(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket playing systemd's part, named by $NOTIFY_SOCKET."""
    path = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_without_notify_socket_nothing_is_sent() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False


def test_notify_sends_the_state_as_one_datagram(systemd_socket: socket.socket) -> None:
    assert systemd.notify("READY=1\nSTATUS=listening") is True
    assert systemd_socket.recv(4096) == b"READY=1\nSTATUS=listening"


def test_helpers_send_the_standard_states(systemd_socket: socket.socket) -> None:
    assert systemd.ready()
    assert systemd.watchdog()
    assert systemd.status("2 listeners\nup")
    assert systemd.stopping()
    received = [systemd_socket.recv(4096) for _ in range(4)]
    assert received == [b"READY=1", b"WATCHDOG=1", b"STATUS=2 listeners up", b"STOPPING=1"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-broker-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_a_vanished_socket_returns_false_without_raising(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "gone"))
    assert systemd.ready() is False


def test_an_unsupported_address_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False


# --------------------------------------------------------------------------- watchdog


def test_no_watchdog_without_the_variable() -> None:
    assert systemd.watchdog_interval_s() is None


def test_watchdog_interval_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == 30.0


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() is None


@pytest.mark.parametrize("value", ["0", "-5", "soon", ""])
def test_invalid_watchdog_values_are_ignored(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", value)
    assert systemd.watchdog_interval_s() is None
