"""A bridge's `max_backlog_bytes` drops in the log: at most one line per 10 s, and the drops
after the last line are logged when the bridge closes, so the lines add up to the count
`bridges status` shows (a stop inside the interval used to leave them out)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from edge_broker.bridge.config import parse_bridges
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import connect, unique_id

# A closed port: the uplink stays down (backing off for a minute), so the backlog only grows.
TABLE = {"name": "central", "kind": "mqtt", "servers": ["mqtt://127.0.0.1:9"],
         "topics": ['sensors/# out 1 "" gw7/'], "max_backlog_bytes": 4096,
         "backoff_initial": "1min", "backoff_max": "1min"}
PREFIX = "bridge central: backlog over max_backlog_bytes (4096): "


def test_every_backlog_drop_is_in_the_log_when_the_bridge_closes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    base = broker_config(tmp_path)
    config = dataclasses.replace(base, bridges=parse_bridges([TABLE], file="test.toml",
                                                              gateway_id="gw7"))
    broker = BrokerThread(config).start()
    try:
        device = connect(broker.port, unique_id("dev"), version=5)
        for n in range(12):
            assert device.publish_acked("sensors/d1/temp", b"%04d" % n * 256) == 0
        device.disconnect()

        def dropped() -> Any:
            assert broker.app is not None
            (status,) = broker.app.bridges.status()
            return status.to_dict()["dropped"]

        count = broker.call(dropped)
        assert count >= 2  # more than the first line logs at once
    finally:
        broker.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(PREFIX)]
    assert sum(int(line[len(PREFIX):].split()[0]) for line in lines) == count, lines
