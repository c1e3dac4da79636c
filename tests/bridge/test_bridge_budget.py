"""Issue 8's one disk budget with a bridge: `[storage] max_store_bytes` covers bridge backlogs
too, and a bridge's backlog gives way (its oldest skipped, drop-oldest being a bridge's
policy, counted in `dropped` and logged) instead of new QoS 1 work being refused (0x97).

A bridge whose uplink is down since boot (its nats-server not started yet) is fed several
times the budget by a device publishing QoS 1: every message is acknowledged (a short wait
while the backlog gives way is allowed, a refusal that lasts is not); when the server
appears, the newest messages arrive upstream, in order, and nothing older than them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from edge_broker.server import admin
from tests.bridge.gateway import Gateway, jetstream_bridge, stream_count, upstream, wait_until
from tests.bridge.servers import NatsServer
from tests.integration.brokerprocess import needs_console_script
from tests.integration.rawclient import connect, unique_id

pytestmark = needs_console_script

QUOTA_EXCEEDED = 0x97
BUDGET = 256 * 1024
SIZE = 1024


def test_a_bridge_backlog_gives_way_to_the_store_budget(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")  # its port is chosen; it is not started yet
    gateway = Gateway(tmp_path, jetstream_bridge([server.url]))
    text = gateway.config.read_text()
    gateway.config.write_text(text.replace("[storage]\n",
                                           f"[storage]\nmax_store_bytes = {BUDGET}\n", 1))
    gateway.start()
    try:
        publisher = connect(gateway.port, unique_id("dev"), version=5)
        count = 4 * BUDGET // SIZE  # four times the budget for the bridge alone
        for n in range(count):
            payload = b"%06d" % n + b"x" * (SIZE - 6)
            deadline = time.monotonic() + 10
            while (reason := publisher.publish_acked("sensors/d1/temp", payload)) != 0:
                assert reason == QUOTA_EXCEEDED, hex(reason)
                assert time.monotonic() < deadline, f"message {n} refused for 10 s"
                time.sleep(0.05)  # polling interval, bounded by the deadline
        publisher.disconnect()
        # A last step of giving way may still be running: read figures that hold together.
        status = wait_until(lambda: (s := gateway.status("central"))["dropped"]
                            + s["backlog_messages"] == count and s, 20, "drops counted")
        assert not status["connected"]
        assert status["dropped"] > 0 and status["backlog_messages"] > 0
        assert status["backlog_bytes"] < BUDGET
        metrics = asyncio.run(admin.admin_request(gateway.data_dir,
                                                  {"command": "status.show"}))["metrics"]
        assert metrics["edge_broker_store_budget_released_total{kind=bridge}"] > 0
        server.start()
        try:
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 60,
                       "the backlog drained")
            dropped = gateway.status("central")["dropped"]
            wait_until(lambda: stream_count(server.url) >= count - dropped, 20,
                       "everything kept is upstream")
            numbers = [int(r["payload"][:6]) for r in upstream(gateway.bridge_config("central"))]
            # The newest, in order: the oldest gave way, nothing after them was lost, and
            # every acknowledged message is either upstream or counted as dropped.
            assert numbers == list(range(dropped, count))
            metrics = asyncio.run(admin.admin_request(
                gateway.data_dir, {"command": "status.show"}))["metrics"]
            assert metrics["edge_broker_store_budget_released_total{kind=bridge}"] == dropped
        finally:
            server.stop()
    finally:
        gateway.stop()
    assert "store budget: bridge:central gave way" in gateway.log  # logged, not silent
