"""Issue 9, the QoS 0 lane's order per topic across a restart of the uplink process while
the lane file's writer thread is behind (through the real broker, a subprocess, and a real
nats-server): the rows the broker appended while the first process ran, still queued for
its writer thread when the process ended, were published before the messages the broker
then put in its log (no process ran); they must reach the remote side first."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from tests.bridge.gateway import (
    Gateway,
    assert_in_order_once,
    separate_jetstream_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import NatsServer
from tests.bridge.test_qos0_lane import _process, _publish_qos0
from tests.integration.brokerprocess import needs_console_script
from tests.integration.rawclient import connect

pytestmark = needs_console_script


def test_rows_queued_for_the_writer_at_a_restart_go_before_the_logs(
        nats_server: NatsServer, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, separate_jetstream_bridge(nats_server.url)).start()
    sent: list[tuple[str, bytes]] = []
    try:
        first = _process(gateway)
        client = connect(gateway.port, "dev1")
        _publish_qos0(client, sent, 0, 100)
        wait_until(lambda: stream_count(nats_server.url) == 100, 30, "lane forwarded")
        # Another connection holds the lane file's write lock: the broker's writer thread
        # waits in SQLite's busy handler (5 s) with the next rows - a writer behind.
        # (By its name: a glob of "*.lane-*" also finds its -wal and -shm files.)
        lane_path = gateway.data_dir / "edge-broker.db.lane-central"
        holder = sqlite3.connect(lane_path, isolation_level=None, timeout=0)
        with contextlib.closing(holder):
            holder.execute("BEGIN IMMEDIATE")
            held_from = time.monotonic()
            _publish_qos0(client, sent, 100, 200)  # the lane: queued for the writer
            os.kill(first, signal.SIGKILL)
            # (The restart delay has full jitter: the next process may have started.)
            wait_until(lambda: gateway.status("central")["uplink_process"] != first, 20,
                       "the broker saw the process end")
            _publish_qos0(client, sent, 300, 200)  # into the log (no lane open)
            wait_until(lambda: gateway.status("central")["uplink_process"] not in
                       (None, first), 20, "the process started again")
            # Given up to two seconds, the new process would send the log's rows before
            # the lane rows still queued (published before them). Less when the steps
            # above took long (a loaded machine): the lock goes before the writer's busy
            # handler gives up (5 s, sqlite3's default timeout), or the queued rows would
            # fail, lost, and the stream never count 500.
            deadline = min(time.monotonic() + 2.0, held_from + 4.0)
            while time.monotonic() < deadline and stream_count(nats_server.url) < 300:
                time.sleep(0.05)
            holder.execute("ROLLBACK")
        wait_until(lambda: stream_count(nats_server.url) == 500, 30, "everything forwarded")
        client.close()
        rows = upstream(gateway.bridge_config("central"))
    finally:
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=False)
