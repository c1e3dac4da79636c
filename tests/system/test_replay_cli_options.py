"""`edge-broker replay` and `streams` options that must fail loudly, and where a replay through
the broker ends; no broker process here (the commands run in this process, `cli.main`, and the
broker's admin socket is replaced by a fake where one is needed).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from edge_broker import cli_streams
from edge_broker.config import Config, load_config
from edge_broker.server.streams import REPLAY_PAGE_MAX
from tests.integration.brokerprocess import run_in_process

CONFIG = """
[[streams]]
name = "telemetry"
filter = "sensors/#"

[[bridges]]
name = "central"
kind = "jetstream"
servers = ["nats://127.0.0.1:1"]
uplink = ["#"]
subject_prefix = "site1.gw7"
jetstream_stream = "EDGE"
stream_subjects = ["site1.>"]
enabled = false
"""


def run(*argv: str) -> tuple[int, str, str]:
    return run_in_process(*argv)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "edge-broker.toml"
    path.write_text(CONFIG + f'\n[broker]\ndata_dir = "{tmp_path / "data"}"\n')
    return path


@pytest.mark.parametrize("topic", ["sensors/#/x", "sensors/+x", "sensors/x#", "",
                                   "$share/g/sensors/#"])
@pytest.mark.parametrize("source", [("--stream", "telemetry"), ("--bridge", "central")])
def test_a_malformed_topic_filter_is_a_usage_error(config: Path, topic: str,
                                                   source: tuple[str, str]) -> None:
    code, out, err = run("replay", *source, "--from", "earliest", "--topic", topic,
                         "--config", str(config))
    assert (code, out) == (2, ""), err
    assert "--topic: expected an MQTT topic filter" in err and repr(topic) in err


@pytest.mark.parametrize("prefix", ["", "again/+", "again/#", "$SYS/again"])
def test_a_republish_prefix_that_is_no_topic_prefix_is_a_usage_error(config: Path,
                                                                     prefix: str) -> None:
    code, out, err = run("replay", "--stream", "telemetry", "--from", "earliest",
                         "--republish", prefix, "--config", str(config))
    assert (code, out) == (2, ""), err
    assert "--republish: expected a topic prefix" in err


@pytest.mark.parametrize("since", ["3600", "0", " 90 "])
def test_since_takes_whole_seconds(config: Path, since: str) -> None:
    # The store does not exist: past the options, the command fails on that (exit 1).
    code, _, err = run("replay", "--stream", "telemetry", "--since", since,
                       "--config", str(config))
    assert code == 1 and "--since" not in err and "no store at" in err, err


def test_since_refuses_what_is_no_duration(config: Path) -> None:
    for since, says in (("10m", "ambiguous"), ("-5", "expected a duration"),
                        ("1.5h", "expected a duration")):
        code, _, err = run("replay", "--stream", "telemetry", "--since", since,
                           "--config", str(config))
        assert code == 2 and "--since:" in err and says in err, err


def test_replay_has_no_json_flag_its_output_is_json(config: Path) -> None:
    code, _, err = run("replay", "--stream", "telemetry", "--from", "1", "--json",
                       "--config", str(config))
    assert code == 2 and "unrecognized arguments: --json" in err
    code, out, _ = run("replay", "--help")
    assert code == 0 and "--json" not in out and "--republish" in out
    code, out, _ = run("streams", "list", "--help")
    assert code == 0 and "--json" in out


def test_without_a_store_file_the_commands_say_so_and_fail(tmp_path: Path) -> None:
    """A mistyped --data-dir is not "no streams": as `sessions` and `store stats` do, the
    commands name the path they looked at and exit 1."""
    empty = tmp_path / "never-used"
    for args in (("streams", "list"), ("streams", "list", "--json"),
                 ("streams", "show", "telemetry"), ("streams", "delete", "telemetry", "--yes"),
                 ("replay", "--stream", "telemetry", "--from", "earliest")):
        code, out, err = run(*args, "--data-dir", str(empty))
        assert (code, out) == (1, ""), (args, err)
        assert f"no store at {empty / 'edge-broker.db'}" in err, err
    assert not empty.exists()  # reading did not create the data directory


class GrowingStream:
    """The admin socket of a broker whose stream grows while it is read: every page asked
    for appends `grow` rows first (publishers faster than the reader)."""

    def __init__(self, rows: int, grow: int) -> None:
        self.last = rows
        self.grow = grow
        self.limits: list[int] = []

    async def ask(self, config: Config, request: dict[str, Any]) -> dict[str, Any]:
        if request["command"] == "streams.show":
            return {"stream": {"name": "telemetry", "first_offset": 1,
                               "last_offset": self.last, "messages": self.last,
                               "bytes": self.last, "oldest_at": 0.0}}
        assert request["command"] == "streams.replay"
        self.last += self.grow
        self.limits.append(request["limit"])
        start = request["position"] if isinstance(request["position"], int) else 1
        offsets = range(start, min(start + request["limit"], self.last + 1))
        return {"rows": [{"offset": n, "payload": "x", "topic": "sensors/a"} for n in offsets]}


def test_a_replay_through_the_broker_ends_at_the_last_offset_when_it_started(
        config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = GrowingStream(rows=2500, grow=5000)
    monkeypatch.setattr(cli_streams, "_ask", broker.ask)

    request = {"command": "streams.replay", "stream": "telemetry", "position": "earliest",
               "topic": None}
    rows = cli_streams._rows_from_broker(load_config(str(config)), request, None)
    offsets = [row["offset"] for row in itertools.islice(rows, 20_000)]
    assert offsets == list(range(1, 2501))
    assert max(broker.limits) <= REPLAY_PAGE_MAX
