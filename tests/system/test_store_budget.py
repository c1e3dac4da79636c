"""The store budget's second tier: offline sessions' backlogs give way by their own policy.

`[storage] max_store_bytes` (docs/configuration.md, "The store budget"): when no stream can
give way, the largest backlogs of offline drop-oldest sessions skip their oldest messages
(counted as drops, reason store_full, and logged), so QoS 1 publishing goes on; a session
under "refuse" (or drop-newest) does not give way, and new QoS 1 work is refused (0x97).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_broker.config import Config
from edge_broker.mqtt.packets import Publish
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import PUBACK, connect, props, subscriber, unique_id

QUOTA_EXCEEDED = 0x97
BUDGET = 256 * 1024
SIZE = 2048
PERSISTENT: dict[str, Any] = {"clean": False, "properties": props(session_expiry_interval=600)}


def budget_config(tmp_path: Path, **mqtt: Any) -> Config:
    base = broker_config(tmp_path, **mqtt)
    return dataclasses.replace(
        base, storage=dataclasses.replace(base.storage, max_store_bytes=BUDGET))


def core_stat(broker: BrokerThread, name: str) -> int:
    value: int = broker.call(lambda: getattr(broker.app.core.stats if broker.app else None,
                                             name))
    return value


def test_a_drop_oldest_backlog_gives_way_and_the_session_gets_the_newest_in_order(
        tmp_path: Path, make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(config=budget_config(tmp_path, queue_full_policy="drop-oldest"))
    device = unique_id("device")
    subscriber(broker.port, device, ("fill/#", 1), version=5, **PERSISTENT).disconnect()
    publisher = connect(broker.port, unique_id("pub"), version=5)
    # Three times the budget for the offline session alone: each message is taken, after
    # at most a short wait while the backlog gives way (refused meanwhile, never lost).
    count = 3 * BUDGET // SIZE
    acked: list[bytes] = []
    for n in range(count):
        payload = b"%06d" % n + b"x" * (SIZE - 6)
        deadline = time.monotonic() + 10
        while (reason := publisher.publish_acked("fill/x", payload, qos=1)) != 0:
            assert reason == QUOTA_EXCEEDED, hex(reason)
            assert time.monotonic() < deadline, f"message {n} refused for 10 s"
            time.sleep(0.05)  # polling interval, bounded by the deadline
        acked.append(payload)
    dropped = core_stat(broker, "dropped_store_full")
    assert dropped > 0
    assert core_stat(broker, "dropped_queue_full") == 0

    back = connect(broker.port, device, version=5, **PERSISTENT)
    assert back.connack.session_present
    received: list[bytes] = []
    while len(received) < count - dropped:
        packet = back.expect_publish()
        assert isinstance(packet, Publish) and packet.qos == 1
        received.append(packet.payload)
        back.ack(PUBACK, packet.packet_id or 0)
    back.ping()
    back.expect_nothing()
    # The newest, in order; every acknowledged message either received or counted.
    assert received == acked[dropped:]


def test_a_refuse_backlog_does_not_give_way(
        tmp_path: Path, make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(config=budget_config(tmp_path, queue_full_policy="refuse"))
    device = unique_id("device")
    subscriber(broker.port, device, ("fill/#", 1), version=5, **PERSISTENT).disconnect()
    publisher = connect(broker.port, unique_id("pub"), version=5)
    acked: list[bytes] = []
    for n in range(2000):
        payload = b"%06d" % n + b"x" * (SIZE - 6)
        reason = publisher.publish_acked("fill/x", payload, qos=1)
        if reason == QUOTA_EXCEEDED:
            break
        assert reason == 0, hex(reason)
        acked.append(payload)
    else:
        raise AssertionError("never full")
    deadline = time.monotonic() + 2.5  # past a retry of the give-way step (1 s)
    while time.monotonic() < deadline:
        assert publisher.publish_acked("fill/x", b"again", qos=1) == QUOTA_EXCEEDED
        time.sleep(0.1)  # polling interval, bounded by the deadline
    assert core_stat(broker, "dropped_store_full") == 0
    back = connect(broker.port, device, version=5, **PERSISTENT)
    received: list[bytes] = []
    while len(received) < len(acked):
        packet = back.expect_publish()
        received.append(packet.payload)
        back.ack(PUBACK, packet.packet_id or 0)
    assert received == acked  # nothing acknowledged was lost
