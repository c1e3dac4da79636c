"""A bridge's `max_backlog_bytes` drops in the log: at most one line per 10 s, and the drops
after the last line are logged when the bridge closes, so the lines add up to the count
`bridges status` shows (a stop inside the interval used to leave them out)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest

from edge_broker.bridge.config import parse_bridges
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import RawClient, connect, unique_id

# A closed port: the uplink stays down (backing off for a minute), so the backlog only grows.
TABLE = {"name": "central", "kind": "mqtt", "servers": ["mqtt://127.0.0.1:9"],
         "topics": ['sensors/# out 1 "" gw7/'], "max_backlog_bytes": 4096,
         "backoff_initial": "1min", "backoff_max": "1min"}
PREFIX = "bridge central: backlog over max_backlog_bytes (4096): "


def _settled_drops(broker: BrokerThread) -> int:
    """The bridge's dropped count once no drop runs and the backlog is within its bound
    (a drop starts after the commit that acknowledged the PUBLISH, and ends later)."""
    def state() -> tuple[bool, int, int]:
        assert broker.app is not None
        bridge = broker.app.bridges.bridges["central"]
        (status,) = broker.app.bridges.status()
        return bridge._dropping, status.backlog_bytes, status.dropped

    deadline = time.monotonic() + 10
    while True:
        dropping, backlog, dropped = broker.call(state)
        if not dropping and backlog <= 4096:
            return dropped
        assert time.monotonic() < deadline, (dropping, backlog, dropped)
        time.sleep(0.005)  # polling interval, bounded by the deadline


def _publish(device: RawClient, first: int, count: int) -> None:
    for n in range(first, first + count):
        assert device.publish_acked("sensors/d1/temp", b"%04d" % n * 256) == 0  # 1 KiB


def _logged(caplog: pytest.LogCaptureFixture) -> int:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(PREFIX)]
    return sum(int(line[len(PREFIX):].split()[0]) for line in lines)


def test_every_backlog_drop_is_in_the_log_when_the_bridge_closes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    base = broker_config(tmp_path)
    config = dataclasses.replace(base, bridges=parse_bridges([TABLE], file="test.toml",
                                                              gateway_id="gw7"))
    broker = BrokerThread(config).start()
    try:
        device = connect(broker.port, unique_id("dev"), version=5)
        _publish(device, 0, 6)
        first = _settled_drops(broker)
        assert 1 <= _logged(caplog) <= first  # the first line at once, then one per 10 s
        _publish(device, 6, 6)
        dropped = _settled_drops(broker)
        assert _logged(caplog) < dropped  # these drops are inside the interval: not yet
        device.disconnect()
    finally:
        broker.stop()
    assert _logged(caplog) == dropped, [r.getMessage() for r in caplog.records]
