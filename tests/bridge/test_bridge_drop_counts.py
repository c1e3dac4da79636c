"""A bridge with its uplink in a process of its own (`separate_process`): a message the remote
side acknowledged is counted in `forwarded` and never also in `dropped`, although the broker
stores the acknowledged cursor at most once per `COMMIT_INTERVAL_S` (server/bridge_proc.py).

A `max_backlog_bytes` drop and the store budget's tier 2 (store/log/budget.py) move the stored
cursor past the oldest rows; before they do, the broker stores the cursor the process last
acknowledged, so the rows it passes count as forwarded, not dropped.

The broker runs in a thread of this process (so that the interval can be set to an hour: the
acknowledged cursor is then stored only by what this test is about), with the real uplink
process and a real nats-server. The device publishes one message at a time and waits until
the broker shows it forwarded, so that no message is in flight when a drop runs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from edge_broker.bridge.config import parse_bridges
from edge_broker.server import bridge_proc
from tests.bridge.servers import NatsServer
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import connect, unique_id

SIZE = 1024
FORWARDED = 20
WAITING = 12
QUOTA_EXCEEDED = 0x97
FIGURES = ("forwarded", "dropped", "backlog_messages", "backlog_bytes", "cursor")


def _config(tmp_path: Path, url: str, *, max_backlog_bytes: int = 0,
            max_store_bytes: int = 0) -> Any:
    base = broker_config(tmp_path)
    bridges = parse_bridges([{
        "name": "central", "kind": "jetstream", "servers": [url], "uplink": ["sensors/#"],
        "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE", "separate_process": True,
        "max_backlog_bytes": max_backlog_bytes, "backoff_initial": "1s",
        "backoff_max": "1s"}], file="test.toml", gateway_id="gw7")
    storage = dataclasses.replace(base.storage, persistence="sqlite", durability="os",
                                  max_store_bytes=max_store_bytes)
    return dataclasses.replace(base, bridges=bridges, storage=storage)


def _status(broker: BrokerThread) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        assert broker.app is not None
        (status,) = broker.app.bridges.status()
        return dict(status.to_dict())

    result: dict[str, Any] = broker.call(read)
    return result


def _publish_one_at_a_time(broker: BrokerThread, count: int) -> None:
    """QoS 1, each acknowledged by the broker and then shown forwarded before the next."""
    device = connect(broker.port, unique_id("dev"), version=5)
    try:
        for n in range(count):
            assert device.publish_acked("sensors/d1/temp", _payload(n)) == 0
            deadline = time.monotonic() + 30
            while _status(broker)["forwarded"] < n + 1:
                assert time.monotonic() < deadline, f"message {n} not forwarded in 30 s"
                time.sleep(0.002)  # polling interval, bounded by the deadline
    finally:
        device.disconnect()


def _publish(broker: BrokerThread, start: int, count: int) -> None:
    """QoS 1, each acknowledged (0x97 while the store budget makes room: tried again)."""
    device = connect(broker.port, unique_id("dev"), version=5)
    try:
        for n in range(start, start + count):
            deadline = time.monotonic() + 10
            while (reason := device.publish_acked("sensors/d1/temp", _payload(n))) != 0:
                assert reason == QUOTA_EXCEEDED, hex(reason)
                assert time.monotonic() < deadline, f"message {n} refused for 10 s"
                time.sleep(0.05)  # polling interval, bounded by the deadline
    finally:
        device.disconnect()


def _payload(n: int) -> bytes:
    return b"%06d" % n + b"x" * (SIZE - 6)


def _stored(broker: BrokerThread) -> tuple[int, int]:
    """The store's reader of the bridge: its cursor and its count of drops (`Reader.dropped`,
    what a restart shows)."""
    def read() -> tuple[int, int]:
        assert broker.app is not None and broker.app.bridges.side is not None
        reader = broker.app.bridges.side.reader("central")
        assert reader is not None
        return reader.offset, reader.dropped

    stored: tuple[int, int] = broker.call(read)
    return stored


def _stored_cursor(broker: BrokerThread) -> int:
    return _stored(broker)[0]


def _settled(broker: BrokerThread, total: int) -> dict[str, Any]:
    """The figures once every message is forwarded, dropped or in the backlog (a drop may
    still run): before the fix, forwarded + dropped + backlog exceeded the messages."""
    deadline = time.monotonic() + 20
    while True:
        status = _status(broker)
        if status["forwarded"] + status["dropped"] + status["backlog_messages"] == total:
            return status
        assert time.monotonic() < deadline, (total, {k: status[k] for k in FIGURES})
        time.sleep(0.05)  # polling interval, bounded by the deadline


@pytest.fixture
def hour_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker stores the acknowledged cursor at once the first time, then only after
    an hour (or when a drop, a budget step or a stop needs it)."""
    if not bridge_proc.__file__.endswith(".py"):
        pytest.skip("a compiled build: COMMIT_INTERVAL_S is a constant compiled in")
    monkeypatch.setattr(bridge_proc, "COMMIT_INTERVAL_S", 3600.0, raising=False)


def test_max_backlog_bytes_drop_does_not_count_forwarded_messages(
        nats_server: NatsServer, tmp_path: Path, hour_interval: None) -> None:
    broker = BrokerThread(_config(tmp_path, nats_server.url,
                                  max_backlog_bytes=4 * SIZE)).start()
    try:
        _publish_one_at_a_time(broker, FORWARDED)
        assert _stored_cursor(broker) < FORWARDED  # acknowledged, not stored (an hour)
        nats_server.stop()  # the uplink is down: the next messages wait, over the bound
        _publish(broker, FORWARDED, WAITING)
        deadline = time.monotonic() + 20
        while _status(broker)["backlog_bytes"] > 4 * SIZE:  # the last drop may still run
            assert time.monotonic() < deadline, _status(broker)["backlog_bytes"]
            time.sleep(0.05)  # polling interval, bounded by the deadline
        status = _settled(broker, FORWARDED + WAITING)
        # The drop skipped only messages the remote side never had (before the fix: the
        # oldest rows after the stored cursor, forwarded ones, also counted as dropped).
        assert status["forwarded"] == FORWARDED
        assert 0 < status["dropped"] < WAITING, status
        assert _stored_cursor(broker) >= FORWARDED  # stored by the drop
    finally:
        broker.stop(timeout=30)  # (the uplink process stops while its remote is down)


def test_store_budget_gives_way_without_counting_forwarded_messages(
        nats_server: NatsServer, tmp_path: Path, hour_interval: None) -> None:
    budget = 256 * 1024
    broker = BrokerThread(_config(tmp_path, nats_server.url, max_store_bytes=budget)).start()
    try:
        # Well under the budget (so that no step of it runs while a message is in flight:
        # see the module docstring), their rows held by the stored cursor.
        forwarded = budget // SIZE // 4
        _publish_one_at_a_time(broker, forwarded)
        nats_server.stop()
        # Those rows and the new ones exceed the budget: the bridge's backlog gives way.
        waiting = budget // SIZE
        _publish(broker, forwarded, waiting)
        status = _settled(broker, forwarded + waiting)
        assert status["forwarded"] == forwarded
        assert 0 < status["dropped"] < waiting, status
        # What waits is every row after the cursor (the remote is down): a step that skipped
        # forwarded rows counted them dropped, and the backlog figure, which leaves out the
        # acknowledged ones, hid it from the sum above.
        assert status["backlog_messages"] == forwarded + waiting - status["cursor"], status
        assert broker.call(lambda: broker.app.bridges.budget_dropped) == status["dropped"]
    finally:
        broker.stop(timeout=30)  # (the uplink process stops while its remote is down)


def test_the_interval_still_coalesces(nats_server: NatsServer, tmp_path: Path,
                                      hour_interval: None) -> None:
    """The control: with no drop, the cursor is stored at the first acknowledgement and
    then not before the interval (no write per acknowledgement), while the figures count
    the acknowledged messages out of the backlog at once."""
    broker = BrokerThread(_config(tmp_path, nats_server.url,
                                  max_backlog_bytes=64 * SIZE)).start()
    try:
        _publish_one_at_a_time(broker, 10)
        assert _stored_cursor(broker) < 10
        assert _status(broker)["backlog_messages"] == 0
    finally:
        broker.stop(timeout=30)  # (the uplink process stops while its remote is down)
