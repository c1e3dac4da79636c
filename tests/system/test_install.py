"""deploy/install.sh run for real into a throwaway root: install twice (idempotent), then
uninstall keeping the data, then purge.

`--root DIR` installs below DIR without creating the service user or touching systemd, which
is what lets a test (or an image build) run it without owning the machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    # The base interpreter of this venv creates the gateway's venv, as python3 would.
    python = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
    result = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                            timeout=600, env={"PATH": "/usr/local/bin:/usr/bin:/bin",
                                              "PYTHON": python, "HOME": str(Path.home()),
                                              # what install.sh does is tested here; the
                                              # compiled build has its own test
                                              "EDGE_BROKER_COMPILE": "0"})
    assert result.returncode == 0, f"install.sh {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def test_install_twice_then_uninstall_then_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = run_install("--root", str(root), "--no-start")
    venv_bin = root / "opt/edge-broker/.venv/bin"
    config = root / "etc/edge-broker/edge-broker.toml"
    unit = root / "etc/systemd/system/edge-broker.service"
    assert (venv_bin / "edge-broker").exists(), first.stdout
    assert config.read_text() == (REPO / "deploy/edge-broker.toml").read_text()
    assert unit.read_text() == (REPO / "deploy/edge-broker.service").read_text()
    version = subprocess.run([str(venv_bin / "edge-broker"), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and "edge-broker" in version.stdout + version.stderr

    # An operator's edits survive a second run (an upgrade); the program is reinstalled.
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    edited = config.read_text()
    second = run_install("--root", str(root), "--no-start")
    assert "keeping the existing" in second.stdout
    assert config.read_text() == edited
    assert (venv_bin / "edge-broker").exists()

    data = root / "var/lib/edge-broker"
    data.mkdir(parents=True)
    (data / "edge-broker.db").write_bytes(b"stands for the store")
    removed = run_install("--root", str(root), "--uninstall")
    assert not (root / "opt/edge-broker").exists()
    assert not unit.exists()
    assert config.read_text() == edited, "uninstall must keep the configuration"
    assert (data / "edge-broker.db").exists(), "uninstall must keep the data"
    assert "--purge" in removed.stdout

    run_install("--root", str(root), "--uninstall", "--purge")
    assert not (root / "etc/edge-broker").exists()
    assert not data.exists()


def test_purge_alone_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path), "--purge"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--purge goes with --uninstall" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not found (the unit is checked where systemd is)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's console script.
    edge_broker = Path(sys.executable).parent / "edge-broker"
    unit = (REPO / "deploy/edge-broker.service").read_text()
    assert "/opt/edge-broker/.venv/bin/edge-broker" in unit
    copy = tmp_path / "edge-broker.service"
    copy.write_text(unit.replace("/opt/edge-broker/.venv/bin/edge-broker", str(edge_broker)))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, and only says so: no output is a pass.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for directive in ("Type=notify", "WatchdogSec=", "ExecReload=", "ProtectSystem=strict",
                      "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "MemoryMax=",
                      "StateDirectory=", "ConfigurationDirectory=",
                      "RestartPreventExitStatus=2"):
        assert directive in unit, directive
