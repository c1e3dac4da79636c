"""Named streams and the store budget (`[storage] max_store_bytes`).

Streams give way first (docs/configuration.md, `max_store_bytes`; store/log/budget.py): near
the budget a stream's oldest rows that no reader needs are released early (counted), so a
stream filling the store does not make the broker refuse QoS 1 work. When nothing can give
way (a reader still needs the rows), a QoS 1 message that only a stream takes is refused
like any message that must be stored (MQTT 5: 0x97), and QoS 0 stream traffic is not
recorded, counted, and never blocks the publisher or its subscribers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_broker.config import Config, StreamConfig
from edge_broker.mqtt.packets import Publish
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import PUBACK, connect, props, subscriber, unique_id

QUOTA_EXCEEDED = 0x97
PUBLISH_LIMIT = 2000
BUDGET = 256 * 1024
SIZE = 2048


def budget_config(tmp_path: Path, **mqtt: Any) -> Config:
    base = broker_config(tmp_path, **mqtt)
    return dataclasses.replace(
        base, storage=dataclasses.replace(base.storage, max_store_bytes=BUDGET),
        http=dataclasses.replace(base.http, port=0),
        streams=(StreamConfig("fill", "fill/#"),))


def store_value(broker: BrokerThread, name: str) -> Any:
    return broker.call(lambda: getattr(broker.app.store if broker.app else None, name))


def stream_stats(broker: BrokerThread) -> Any:
    assert broker.app is not None and broker.loop is not None
    stats = asyncio.run_coroutine_threadsafe(broker.app.store.stream_stats(),  # type: ignore
                                             broker.loop).result(10)
    return next(s for s in stats if s.name == "fill")


def metric(broker: BrokerThread, prefix: str) -> float:
    assert broker.app is not None and broker.app.http_address is not None
    host, port = broker.app.http_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(prefix))
    return float(line.split()[-1])


def test_a_stream_gives_way_so_qos1_for_an_offline_session_is_accepted(
        tmp_path: Path, make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(config=budget_config(tmp_path))
    device = unique_id("device")
    persistent = {"clean": False, "properties": props(session_expiry_interval=600)}
    subscriber(broker.port, device, ("cmd/#", 1), version=5, **persistent).disconnect()
    listener = subscriber(broker.port, unique_id("listener"), ("fill/#", 0), version=5)
    publisher = connect(broker.port, unique_id("pub"), version=5)
    # Several times the budget through the stream alone: every message is taken (0x00), the
    # stream's oldest give way instead of the store refusing.
    count = 3 * BUDGET // SIZE
    for n in range(count):
        reason = publisher.publish_acked("fill/x", b"%06d" % n + b"x" * (SIZE - 6), qos=1)
        assert reason == 0, f"message {n}: {reason:#x}"
    got = [listener.expect_publish().payload[:6] for _ in range(count)]
    assert got == [b"%06d" % n for n in range(count)]

    # QoS 1 for the offline session: accepted (before streams gave way: 0x97 after ~36).
    commands = [b"command-%d" % i for i in range(10)]
    for payload in commands:
        assert publisher.publish_acked("cmd/device", payload, qos=1) == 0
    assert not store_value(broker, "full")
    assert store_value(broker, "used_bytes") < BUDGET

    # What gave way is counted, oldest first: the stream keeps its newest rows.
    stats = stream_stats(broker)
    released = store_value(broker, "budget_stream_rows")
    assert stats.budget_dropped == released > 0
    assert stats.last_offset is not None and stats.first_offset is not None
    assert stats.first_offset > 1 and stats.count >= 1
    assert stats.count + released == count  # nothing went uncounted
    assert metric(broker, 'edge_broker_store_budget_released_total{kind="stream"}') == released

    # The session gets every acknowledged command, in order.
    back = connect(broker.port, device, version=5, **persistent)
    assert back.connack.session_present
    received: list[bytes] = []
    while len(received) < len(commands):
        packet = back.expect_publish()
        assert isinstance(packet, Publish) and packet.qos == 1
        received.append(packet.payload)
        back.ack(PUBACK, packet.packet_id or 0)
    assert received == commands


def test_a_full_store_refuses_stream_qos1_when_nothing_can_give_way_and_counts_qos0(
        tmp_path: Path, make_broker: Callable[..., BrokerThread]) -> None:
    # An offline session (drop-newest: its backlog does not give way) needs every row.
    broker = make_broker(config=budget_config(tmp_path, queue_full_policy="drop-newest"))
    holder = unique_id("holder")
    persistent = {"clean": False, "properties": props(session_expiry_interval=600)}
    subscriber(broker.port, holder, ("fill/#", 1), version=5, **persistent).disconnect()
    listener = subscriber(broker.port, unique_id("listener"), ("fill/#", 0), version=5)
    publisher = connect(broker.port, unique_id("pub"), version=5)
    empty = store_value(broker, "used_bytes")  # the schema's pages: the budget's fixed part
    accepted = 0
    for n in range(PUBLISH_LIMIT):
        reason = publisher.publish_acked("fill/x", b"%06d" % n + b"x" * (SIZE - 6), qos=1)
        if reason == QUOTA_EXCEEDED:
            break
        assert reason == 0, hex(reason)
        accepted += 1
    else:
        raise AssertionError(f"never full after {PUBLISH_LIMIT} messages")
    # Refused only when really full; a 2 KiB row (with its index entry) takes at most two
    # such halves of a 4 KiB page, so at least half of the free budget held messages.
    assert store_value(broker, "used_bytes") >= BUDGET
    assert accepted >= (BUDGET - empty) // (2 * SIZE)
    assert store_value(broker, "budget_stream_rows") == 0  # the session needs them all
    for _ in range(accepted):  # the listener got every accepted one (QoS 0)
        listener.expect_publish()
    # Still refused a while later: nothing gave way.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert publisher.publish_acked("fill/x", b"again", qos=1) == QUOTA_EXCEEDED
        time.sleep(0.1)  # polling interval, bounded by the deadline

    def dropped() -> int:
        assert broker.app is not None
        return broker.app.core.stats.stream_dropped

    before = broker.call(dropped)
    for i in range(20):
        publisher.publish("fill/q0", b"qos0-%d" % i)
    got = [listener.expect_publish().payload for _ in range(20)]
    assert got == [b"qos0-%d" % i for i in range(20)]  # delivered, not recorded
    assert broker.call(dropped) - before == 20
    publisher.ping()
    listener.ping()
    stream_full = 'edge_broker_dropped_messages_total{reason="stream_store_full"}'
    assert metric(broker, stream_full) == broker.call(dropped) >= 20
