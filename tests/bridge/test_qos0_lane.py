"""Issue 9, S1 with every message uplinked: the QoS 0 lane (docs/bridges.md "The QoS 0
lane"), through the real broker (a subprocess), its uplink process and a real nats-server.

- While the uplink process runs, a QoS 0 message only the bridge takes is not appended to
  the broker's log: it goes to the process, which stores it in the lane's own file and
  forwards it with a message id of the lane's namespace (`<gateway>-<store id>q-<n>`).
- With the uplink down the lane's backlog is kept, counted in `bridges status`, across a
  restart of the broker and a SIGKILL of the process, and drains when the uplink returns:
  every message once (the same id after a resend), in order per topic.
- `max_backlog_bytes` bounds the lane: the oldest are dropped, counted and logged.
- While the process is not running, the broker appends those messages to its log as
  before: none is lost.
- QoS 1 messages still go through the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from tests.bridge.gateway import (
    Gateway,
    assert_in_order_once,
    kafka_bridge,
    separate_jetstream_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import NatsServer, Tansu
from tests.integration.brokerprocess import needs_console_script
from tests.integration.rawclient import RawClient, connect

pytestmark = needs_console_script

TOPICS = 4


def _publish_qos0(client: RawClient, sent: list[tuple[str, bytes]], start: int, count: int,
                  width: int = 0) -> None:
    for n in range(start, start + count):
        topic = f"sensors/d{n % TOPICS}/temp"
        payload = f"{n:0{width}d}".encode()
        client.publish(topic, payload)
        sent.append((topic, payload))
    # A QoS 1 PUBLISH no bridge takes: its PUBACK comes after the QoS 0 ones were handled.
    client.publish_acked("other/sync", b"")


def _log_rows(gateway: Gateway) -> int:
    with contextlib.closing(sqlite3.connect(gateway.data_dir / "edge-broker.db")) as db:
        return int(db.execute("SELECT COUNT(*) FROM log").fetchone()[0])


def _process(gateway: Gateway) -> int:
    pid: int = wait_until(lambda: gateway.status("central")["uplink_process"], 20,
                          "the uplink process started")
    return pid


def _ended(gateway: Gateway, pid: int) -> None:
    """Wait until the broker saw the process `pid` end: its status names another process,
    or none. (Not for none alone: the restart delay has full jitter, from 0 s, so the next
    process may have started between two polls - under load each poll takes a while.)"""
    wait_until(lambda: gateway.status("central")["uplink_process"] != pid, 20,
               "the broker saw the process end")


def _lane_ids(rows: list[dict[str, object]]) -> bool:
    return all(str(r["message_id"]).rsplit("-", 2)[1].endswith("q") for r in rows)


def test_qos0_goes_by_the_lane_not_the_log(nats_server: NatsServer, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, separate_jetstream_bridge(nats_server.url)).start()
    sent: list[tuple[str, bytes]] = []
    try:
        _process(gateway)
        wait_until(lambda: gateway.status("central")["connected"], 20, "connected")
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 2000)
        status = wait_until(lambda: (s := gateway.status("central"))["forwarded"] >= 2000
                            and s["backlog_messages"] == 0 and s, 30, "all forwarded")
        assert status["dropped"] == 0
        rows = upstream(gateway.bridge_config("central"))
        assert _log_rows(gateway) == 0  # nothing of it in the broker's log
        # QoS 1 still goes through the log, with the log's ids.
        client.publish_acked("sensors/q1", b"one")
        wait_until(lambda: stream_count(nats_server.url) == 2001, 20, "QoS 1 forwarded")
        assert _log_rows(gateway) == 1
        client.close()
    finally:
        gateway.stop()
    assert len(rows) == 2000 and _lane_ids(rows)
    assert_in_order_once(rows, sent, duplicates_allowed=False)


def test_lane_backlog_kept_across_restarts_then_drains(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")  # its port is chosen; not started yet
    gateway = Gateway(tmp_path, separate_jetstream_bridge(server.url)).start()
    sent: list[tuple[str, bytes]] = []
    try:
        _process(gateway)
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 1500)
        client.close()
        status = wait_until(lambda: (s := gateway.status("central"))["backlog_messages"]
                            == 1500 and s, 20, "the lane's backlog counted")
        assert not status["connected"] and status["backlog_bytes"] > 0
        assert _log_rows(gateway) == 0
        gateway.stop()
        gateway.start()
        first = _process(gateway)
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 1500, 20,
                   "the backlog kept across a broker restart")
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: gateway.status("central")["uplink_process"] not in (None, first),
                   30, "the process started again")
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 1500, 20,
                   "the backlog kept across a SIGKILL of the process")
        server.start()
        try:
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0
                       and stream_count(server.url) >= 1500, 60, "the backlog drained")
            rows = upstream(gateway.bridge_config("central"))
        finally:
            server.stop()
    finally:
        gateway.stop()
    assert _lane_ids(rows)
    assert_in_order_once(rows, sent, duplicates_allowed=False)


def test_lane_bounded_by_max_backlog_bytes(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    bound = 64 * 1024
    bridges = separate_jetstream_bridge(server.url, max_backlog_bytes=str(bound))
    gateway = Gateway(tmp_path, bridges).start()
    sent: list[tuple[str, bytes]] = []
    try:
        _process(gateway)
        client = connect(gateway.port, "dev1")
        for start in range(0, 3000, 100):  # in several lane batches
            _publish_qos0(client, sent, start, 100, width=100)
        client.close()
        status = wait_until(lambda: (s := gateway.status("central"))["dropped"] > 0
                            and s["backlog_messages"] + s["dropped"] == 3000 and s, 20,
                            "drops counted")
        kept = status["backlog_messages"]
        assert 0 < kept < 3000
        server.start()
        try:
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0
                       and stream_count(server.url) >= kept, 60, "the backlog drained")
            rows = upstream(gateway.bridge_config("central"))
        finally:
            server.stop()
    finally:
        gateway.stop()
    numbers = [int(r["payload"]) for r in rows]
    assert numbers == list(range(3000 - kept, 3000))  # the newest kept, in order
    assert "QoS 0 lane over max_backlog_bytes" in gateway.log  # logged, not silent


def test_while_the_process_is_down_the_log_takes_them(nats_server: NatsServer,
                                                      tmp_path: Path) -> None:
    # A restart delay long enough to publish while no process runs.
    bridge = separate_jetstream_bridge(nats_server.url).replace('backoff_initial = "1s"',
                                                'backoff_initial = "5s"').replace(
        'backoff_max = "1s"', 'backoff_max = "5s"')
    gateway = Gateway(tmp_path, bridge).start()
    sent: list[tuple[str, bytes]] = []
    try:
        first = _process(gateway)
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 500)
        wait_until(lambda: stream_count(nats_server.url) == 500, 30, "lane forwarded")
        os.kill(first, signal.SIGKILL)
        _ended(gateway, first)
        _publish_qos0(client, sent, 500, 500)  # no process: into the broker's log
        if gateway.status("central")["uplink_process_starts"] == 1:
            # (The restart delay has full jitter: only when it did not end meanwhile.)
            wait_until(lambda: _log_rows(gateway) == 500, 20, "appended to the log")
        wait_until(lambda: stream_count(nats_server.url) == 1000, 60,
                   "forwarded from the log by the next process")
        client.close()
        rows = upstream(gateway.bridge_config("central"))
    finally:
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=False)


def test_order_per_topic_across_the_log_and_the_lane(tmp_path: Path) -> None:
    # Uplink down: a lane backlog (first process), QoS 0 messages into the broker's log
    # while no process runs (after a SIGKILL), then the lane again (second process). When
    # the uplink returns, each topic's messages arrive in the order published.
    server = NatsServer(tmp_path / "nats")
    bridge = separate_jetstream_bridge(server.url).replace('backoff_initial = "1s"',
                                           'backoff_initial = "5s"').replace(
        'backoff_max = "1s"', 'backoff_max = "5s"')
    gateway = Gateway(tmp_path, bridge).start()
    sent: list[tuple[str, bytes]] = []
    try:
        first = _process(gateway)
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 600)
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 600, 20,
                   "the lane's backlog")
        os.kill(first, signal.SIGKILL)
        _ended(gateway, first)
        # Into the log while no process runs (unless the restart delay, full jitter from
        # 0 s, ended already: then the lane's, which keeps the order all the same).
        _publish_qos0(client, sent, 600, 600)
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 1200, 20,
                   "the second 600 in a backlog")
        if gateway.status("central")["uplink_process_starts"] == 1:
            # No process since the kill while the broker took them: all in the log (the
            # case this test is for; else, rarely, the restart came first: the lane's).
            assert _log_rows(gateway) == 600
        wait_until(lambda: gateway.status("central")["uplink_process"] not in (None, first),
                   30, "the process started again")
        _publish_qos0(client, sent, 1200, 600)  # the lane again
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 1800, 20,
                   "everything in a backlog")
        client.close()
        server.start()
        try:
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0
                       and stream_count(server.url) >= 1800, 60, "the backlog drained")
            rows = upstream(gateway.bridge_config("central"))
        finally:
            server.stop()
    finally:
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=False)


def test_kafka_lane(tansu: Tansu, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, kafka_bridge([tansu.bootstrap], separate_process="true")).start()
    sent: list[tuple[str, bytes]] = []
    try:
        wait_until(lambda: gateway.status("lake")["uplink_process"], 20, "process started")
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 500)
        client.close()
        wait_until(lambda: (s := gateway.status("lake"))["forwarded"] >= 500
                   and s["backlog_messages"] == 0, 60, "all forwarded")
        rows = wait_until(lambda: len(r := upstream(gateway.bridge_config("lake"))) >= 500
                          and r, 30, "all upstream")
        assert _log_rows(gateway) == 0
    finally:
        gateway.stop()
    assert _lane_ids(rows)
    assert_in_order_once(rows, sent, duplicates_allowed=True)  # Kafka keeps resends


def test_a_lane_file_that_cannot_be_opened_sends_qos0_by_the_log(nats_server: NatsServer,
                                                                 tmp_path: Path) -> None:
    """A damaged lane file stops neither the bridge nor its QoS 0 messages: they take the
    store's log (as while no process runs), and the log names the file."""
    gateway = Gateway(tmp_path, separate_jetstream_bridge(nats_server.url))
    gateway.data_dir.mkdir(parents=True, exist_ok=True)
    lane = gateway.data_dir / "edge-broker.db.lane-central"
    lane.write_bytes(b"not a database, " * 512)
    gateway.start()
    sent: list[tuple[str, bytes]] = []
    try:
        _process(gateway)
        wait_until(lambda: gateway.status("central")["connected"], 20, "connected")
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 500)
        wait_until(lambda: stream_count(nats_server.url) == 500, 30, "all forwarded")
        assert _log_rows(gateway) == 500  # by the log
        client.close()
        rows = upstream(gateway.bridge_config("central"))
    finally:
        gateway.stop()
    assert f"{lane}: cannot open the QoS 0 lane file" in gateway.log
    assert_in_order_once(rows, sent, duplicates_allowed=False)
