"""Bit rot in single rows of a sound store file (`PRAGMA quick_check` still says ok): the broker
starts, quarantines the bad row and what cannot stand without it, says so in its log (table,
client, row key, reason), and serves every other session's messages.

A real store is written by a real broker (tests/integration/brokerprocess.py) with three
persistent sessions subscribed to `d/#` (one MQTT 5, one 3.1.1, and the "victim", MQTT 5 with a
also subscribed to `v/#`, connected while the messages arrive so that they are delivery rows),
N messages on `d/...` and one on `v/only` (once per module: each case gets a copy of that
store). One kind of damage is then written with sqlite3 into the victim's rows, and the broker
is started again.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_cli
from tests.integration.rawclient import connect, props, subscriber
from tests.integration.test_restart import assert_silent, persistent, receive

pytestmark = needs_console_script

N = 6
GOOD = {"good-v5": 5, "good-v311": 4}
VICTIM = "victim"
ONLY = "(SELECT id FROM messages WHERE topic = 'v/only')"
FIRST = "(SELECT min(delivery_id) FROM deliveries WHERE client_id = 'victim')"
DELIVERY = f"client_id = 'victim' AND delivery_id = {FIRST}"

# name: (damage, table of the bad row, messages the victim still gets, session kept)
CASES: dict[str, tuple[str, str, int, bool]] = {
    "properties_not_json": (
        f"UPDATE messages SET properties = '{{\"3\":\"text/pl' WHERE id = {ONLY}",
        "messages", N, True),
    "payload_as_text": (
        f"UPDATE messages SET payload = CAST(payload AS TEXT) WHERE id = {ONLY}",
        "messages", N, True),
    "topic_not_utf8": (
        f"UPDATE messages SET topic = CAST(X'762fff6f6e6c79' AS TEXT) WHERE id = {ONLY}",
        "messages", N, True),
    "property_that_does_not_belong": (
        f"UPDATE messages SET properties = '{{\"19\":60}}' WHERE id = {ONLY}",
        "messages", N, True),
    "subscription_ids_garbage": (
        f"UPDATE deliveries SET subscription_ids = '1,x' WHERE {DELIVERY}",
        "deliveries", N, True),
    "delivery_qos_7": (f"UPDATE deliveries SET qos = 7 WHERE {DELIVERY}", "deliveries", N, True),
    "delivery_state_9": (
        f"UPDATE deliveries SET state = 9 WHERE {DELIVERY}", "deliveries", N, True),
    "packet_id_70000": (
        f"UPDATE deliveries SET packet_id = 70000, state = 1 WHERE {DELIVERY}",
        "deliveries", N, True),
    "will_topic_wildcard": (
        # (a DISCONNECT deleted the will [MQTT-3.1.2-10] (5.0): this writes one)
        "UPDATE sessions SET will_topic = 'will/#', will_payload = X'00', will_qos = 1,"
        " will_retain = 0 WHERE client_id = 'victim'",
        "sessions", N + 1, True),
    "username_not_text": (
        # (schema version 5) only its will is published with it: the will goes, not the session
        "UPDATE sessions SET username = X'00ff' WHERE client_id = 'victim'",
        "sessions", N + 1, True),
    "subscription_filter": (
        "UPDATE subscriptions SET topic_filter = 'v/#/x' WHERE client_id = 'victim'"
        " AND topic_filter = 'v/#'", "subscriptions", N + 1, True),
    "subscription_qos_3": (
        "UPDATE subscriptions SET qos = 3 WHERE client_id = 'victim' AND topic_filter = 'v/#'",
        "subscriptions", N + 1, True),
    "session_protocol_level": (
        "UPDATE sessions SET protocol_level = 9 WHERE client_id = 'victim'",
        "sessions", 0, False),
}


def write_store(data_dir: Path) -> None:
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        for client_id, version in GOOD.items():
            subscriber(broker.port, client_id, ("d/#", 1), version=version,
                       **persistent(version)).disconnect()
        # The victim stays connected with a Receive Maximum of 1 and reads nothing: its
        # messages are queued while its session is live, so they are delivery rows (those of
        # an offline session are the log's rows: core/backlog.py), one of them in flight.
        victim = subscriber(broker.port, VICTIM, ("d/#", 1), ("v/#", 1), version=5,
                            clean=False, properties=props(session_expiry_interval=600,
                                                          receive_maximum=1))
        publisher = connect(broker.port, "publisher", version=5)
        text = props(content_type="text/plain")
        for i in range(N):
            assert publisher.publish_acked(f"d/{i}", f"m{i}".encode(), properties=text) == 0
        assert publisher.publish_acked("v/only", b"only", properties=text) == 0
        publisher.disconnect()
    finally:
        assert broker.stop() == 0, broker.stderr
    victim.close()


@pytest.fixture(scope="module")
def sound_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """write_store's data dir, written once: every case damages its own copy of it."""
    data_dir = tmp_path_factory.mktemp("sound-store") / "data"
    write_store(data_dir)
    return data_dir


def quarantine(db: Path) -> list[tuple[str, str | None, str, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(
            "SELECT table_name, client_id, row_key, reason FROM quarantine ORDER BY id"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_row_is_quarantined_and_everything_else_served(
        tmp_path: Path, sound_store: Path, case: str) -> None:
    damage, table, victim_gets, session_kept = CASES[case]
    data_dir = tmp_path / "data"
    db = data_dir / "edge-broker.db"
    shutil.copytree(sound_store, data_dir)  # the store write_store wrote, stopped cleanly
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute(damage).rowcount == 1
        conn.commit()
        assert [r[0] for r in conn.execute("PRAGMA quick_check")] == ["ok"]

    broker = BrokerProcess(data_dir).wait_listening()
    try:
        log = broker.stderr
        assert "Traceback" not in log, log
        lines = [line for line in log.splitlines() if "quarantined" in line]
        assert any(f"quarantined {table}" in line for line in lines), log
        assert any(f"client {VICTIM}" in line for line in lines), log  # names the session
        for client_id, version in GOOD.items():  # the other sessions lose nothing
            client = connect(broker.port, client_id, version=version, **persistent(version))
            assert client.connack.session_present
            got = receive(client, N)
            assert [(p.topic, p.payload) for p in got] == [
                (f"d/{i}", f"m{i}".encode()) for i in range(N)]
            assert_silent(client)
            client.disconnect()
        victim = connect(broker.port, VICTIM, version=5, **persistent(5))
        assert victim.connack.session_present == session_kept
        got = receive(victim, victim_gets)  # and it is not disconnected on every connect
        assert len(got) == victim_gets
        assert_silent(victim)
        victim.disconnect()
    finally:
        assert broker.stop() == 0, broker.stderr

    rows = quarantine(db)
    assert any(t == table for t, _, _, _ in rows), rows
    assert any(c == VICTIM for _, c, _, _ in rows), rows
    stats = run_cli("store", "stats", "--data-dir", str(data_dir))
    assert stats.returncode == 0, stats.stderr
    assert f"quarantined rows: {len(rows)}" in stats.stdout, stats.stdout

    again = BrokerProcess(data_dir).wait_listening()  # nothing left to quarantine
    try:
        # A CONNACK means the broker is serving, with its SIGTERM handler installed.
        connect(again.port, VICTIM, version=5, **persistent(5)).disconnect()
        assert "quarantined" not in again.stderr, again.stderr
    finally:
        assert again.stop() == 0, again.stderr
    assert len(quarantine(db)) == len(rows)
