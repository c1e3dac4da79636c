"""Named streams and replay over MQTT, as paho-mqtt (3.1.1 and 5.0) sees them.

A stream records every PUBLISH its filter matches; a client subscribes to `$stream/<name>`
(v5: user property `stream-offset`; 3.1.1: `$stream/<name>@<position>`) and receives the
history, then live messages, under their original topics, each with `stream-offset` (v5).
Waiting is on paho's callback queues with timeouts, or polling the broker's state with a
deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_broker.config import Config, StreamConfig
from edge_broker.store.log.replay import StreamStats
from tests.conftest import BrokerThread, broker_config
from tests.integration.test_paho import V5, V311, Paho

MakeBroker = Callable[..., BrokerThread]
DEADLINE_S = 20.0

TELEMETRY = StreamConfig("telemetry", "sensors/#")


def stream_config(tmp_path: Path, *streams: StreamConfig, **mqtt_keys: Any) -> Config:
    return dataclasses.replace(broker_config(tmp_path, **mqtt_keys),
                               streams=streams or (TELEMETRY,))


@pytest.fixture
def clients() -> Iterator[Callable[..., Paho]]:
    made: list[Paho] = []

    def make(broker: BrokerThread, protocol: int, client_id: str = "", **kwargs: Any) -> Paho:
        client = Paho(broker, protocol, client_id, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.client.disconnect()
        finally:
            client.client.loop_stop()


def offset_of(message: mqtt.MQTTMessage) -> int | None:
    pairs = getattr(message.properties, "UserProperty", None) or []
    values = [int(v) for k, v in pairs if k == "stream-offset"]
    return values[-1] if values else None


def stream_stats(broker: BrokerThread, name: str) -> StreamStats:
    assert broker.app is not None and broker.loop is not None
    store: Any = broker.app.store
    found = asyncio.run_coroutine_threadsafe(store.stream_stats(), broker.loop).result(10)
    return next(s for s in found if s.name == name)


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S} s: {what}")
        time.sleep(0.02)  # polling interval, with a deadline: not a synchronising sleep


def publish_all(publisher: Paho, count: int, topic: str = "sensors/{i}",
                qos: int = 1) -> None:
    for i in range(count):
        publisher.publish(topic.format(i=i % 3), f"m{i}".encode(), qos=qos)


def receive(client: Paho, count: int) -> list[mqtt.MQTTMessage]:
    return [client.expect() for _ in range(count)]


def subscribe_v5(client: Paho, topic: str, position: str | None, qos: int = 1) -> list[int]:
    if position is None:
        return client.subscribe(topic, qos)
    return client.subscribe(topic, qos, UserProperty=[("stream-offset", position)])


# --------------------------------------------------------------------------- MQTT 5


def test_v5_replay_from_earliest_then_live(make_broker: MakeBroker, tmp_path: Path,
                                           clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    publish_all(publisher, 5)  # nobody subscribes: the stream alone records them
    device = clients(broker, V5, "dev")
    device.connect()
    assert subscribe_v5(device, "$stream/telemetry", "earliest") == [1]
    history = receive(device, 5)
    assert [offset_of(m) for m in history] == [1, 2, 3, 4, 5]
    assert [m.topic for m in history] == ["sensors/0", "sensors/1", "sensors/2", "sensors/0",
                                          "sensors/1"]  # the original topics
    assert [m.payload for m in history] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert all(m.qos == 1 for m in history)
    publisher.publish("sensors/live", b"now", qos=0)
    live = device.expect()
    assert (live.topic, live.payload, offset_of(live), live.qos) == ("sensors/live", b"now", 6, 0)
    publisher.publish("other/topic", b"not in the stream", qos=1)
    publisher.publish("sensors/9", b"after", qos=2)
    last = device.expect()  # the message outside the stream never came
    assert (last.payload, offset_of(last), last.qos) == (b"after", 7, 1)  # min(granted, own)


def test_v5_replay_from_an_offset_and_a_topic_filter(make_broker: MakeBroker, tmp_path: Path,
                                                      clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    publish_all(publisher, 9)
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/telemetry", "4")
    assert [offset_of(m) for m in receive(device, 6)] == [4, 5, 6, 7, 8, 9]
    narrow = clients(broker, V5, "narrow")
    narrow.connect()
    subscribe_v5(narrow, "$stream/telemetry/sensors/1", "earliest")
    got = receive(narrow, 3)
    assert [(m.topic, offset_of(m)) for m in got] == [("sensors/1", 2), ("sensors/1", 5),
                                                      ("sensors/1", 8)]


def test_v5_replay_from_a_time(make_broker: MakeBroker, tmp_path: Path,
                               clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    publish_all(publisher, 3)  # acknowledged: stored with a publish time before `boundary`
    boundary = datetime.now(UTC)
    for i in range(3, 6):
        publisher.publish(f"sensors/{i}", f"m{i}".encode(), qos=1)
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/telemetry", boundary.isoformat().replace("+00:00", "Z"))
    got = receive(device, 3)
    assert [(m.payload, offset_of(m)) for m in got] == [(b"m3", 4), (b"m4", 5), (b"m5", 6)]


def test_v5_latest_is_the_default_and_offsets_past_the_last_wait(
        make_broker: MakeBroker, tmp_path: Path, clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    publish_all(publisher, 2)
    live = clients(broker, V5, "live")
    live.connect()
    subscribe_v5(live, "$stream/telemetry", None)
    future = clients(broker, V5, "future")
    future.connect()
    subscribe_v5(future, "$stream/telemetry", "5")
    publish_all(publisher, 4)  # offsets 3..6
    assert [offset_of(m) for m in receive(live, 4)] == [3, 4, 5, 6]
    assert [offset_of(m) for m in receive(future, 2)] == [5, 6]


@pytest.mark.parametrize("acl", [False, True], ids=["open", "acl"])
def test_unknown_stream_and_shared_subscriptions_are_refused(
        make_broker: MakeBroker, tmp_path: Path, clients: Callable[..., Paho],
        acl: bool) -> None:
    # With an ACL file too: a shared subscription to a stream gets its own code, not 0x87
    # (the ACL was asked first before, and it grants no $stream/ filter as such).
    config = stream_config(tmp_path)
    if acl:
        (tmp_path / "acl").write_text("topic read sensors/#\n")
        config = dataclasses.replace(config, auth=dataclasses.replace(
            config.auth, acl_file=tmp_path / "acl"))
    broker = make_broker(config=config)
    v5 = clients(broker, V5, "v5")
    v5.connect()
    assert subscribe_v5(v5, "$stream/nope", "earliest") == [0x8F]
    assert v5.subscribe("$share/g/$stream/telemetry", 1) == [0x9E]
    assert subscribe_v5(v5, "$stream/telemetry", "yesterday") == [0x8F]
    v3 = clients(broker, V311, "v3")
    v3.connect()
    assert v3.subscribe("$stream/nope@earliest", 1) == [0x80]
    assert v3.subscribe("$stream/telemetry@never", 1) == [0x80]


def test_a_qos1_message_only_a_stream_takes_is_acknowledged_success(
        make_broker: MakeBroker, tmp_path: Path, clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    codes: queue.Queue[int] = queue.Queue()
    publisher.client.on_publish = lambda c, u, mid, rc, p: codes.put(int(rc.value))
    publisher.connect()
    publisher.publish("sensors/a", b"x", qos=1)
    assert codes.get(timeout=5) == 0x00  # not 0x10 No matching subscribers
    publisher.publish("elsewhere", b"x", qos=1)
    assert codes.get(timeout=5) == 0x10
    assert stream_stats(broker, "telemetry").count == 1


# --------------------------------------------------------------------------- MQTT 3.1.1


def test_v311_position_in_the_filter(make_broker: MakeBroker, tmp_path: Path,
                                     clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V311, "pub")
    publisher.connect()
    boundary = None
    for i in range(6):
        if i == 4:
            boundary = datetime.now(UTC)
        publisher.publish(f"sensors/{i % 2}", f"m{i}".encode(), qos=1)
    assert boundary is not None
    earliest = clients(broker, V311, "earliest")
    earliest.connect()
    assert earliest.subscribe("$stream/telemetry@earliest", 1) == [1]
    assert [m.payload for m in receive(earliest, 6)] == [f"m{i}".encode() for i in range(6)]
    offset = clients(broker, V311, "offset")
    offset.connect()
    assert offset.subscribe("$stream/telemetry@3/sensors/0", 1) == [1]
    assert [(m.topic, m.payload) for m in receive(offset, 2)] == [("sensors/0", b"m2"),
                                                                  ("sensors/0", b"m4")]
    at = clients(broker, V311, "at")
    at.connect()
    at.subscribe(f"$stream/telemetry@{boundary.isoformat().replace('+00:00', 'Z')}", 0)
    assert [m.payload for m in receive(at, 2)] == [b"m4", b"m5"]
    publisher.publish("sensors/1", b"live", qos=0)
    for client in (earliest, at):
        assert client.expect().payload == b"live"
    # And the v5 property wins over the position written in the filter.
    v5 = clients(broker, V5, "v5")
    v5.connect()
    subscribe_v5(v5, "$stream/telemetry@earliest", "7")
    assert [offset_of(m) for m in receive(v5, 1)] == [7]


# --------------------------------------------------------------------------- restart, seam


def test_replay_across_a_restart(make_broker: MakeBroker, tmp_path: Path,
                                 clients: Callable[..., Paho]) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    publish_all(publisher, 4)
    publisher.disconnect()
    broker.stop()
    broker = make_broker(config=broker.config)
    publisher = clients(broker, V5, "pub2")
    publisher.connect()
    publisher.publish("sensors/after", b"after restart", qos=1)
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/telemetry", "earliest")
    got = receive(device, 5)
    assert [offset_of(m) for m in got] == [1, 2, 3, 4, 5]  # offsets go on after a restart
    assert got[-1].payload == b"after restart"


def test_the_seam_under_a_publisher_at_full_speed(make_broker: MakeBroker, tmp_path: Path,
                                                   clients: Callable[..., Paho]) -> None:
    """History then live while a QoS 0 publisher keeps going: every offset exactly once, in
    order, with a small inflight window (the replay is flow-controlled)."""
    total = 4000
    broker = make_broker(config=stream_config(tmp_path, max_inflight_messages=5))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    started = threading.Event()

    def run() -> None:
        for i in range(total):
            publisher.client.publish(f"sensors/{i % 7}", str(i).encode(), qos=0)
            if i == total // 4:
                started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(DEADLINE_S)
    wait_for(lambda: stream_stats(broker, "telemetry").count > 100, "some history stored")
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/telemetry", "earliest", qos=1)
    thread.join(DEADLINE_S)
    publisher.publish("sensors/end", b"end", qos=1)  # the last offset: total + 1
    offsets = []
    while True:
        message = device.expect(timeout=DEADLINE_S)
        offsets.append(offset_of(message))
        if message.payload == b"end":
            break
    assert offsets == list(range(1, total + 2))


# --------------------------------------------------------------------------- retention


def test_retention_by_size_keeps_the_newest(make_broker: MakeBroker, tmp_path: Path,
                                            clients: Callable[..., Paho]) -> None:
    small = StreamConfig("small", "r/#", max_age_s=None, max_bytes=1000)
    broker = make_broker(config=stream_config(tmp_path, small))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    for i in range(30):  # 30 x (3 + 100) bytes
        publisher.publish("r/x", bytes([65 + i % 26]) * 100, qos=1)
    wait_for(lambda: stream_stats(broker, "small").bytes <= 1000, "retention by size")
    stats = stream_stats(broker, "small")
    assert stats.last_offset == 30 and stats.count == 9 and stats.first_offset == 22
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/small", "1")  # below the first: starts at the first
    assert [offset_of(m) for m in receive(device, 9)] == list(range(22, 31))


def test_retention_by_age(make_broker: MakeBroker, tmp_path: Path,
                          clients: Callable[..., Paho]) -> None:
    brief = StreamConfig("brief", "b/#", max_age_s=1, max_bytes=None)
    broker = make_broker(config=stream_config(tmp_path, brief))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    for i in range(5):
        publisher.publish("b/x", f"{i}".encode(), qos=1)
    assert stream_stats(broker, "brief").count == 5
    wait_for(lambda: stream_stats(broker, "brief").count == 0, "retention by age")
    publisher.publish("b/x", b"new", qos=1)
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/brief", "earliest")
    message = device.expect()
    assert (message.payload, offset_of(message)) == (b"new", 6)


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-history"])
def test_last_value_compaction(make_broker: MakeBroker, tmp_path: Path,
                               clients: Callable[..., Paho], beside: bool) -> None:
    # Beside a stream of everything, compaction deletes nothing (that stream keeps every
    # row), and the last-value stream still replays and counts each topic's newest message
    # alone. Before, it showed every row the other stream kept.
    state = StreamConfig("state", "dev/+/state", max_age_s=None, max_bytes=10**6,
                         last_value=True)
    streams = (state, StreamConfig("history", "dev/#")) if beside else (state,)
    broker = make_broker(config=stream_config(tmp_path, *streams))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    for device_id, value in (("a", "1"), ("b", "1"), ("a", "2"), ("a", "3"), ("b", "2")):
        publisher.publish(f"dev/{device_id}/state", value.encode(), qos=1)
    wait_for(lambda: stream_stats(broker, "state").count == 2, "compaction")
    if beside:
        assert stream_stats(broker, "history").count == 5
    device = clients(broker, V5, "dev")
    device.connect()
    subscribe_v5(device, "$stream/state", "earliest")
    got = receive(device, 2)
    assert [(m.topic, m.payload, offset_of(m)) for m in got] == [
        ("dev/a/state", b"3", 4), ("dev/b/state", b"2", 5)]


# --------------------------------------------------------------------------- persistent


@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
def test_a_persistent_session_resumes_from_its_cursor_after_a_restart(
        make_broker: MakeBroker, tmp_path: Path, clients: Callable[..., Paho],
        protocol: int) -> None:
    broker = make_broker(config=stream_config(tmp_path))
    publisher = clients(broker, V5, "pub")
    publisher.connect()
    publish_all(publisher, 3)
    options: dict[str, Any] = ({"clean": False, "session_expiry": 3600} if protocol == V5
                               else {"clean": False})
    device = clients(broker, protocol, "dev", **options)
    device.connect()
    topic = "$stream/telemetry@earliest"
    assert device.subscribe(topic, 1) == [1]
    assert [m.payload for m in receive(device, 3)] == [b"m0", b"m1", b"m2"]
    device.disconnect()
    publish_all(publisher, 2, topic="sensors/offline{i}")  # offsets 4, 5 while it is away
    publisher.disconnect()
    broker.stop()
    broker = make_broker(config=broker.config)
    device = clients(broker, protocol, "dev", **options)
    assert device.connect()[0] is True  # session present
    # As client libraries do on reconnect: the same SUBSCRIBE again, which keeps the cursor.
    assert device.subscribe(topic, 1) == [1]
    got = receive(device, 2)
    assert [(m.topic, m.payload) for m in got] == [("sensors/offline0", b"m0"),
                                                   ("sensors/offline1", b"m1")]
    if protocol == V5:
        assert [offset_of(m) for m in got] == [4, 5]
    publisher = clients(broker, V5, "pub2")
    publisher.connect()
    publisher.publish("sensors/live", b"live", qos=1)
    assert device.expect().payload == b"live"  # once, after the history
    publisher.publish("marker", b"x", qos=1)
    assert device.drain_until_marker(publisher) == []


def test_a_replay_the_retention_passes_is_logged_not_silent(
        make_broker: MakeBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A reader slower than the stream's max_bytes retention loses the history rows removed
    # before it read them (as a Kafka consumer behind its topic's retention does); the
    # operator is told which offsets. Before, the replay jumped over them without a word.
    from tests.integration.rawclient import PUBACK, connect, props

    caplog.set_level(logging.WARNING, logger="edge_broker")
    small = StreamConfig("small", "r/#", max_age_s=None, max_bytes=300_000)
    broker = make_broker(config=stream_config(tmp_path, small))
    publisher = connect(broker.port, "pub", version=4)

    def publish(numbers: range) -> None:  # QoS 1, the acknowledgements read at the end
        for i in numbers:
            publisher.publish("r/x", b"%06d" % i + b"x" * 94, qos=1)
        for _ in numbers:
            publisher.expect(PUBACK)

    publish(range(3000))  # about 2,900 rows kept: more history than two pages
    reader = connect(broker.port, "slow", version=5, properties=props(receive_maximum=1))
    reader.subscribe(("$stream/small", 1),
                     properties=props(user_properties=[("stream-offset", "earliest")]))
    first = reader.expect_publish()  # and no more until it is acknowledged
    publish(range(3000, 9000))  # the retention moves the floor far past the reader
    got = [int(first.payload[:6])]
    reader.ack(PUBACK, first.packet_id or 0)
    while got[-1] != 8999:  # the last one published (live: queued for the reader)
        message = reader.expect_publish()
        got.append(int(message.payload[:6]))
        reader.ack(PUBACK, message.packet_id or 0)
    assert got == sorted(set(got)) and len(got) < 9000  # in order; some passed
    lines = [r.getMessage() for r in caplog.records if "fell behind" in r.getMessage()]
    assert lines and "client slow: its replay of stream 'small'" in lines[0], lines
