"""`edge-broker sessions list | show CLIENT | delete CLIENT` and `edge-broker store stats`, run
as the console script, as an operator runs them on a gateway:

- while a broker runs on the data directory, through its admin socket (live state; a deletion
  reaches its memory and its store, and a connected client is disconnected with 0x98);
- when no broker runs, from (and for `delete`, on) the store file directly.

The broker is a subprocess (tests/integration/brokerprocess.py) and the MQTT clients are
raw sockets. Exit codes: 0 success; 1 no such session.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from edge_broker import cli
from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_cli
from tests.integration.rawclient import (
    DISCONNECT,
    PUBACK,
    RawWill,
    connect,
    props,
    sub_options,
    subscriber,
    unique_id,
)

pytestmark = needs_console_script

EXPIRY_NEVER = 0xFFFFFFFF
EXIT_NOT_FOUND = 1
ADMINISTRATIVE_ACTION = 0x98


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def admin(data_dir: Path, *args: str, as_json: bool = False, flags_after: bool = False,
          process: bool = False) -> Result:
    """`edge-broker COMMAND [--data-dir DIR] [--json] ACTION [CLIENT]` (or with the flags at
    the end, `edge-broker store stats --json`).

    With `process`, the console script runs as a subprocess; otherwise `cli.main` runs in
    this process (the same code from argument parsing on, without half a second of imports
    per command)."""
    command, *action = args
    flags = ["--data-dir", str(data_dir), *(["--json"] if as_json else [])]
    argv = [command, *action, *flags] if flags_after else [command, *flags, *action]
    if process:
        done = run_cli(*argv)
        return Result(done.returncode, done.stdout, done.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return Result(code, out.getvalue(), err.getvalue())


def admin_json(data_dir: Path, *args: str, flags_after: bool = False,
               process: bool = False) -> Any:
    result = admin(data_dir, *args, as_json=True, flags_after=flags_after, process=process)
    assert result.returncode == 0, f"{args}: exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def admin_text(data_dir: Path, *args: str, process: bool = False) -> str:
    result = admin(data_dir, *args, process=process)
    assert result.returncode == 0, f"{args}: exit {result.returncode}: {result.stderr}"
    return result.stdout


def table_row(listing: str, client_id: str) -> list[str] | None:
    """The cells of `client_id`'s row in `sessions list` (columns are 2+ spaces apart)."""
    for line in listing.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == client_id:
            return cells
    return None


def assert_not_found(data_dir: Path, *args: str, process: bool = False) -> None:
    result = admin(data_dir, *args, process=process)
    assert result.returncode == EXIT_NOT_FOUND, (args, result.returncode, result.stderr)
    client_id = args[-1]
    assert result.stderr == f"edge-broker: no session {client_id!r}\n"


def publish_timed(port: int, messages: list[tuple[str, bytes]]) -> tuple[float, float]:
    """Publish QoS 1 messages (each acknowledged); returns the time window of the first."""
    publisher = connect(port, unique_id("pub"))
    before = time.time()
    after = 0.0
    for topic, payload in messages:
        assert publisher.publish_acked(topic, payload, qos=1) == 0
        after = after or time.time()
    publisher.disconnect()
    return before, after


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_list_show_and_stats_show_the_running_brokers_live_state(data_dir: Path) -> None:
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        offline_id, online_id = unique_id("offline"), unique_id("online")
        offline = subscriber(broker.port, offline_id, ("a/#", 1), version=4, clean=False)
        offline.disconnect()
        online = connect(broker.port, online_id, version=5, clean=False,
                         properties=props(session_expiry_interval=600),
                         will=RawWill("will/online", b"bye"))
        assert online.subscribe(("b/+", sub_options(2, no_local=True)),
                                properties=props(subscription_identifier=5)) == (2,)
        first = publish_timed(broker.port, [("a/1", b"x" * 10), ("a/2", b"y" * 20),
                                            ("a/3", b"z" * 30)])

        listing = admin_text(data_dir, "sessions", "list", process=True)
        assert table_row(listing, offline_id) == [offline_id, "offline", "3.1.1", "never",
                                                  "1", "3", "60", "0"], listing
        assert table_row(listing, online_id) == [online_id, "connected", "5.0", "600 s",
                                                 "1", "0", "0", "0"], listing
        assert f"from the broker running on {data_dir}" in listing

        sessions = {s["client_id"]: s for s in admin_json(data_dir, "sessions", "list")[
            "sessions"]}
        assert set(sessions) == {offline_id, online_id}
        assert sessions[offline_id] | {"disconnected_at": None} == {
            "client_id": offline_id, "connected": False, "protocol_level": 4,
            "expiry_interval": EXPIRY_NEVER, "disconnected_at": None, "subscriptions": 1,
            "queued_messages": 3, "queued_bytes": 60, "inflight": 0, "dropped": 0,
            "will_topic": None}
        assert sessions[offline_id]["disconnected_at"] <= first[0]
        assert sessions[online_id]["connected"] is True
        assert sessions[online_id]["will_topic"] == "will/online"

        shown = admin_text(data_dir, "sessions", "show", offline_id)
        assert "state: offline since" in shown
        assert "queued: 3 messages, 60 bytes" in shown
        assert "dropped by queue_full_policy: 0" in shown
        assert re.search(r"a/#\s+qos 1", shown)
        assert [m.group(1) for m in re.finditer(r"(a/\d)\s+qos 1\s+\d+ bytes", shown)] == [
            "a/1", "a/2", "a/3"], shown

        detail = admin_json(data_dir, "sessions", "show", online_id)["session"]
        assert detail["subscription_list"] == [
            {"topic_filter": "b/+", "qos": 2, "no_local": True, "retain_as_published": False,
             "retain_handling": 0, "subscription_id": 5}]
        assert detail["queue_preview"] == []
        preview = admin_json(data_dir, "sessions", "show", offline_id)["session"][
            "queue_preview"]
        assert [(q["topic"], q["qos"], q["bytes"]) for q in preview] == [
            ("a/1", 1, 10), ("a/2", 1, 20), ("a/3", 1, 30)]

        stats_text = admin_text(data_dir, "store", "stats")
        assert "sessions: 2" in stats_text
        assert "queued messages: 3 (60 bytes)" in stats_text
        assert re.search(r"oldest queued message: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stats_text)
        assert re.search(rf"file: {re.escape(str(data_dir / 'edge-broker.db'))}: \d+ bytes on "
                         r"disk, \d+ in use", stats_text), stats_text
        for flags_after in (False, True):  # `store --json stats` and `store stats --json`
            stats = admin_json(data_dir, "store", "stats", flags_after=flags_after,
                               process=flags_after)["stats"]
            assert (stats["sessions"], stats["queued_messages"], stats["queued_bytes"]) == (
                2, 3, 60)
            assert first[0] <= stats["oldest_message_at"] <= first[1]
            assert stats["store"]["file_bytes"] > 0
            assert stats["path"] == str(data_dir / "edge-broker.db")

        assert_not_found(data_dir, "sessions", "show", "nobody", process=True)
        assert_not_found(data_dir, "sessions", "delete", "nobody")
        online.ping()  # the broker is undisturbed
    finally:
        assert broker.stop() == 0, broker.stderr


def test_delete_through_the_running_broker_disconnects_and_forgets_the_session(
        data_dir: Path) -> None:
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        victim5, victim311, keeper = unique_id("v5"), unique_id("v311"), unique_id("keeper")
        watcher = subscriber(broker.port, unique_id("watcher"), ("will/#", 0))
        kept = subscriber(broker.port, keeper, ("k/#", 1), clean=False)
        kept.disconnect()
        v5 = connect(broker.port, victim5, version=5, clean=False,
                     properties=props(session_expiry_interval=600),
                     will=RawWill("will/v5", b"deleted"))
        assert v5.subscribe(("v/#", sub_options(1))) == (1,)
        v311 = subscriber(broker.port, victim311, ("v/#", 1), clean=False)
        publish_timed(broker.port, [("v/1", b"one"), ("v/2", b"two"), ("k/1", b"kept")])
        for client in (v5, v311):  # received, not acknowledged: in flight
            assert [client.expect_publish().payload for _ in range(2)] == [b"one", b"two"]

        stats = admin_json(data_dir, "store", "stats")["stats"]
        sessions_before = stats["sessions"]
        assert stats["queued_messages"] == 5  # 2 + 2 in flight, 1 queued for the keeper
        result = admin(data_dir, "sessions", "delete", victim5, process=True)
        assert result.returncode == 0, result.stderr
        assert f"session {victim5} deleted" in result.stdout
        # 3.14.2.1 (5.0): the server closes the connection with Administrative action.
        assert v5.expect(DISCONNECT).reason_code == ADMINISTRATIVE_ACTION
        v5.expect_closed()
        assert watcher.expect_publish().payload == b"deleted"  # the session ended: its will
        assert admin(data_dir, "sessions", "delete", victim311).returncode == 0
        v311.expect_closed()  # 3.1.1 has no DISCONNECT from the server: just closed

        for gone in (victim5, victim311):
            assert_not_found(data_dir, "sessions", "show", gone)
            assert_not_found(data_dir, "sessions", "delete", gone)
        listing = admin_text(data_dir, "sessions", "list")
        assert table_row(listing, victim5) is None and table_row(listing, victim311) is None
        assert table_row(listing, keeper) is not None
        stats = admin_json(data_dir, "store", "stats")["stats"]
        assert (stats["sessions"], stats["queued_messages"]) == (sessions_before - 2, 1)
        watcher.ping()
        watcher.expect_nothing()  # the will went once
    finally:
        assert broker.stop() == 0, broker.stderr

    # The store file agrees (read directly, no broker running) ...
    listing = admin_text(data_dir, "sessions", "list", process=True)
    assert "(no broker is running)" in listing
    assert table_row(listing, victim5) is None and table_row(listing, victim311) is None
    assert_not_found(data_dir, "sessions", "show", victim5)
    stats = admin_json(data_dir, "store", "stats")["stats"]
    assert (stats["sessions"], stats["queued_messages"], stats["queued_bytes"]) == (1, 1, 4)

    # ... and so does the next broker: the deleted sessions and their queues are gone.
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        for victim, version in ((victim5, 5), (victim311, 4)):
            again = connect(broker.port, victim, version=version, clean=False,
                            properties=props(session_expiry_interval=600) if version == 5
                            else b"\x00")
            assert not again.connack.session_present
            again.ping()
            again.expect_nothing()
        kept = connect(broker.port, keeper, clean=False)
        assert kept.connack.session_present
        message = kept.expect_publish()
        assert message.payload == b"kept"
        kept.ack(PUBACK, message.packet_id or 0)
    finally:
        assert broker.stop() == 0, broker.stderr


def test_commands_read_and_change_the_store_file_of_a_stopped_broker(data_dir: Path) -> None:
    broker = BrokerProcess(data_dir).wait_listening()
    keeper, doomed = unique_id("keeper"), unique_id("doomed")
    try:
        subscriber(broker.port, keeper, ("k/#", 1), clean=False).disconnect()
        doomed_client = connect(broker.port, doomed, version=5, clean=False,
                                properties=props(session_expiry_interval=3600))
        assert doomed_client.subscribe(("d/#", sub_options(1)),
                                       properties=props(subscription_identifier=3)) == (1,)
        doomed_client.disconnect()
        first = publish_timed(broker.port, [("k/1", b"k" * 100), ("d/1", b"d" * 7),
                                            ("k/2", b"k" * 200), ("d/2", b"d" * 9)])
    finally:
        assert broker.stop() == 0, broker.stderr
    db = data_dir / "edge-broker.db"

    listing = admin_text(data_dir, "sessions", "list")
    assert f"from {db} (no broker is running)" in listing
    assert table_row(listing, keeper) == [keeper, "offline", "3.1.1", "never", "1", "2", "300",
                                            "-"]
    assert table_row(listing, doomed) == [doomed, "offline", "5.0", "3600 s", "1", "2", "16",
                                            "-"]

    detail = admin_json(data_dir, "sessions", "show", doomed)["session"]
    assert detail["connected"] is False and detail["expiry_interval"] == 3600
    assert [(s["topic_filter"], s["qos"], s["subscription_id"])
            for s in detail["subscription_list"]] == [("d/#", 1, 3)]
    assert [(q["topic"], q["qos"], q["bytes"]) for q in detail["queue_preview"]] == [
        ("d/1", 1, 7), ("d/2", 1, 9)]
    shown = admin_text(data_dir, "sessions", "show", doomed)
    assert "queued: 2 messages, 16 bytes" in shown and re.search(r"d/#\s+qos 1\s+id 3", shown)

    stats_text = admin_text(data_dir, "store", "stats")
    assert "sessions: 2" in stats_text and "queued messages: 4 (316 bytes)" in stats_text
    assert f"file: {db}: " in stats_text
    stats = admin_json(data_dir, "store", "stats", flags_after=True)["stats"]
    assert (stats["sessions"], stats["queued_messages"], stats["queued_bytes"]) == (2, 4, 316)
    assert first[0] <= stats["oldest_message_at"] <= first[1]
    on_disk = db.stat().st_size + (Path(f"{db}-wal").stat().st_size
                                   if Path(f"{db}-wal").exists() else 0)
    assert stats["store"]["file_bytes"] == on_disk

    assert_not_found(data_dir, "sessions", "show", "nobody")
    assert_not_found(data_dir, "sessions", "delete", "nobody")
    result = admin(data_dir, "sessions", "delete", doomed, process=True)
    assert result.returncode == 0, result.stderr
    assert f"session {doomed} deleted" in result.stdout
    assert_not_found(data_dir, "sessions", "show", doomed)
    assert_not_found(data_dir, "sessions", "delete", doomed)
    stats = admin_json(data_dir, "store", "stats")["stats"]
    assert (stats["sessions"], stats["queued_messages"], stats["queued_bytes"]) == (1, 2, 300)

    # The broker starts on the changed file as it is.
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        gone = connect(broker.port, doomed, version=5, clean=False,
                       properties=props(session_expiry_interval=3600))
        assert not gone.connack.session_present
        gone.ping()
        gone.expect_nothing()
        kept = connect(broker.port, keeper, clean=False)
        assert kept.connack.session_present
        for payload in (b"k" * 100, b"k" * 200):
            message = kept.expect_publish()
            assert message.payload == payload
            kept.ack(PUBACK, message.packet_id or 0)
    finally:
        assert broker.stop() == 0, broker.stderr


def test_without_a_store_file_the_commands_say_so_and_fail(tmp_path: Path) -> None:
    """A data directory with no store is not "0 sessions" (which reads as "every session is
    lost"): the commands name the path they looked at and exit non-zero."""
    empty = tmp_path / "never-used"
    for args in (("sessions", "show", "nobody"), ("sessions", "delete", "nobody"),
                 ("sessions", "list"), ("store", "stats")):
        result = admin(empty, *args)
        assert result.returncode == EXIT_NOT_FOUND, (args, result)
        assert f"no store at {empty / 'edge-broker.db'}" in result.stderr, result.stderr
        assert result.stdout == ""
    assert not empty.exists()  # reading did not create the data directory


def test_the_flags_that_find_the_broker_may_come_before_the_command(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        connect(broker.port, "early-flags", clean=False).close()
        for argv in (["--data-dir", str(data_dir), "sessions", "list"],
                     ["sessions", "--data-dir", str(data_dir), "list"],
                     ["sessions", "list", "--data-dir", str(data_dir)]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                assert cli.main(argv) == 0, err.getvalue()
            assert "early-flags" in out.getvalue(), argv
    finally:
        assert broker.stop() == 0, broker.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        cli.main(["--port", "1884", "sessions", "list"])
    assert "--port: for running the broker only" in err.getvalue()
