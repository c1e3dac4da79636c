"""Start-up (S8, issue 8): what `edge-broker run` imports before it answers its first CONNECT,
and the cheap replacements for the modules it no longer imports (the installed version, the
assigned client identifiers)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from edge_broker import cli, dist
from edge_broker.server.app import broker_version, uuid4_text

REPO = Path(__file__).resolve().parents[2]

# Imported by nothing the broker runs before its listeners open: each was a measurable part
# of the start-up (importlib.metadata about 45 ms of CPU, uuid about 8 ms).
NOT_AT_STARTUP = ("importlib.metadata", "uuid", "email", "zipfile")


def test_the_server_start_up_does_not_import_the_slow_modules() -> None:
    # A fresh interpreter, as `python -m edge_broker` starts: the command's parser, the
    # version for the "starting" log line, the server and its store.
    code = ("import sys, json; import edge_broker.cli as c; c.build_parser(); c.version(); "
            "import edge_broker.server.app as a; a.broker_version(); a.uuid4_text(); "
            "import edge_broker.store.sqlite, edge_broker.server.listeners; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    loaded = set(json.loads(out))
    assert [m for m in NOT_AT_STARTUP if m in loaded] == []


def test_installed_version_is_what_importlib_metadata_says() -> None:
    try:
        expected: str | None = metadata.version("edge-broker")
    except metadata.PackageNotFoundError:
        expected = None
    assert dist.installed_version() == expected
    assert broker_version() == (expected or "0+unknown")
    assert cli.version() == (expected or "unknown (not installed)")


def test_installed_version_reads_the_dist_info_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edge_broker-9.8.7.dist-info").mkdir()
    (tmp_path / "edge_broker-9.8.7.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: edge-broker\nVersion: 9.8.7\n")
    (tmp_path / "other_package-1.0.dist-info").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(tmp_path)])
    assert dist.installed_version() == "9.8.7"


def test_installed_version_without_an_installation_is_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert dist.installed_version() is None


def test_version_flag_prints_the_version_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == f"edge-broker {cli.version()}\n"
    assert captured.err == ""


def test_assigned_client_ids_are_random_version_4_uuids() -> None:
    ids = {uuid4_text() for _ in range(1000)}
    assert len(ids) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # the canonical form, lower case, as str(uuid4())
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
