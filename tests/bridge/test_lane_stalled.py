"""Issue 9, S1 with every message uplinked: the QoS 0 lane keeps every message while the
uplink process does not keep up (docs/bridges.md "The QoS 0 lane"). The broker appends the
lane's messages to the lane's file itself, so a process that reads nothing for a while (here
stopped with SIGSTOP) makes no message drop: the backlog waits in the file, counted in
`bridges status`, and is forwarded when the process runs again - every message once, in
order. (Before, the broker sent them to the process over its socket and dropped a loop
turn's messages whenever more than 8 MiB were buffered towards the process.)

The messages go in chunks well below what may wait for the lane file's writer thread (16
MiB), each once the writer wrote the one before: a slow disk is another matter (beyond
that bound the broker drops, by design), and in one burst of 16 MB this test failed now
and then on a loaded machine, with "the writer is behind" drops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from tests.bridge.gateway import (
    Gateway,
    assert_in_order_once,
    jetstream_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import NatsServer
from tests.integration.brokerprocess import needs_console_script
from tests.integration.rawclient import connect

pytestmark = needs_console_script

MESSAGES = 40_000
PAYLOAD = 400  # 40,000 x 400 B: about twice the 8 MiB the broker used to buffer
CHUNK = 5_000  # about 2 MB: far below the 16 MiB that may wait for the lane's writer


def _written(lane: Path) -> int:
    """Messages in the lane file's rows: what the broker's writer thread committed (none
    is deleted while the process is stopped: nothing is acknowledged)."""
    with contextlib.closing(sqlite3.connect(f"file:{quote(str(lane))}?mode=ro",
                                            uri=True)) as db:
        return int(db.execute("SELECT COALESCE(SUM(count), 0) FROM lane").fetchone()[0])


def test_a_stalled_uplink_process_loses_no_lane_message(nats_server: NatsServer,
                                                        tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url],
                                                 separate_process="true")).start()
    sent: list[tuple[str, bytes]] = []
    pid = 0
    try:
        pid = wait_until(lambda: gateway.status("central")["uplink_process"], 20,
                         "the uplink process started")
        wait_until(lambda: gateway.status("central")["connected"], 20, "connected")
        os.kill(pid, signal.SIGSTOP)  # it reads nothing from now on
        lane = gateway.data_dir / "edge-broker.db.lane-central"
        client = connect(gateway.port, "dev1")
        for n in range(MESSAGES):
            topic = f"sensors/d{n % 4}/temp"
            payload = f"{n:0{PAYLOAD}d}".encode()
            client.publish(topic, payload)
            sent.append((topic, payload))
            if len(sent) % CHUNK == 0:
                client.publish_acked("other/sync", b"")  # the QoS 0 ones were handled
                wait_until(lambda: _written(lane) >= len(sent), 60,
                           f"the lane's writer wrote {len(sent)} messages")
        status = wait_until(lambda: (s := gateway.status("central"))["backlog_messages"]
                            + s["forwarded"] + s["dropped"] >= MESSAGES and s, 30,
                            "all in the backlog or counted")
        assert status["dropped"] == 0, status
        os.kill(pid, signal.SIGCONT)
        pid = 0
        # (`forwarded` comes with the process's status, at most 0.2 s later.)
        status = wait_until(lambda: (s := gateway.status("central"))["backlog_messages"] == 0
                            and s["forwarded"] >= MESSAGES
                            and stream_count(nats_server.url) >= MESSAGES and s, 120,
                            "the backlog forwarded")
        assert status["dropped"] == 0
        client.close()
        rows = upstream(gateway.bridge_config("central"))
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=False)
