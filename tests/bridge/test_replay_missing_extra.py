"""`edge-broker replay --bridge` without the bridge's extra package (nats-py, aiokafka): the
one line `run` and `check-config` print, naming the `pip install` (bridge/config.py
`require_extras`), exit 2, no traceback; also for a bridge with `enabled = false` (replay
reads it all the same). The missing module is simulated in this process: `None` in
`sys.modules` makes its import fail as if it were not installed.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
from pathlib import Path

import pytest

from edge_broker import cli

JETSTREAM = ('[[bridges]]\nname = "central"\nkind = "jetstream"\n'
             'servers = ["nats://127.0.0.1:9"]\nuplink = ["#"]\nsubject_prefix = "site1.gw7"\n'
             'jetstream_stream = "EDGE"\n')
KAFKA = ('[[bridges]]\nname = "lake"\nkind = "kafka"\nservers = ["127.0.0.1:9"]\n'
         'topic_map = [{ filter = "#", topic = "edge.telemetry" }]\n')


def replay(tmp_path: Path, bridges: str, name: str) -> tuple[int | None, str, str]:
    config = tmp_path / "edge-broker.toml"
    config.write_text(f'[broker]\ndata_dir = "{tmp_path / "data"}"\ngateway_id = "gw7"\n\n'
                      f"{bridges}")
    out, err = io.StringIO(), io.StringIO()
    code: int | None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["replay", "--bridge", name, "--from", "earliest",
                             "--config", str(config)])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        except Exception:  # what reaches the user as a traceback
            traceback.print_exc()
            code = None
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_replay_without_nats_py_names_the_pip_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enabled: str) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # `import nats` fails: not installed
    code, out, err = replay(tmp_path, JETSTREAM + f"enabled = {enabled}\n" + KAFKA, "central")
    assert "Traceback" not in err, err
    assert (code, out) == (2, "")
    (line,) = err.splitlines()
    assert line.startswith("edge-broker: error: ")
    assert '[[bridges]] #1 "central" kind: the "jetstream" bridge needs' in line
    assert line.endswith("install it with: pip install nats-py")


def test_replay_without_aiokafka_names_the_pip_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiokafka", None)
    monkeypatch.setitem(sys.modules, "nats", None)  # another bridge's extra: not asked for
    code, out, err = replay(tmp_path, JETSTREAM + KAFKA + "enabled = false\n", "lake")
    assert "Traceback" not in err, err
    assert (code, out) == (2, "")
    (line,) = err.splitlines()
    assert '[[bridges]] #2 "lake" kind: the "kafka" bridge needs' in line
    assert line.endswith("install it with: pip install aiokafka")
