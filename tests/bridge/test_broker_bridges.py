"""Bridges inside the broker: `edge-broker --config FILE` with [[bridges]], against real
servers (nats-server with JetStream, tansu, mosquitto) started on free loopback ports.

Devices publish to the broker with paho; what reached the remote side is read there. Waiting
is polling with a deadline or paho's queues with timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_broker.bridge.base import decode_text, parse_message_id
from edge_broker.server.admin import admin_request
from tests.bridge.servers import Mosquitto, NatsServer, Tansu
from tests.bridge.test_mqtt_upstream import Remote
from tests.integration.brokerprocess import BrokerProcess, needs_console_script

pytestmark = needs_console_script

DEADLINE_S = 30.0


def write_config(tmp_path: Path, bridge: str) -> Path:
    path = tmp_path / "edge-broker.toml"
    path.write_text('[broker]\ngateway_id = "gw7"\nsys_interval = 1\n'
                    '[storage]\ndurability = "os"\n[http]\nport = 0\n' + bridge,
                    encoding="utf-8")
    return path


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Callable[[Path], BrokerProcess]]:
    made: list[BrokerProcess] = []

    def start(config: Path) -> BrokerProcess:
        broker = BrokerProcess(tmp_path / "data", "--config", str(config),
                               "--log-level", "info").wait_listening()
        made.append(broker)
        return broker

    yield start
    for broker in made:
        broker.kill()


def publish(port: int, topic: str, payloads: list[bytes], qos: int = 1,
            client_id: str = "dev1") -> None:
    device = Remote(port, client_id)
    try:
        for payload in payloads:
            device.publish(topic, payload, qos)
    finally:
        device.client.disconnect()
        device.client.loop_stop()


async def until(check: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline


async def bridge_status(broker: BrokerProcess) -> dict[str, Any]:
    answer = await admin_request(broker.data_dir, {"command": "bridges"})
    return answer


# --------------------------------------------------------------------------- JetStream

JETSTREAM = '''
[[bridges]]
name = "central"
kind = "jetstream"
servers = ["{url}"]
uplink = ["sensors/#"]
subject_prefix = "site1.gw7"
jetstream_stream = "EDGE"
stream_subjects = ["site1.gw7.>"]
downlink = ["site1.gw7.cmd.>"]
backoff_initial = 1
backoff_max = 2
'''


async def stored(url: str) -> list[Any]:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("EDGE")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("EDGE", seq)
            if msg.subject.startswith("site1.gw7.sensors."):
                out.append(msg)
        return out
    finally:
        await nc.close()


def jetstream_config(tmp_path: Path, nats_server: NatsServer, extra: str = "") -> Path:
    # Uplink subjects are <prefix>.<topic> (sensors/... -> site1.gw7.sensors...), the downlink
    # commands site1.gw7.cmd...: the stream captures both (the bridge refuses a stream that
    # does not capture <prefix>.>).
    return write_config(tmp_path, JETSTREAM.format(url=nats_server.url) + extra)


async def test_jetstream_uplink_in_order_across_an_outage_and_a_kill_without_duplicates(
        tmp_path: Path, nats_server: NatsServer,
        brokers: Callable[[Path], BrokerProcess]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    config = jetstream_config(tmp_path, nats_server)
    broker = brokers(config)
    await asyncio.to_thread(publish, broker.port, "sensors/t1",
                            [f"a{i}".encode() for i in range(50)])
    publish_qos0 = [b"q0"]
    await asyncio.to_thread(publish, broker.port, "sensors/t2", publish_qos0, 0)
    await until(lambda: _count(nats_server.url, 51), "51 messages in JetStream")
    first = await stored(nats_server.url)
    offsets = [parse_message_id(m.headers["Nats-Msg-Id"])[2] for m in first]
    assert offsets == sorted(offsets)
    gateway, store_id, _ = parse_message_id(first[0].headers["Nats-Msg-Id"])
    assert gateway == "gw7" and len(store_id) == 16
    assert [m.data for m in first[:50]] == [f"a{i}".encode() for i in range(50)]
    assert decode_text(first[0].headers["mqtt-topic"]) == "sensors/t1"
    status = await bridge_status(broker)
    (central,) = status["bridges"]
    assert status["store_id"] == store_id
    assert central["cursor"] >= offsets[-1] and central["backlog_messages"] == 0

    # Stop the uplink's server, publish, kill the broker in the middle: nothing lost, no
    # resend stored twice (Nats-Msg-Id), and the cursor survived.
    nats_server.stop()
    await asyncio.to_thread(publish, broker.port, "sensors/t1",
                            [f"b{i}".encode() for i in range(30)])
    broker.kill()  # SIGKILL: what was acknowledged is in the file, the cursor too
    nats_server.start()
    broker = brokers(config)
    # It resumes from the stored cursor (past the 51 forwarded), not from the start.
    resumed = re.search(r"bridge central \(jetstream\) started: cursor (\d+)", broker.stderr)
    assert resumed is not None and int(resumed.group(1)) >= offsets[-1]
    await asyncio.to_thread(publish, broker.port, "sensors/t1",
                            [f"c{i}".encode() for i in range(20)])
    await until(lambda: _count(nats_server.url, 101), "101 messages in JetStream")
    every = await stored(nats_server.url)
    ids = [m.headers["Nats-Msg-Id"] for m in every]
    assert len(ids) == len(set(ids)) == 101
    payloads = [m.data for m in every if m.data != b"q0"]
    assert payloads == ([f"a{i}".encode() for i in range(50)]
                        + [f"b{i}".encode() for i in range(30)]
                        + [f"c{i}".encode() for i in range(20)])
    assert {parse_message_id(i)[1] for i in ids} == {store_id}
    # Rows the bridge passed (and no stream holds) go: retention follows the cursor.
    await until(lambda: _log_rows(broker.data_dir) == 0, "retention of the forwarded rows")


def _log_rows(data_dir: Path) -> int:
    conn = sqlite3.connect(f"file:{data_dir / 'edge-broker.db'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM log").fetchone()[0])
    finally:
        conn.close()


async def _count(url: str, count: int) -> bool:
    try:
        return len(await stored(url)) >= count
    except Exception:  # the stream does not exist yet, or the server is starting
        return False


async def test_jetstream_downlink_exactly_once_into_the_broker(
        tmp_path: Path, nats_server: NatsServer,
        brokers: Callable[[Path], BrokerProcess]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    import nats

    config = write_config(tmp_path, JETSTREAM.format(url=nats_server.url).replace(
        'uplink = ["sensors/#"]', 'uplink = ["sensors/#"]\nstream_max_age = "1h"'))
    broker = brokers(config)
    device = Remote(broker.port, "valve")
    device.subscribe("cmd/#", 1)
    # The stream exists once the bridge made it.
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await until(lambda: _stream_exists(js), "the EDGE stream")
    for i in range(5):
        await js.publish(f"site1.gw7.cmd.valve{i}", f"open{i}".encode())
    got = await asyncio.to_thread(device.wait_for, 5)
    assert sorted((m.topic, m.payload) for m in got) == [
        (f"cmd/valve{i}", f"open{i}".encode()) for i in range(5)]
    # The broker restarts: the durable consumer has everything acknowledged, and the stored
    # positions keep a redelivery from being published twice.
    device.client.disconnect()
    device.client.loop_stop()
    assert broker.stop() == 0
    broker = brokers(config)
    device = Remote(broker.port, "valve2")
    device.subscribe("cmd/#", 1)
    await js.publish("site1.gw7.cmd.valve9", b"close")
    got = await asyncio.to_thread(device.wait_for, 1)
    assert [(m.topic, m.payload) for m in got] == [("cmd/valve9", b"close")]
    status = await bridge_status(broker)
    assert status["bridges"][0]["downlink_published"] == 1
    await nc.close()
    device.client.disconnect()
    device.client.loop_stop()


async def _stream_exists(js: Any) -> bool:
    try:
        await js.stream_info("EDGE")
        return True
    except Exception:
        return False


async def test_uplink_down_since_boot_keeps_the_backlog_bound_then_drains(
        tmp_path: Path, brokers: Callable[[Path], BrokerProcess]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    nats_server = NatsServer(tmp_path / "nats")  # not running yet
    bound = 20_000
    config = jetstream_config(tmp_path, nats_server, f"max_backlog_bytes = {bound}\n")
    broker = brokers(config)
    payloads = [f"{i:04d}".encode() + b"x" * 996 for i in range(100)]
    await asyncio.to_thread(publish, broker.port, "sensors/t1", payloads)

    async def bounded() -> dict[str, Any] | None:
        (status,) = (await bridge_status(broker))["bridges"]
        return status if status["dropped"] and status["backlog_bytes"] <= bound else None

    status = await until(bounded, "the backlog within max_backlog_bytes")
    kept = status["backlog_messages"]
    assert kept + status["dropped"] == 100 and 0 < kept < 100
    assert "dropped" in broker.stderr and "max_backlog_bytes" in broker.stderr
    nats_server.start()
    try:
        await until(lambda: _count(nats_server.url, kept), f"{kept} messages in JetStream")
        every = await stored(nats_server.url)
        assert [m.data for m in every] == payloads[100 - kept:]  # the newest, in order
    finally:
        nats_server.stop()


# --------------------------------------------------------------------------- Kafka


async def test_kafka_uplink_through_the_broker(
        tmp_path: Path, tansu: Tansu, brokers: Callable[[Path], BrokerProcess]) -> None:
    pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")
    from tests.bridge.test_kafka import consume

    config = write_config(tmp_path, f'''
[[bridges]]
name = "lake"
kind = "kafka"
servers = ["{tansu.bootstrap}"]
topic_map = [{{ filter = "sensors/#", topic = "edge.telemetry" }}]
downlink = ["edge.cmd.gw7"]
idempotence = false
backoff_initial = 1
backoff_max = 2
''')
    broker = brokers(config)
    await asyncio.to_thread(publish, broker.port, "sensors/t1",
                            [f"k{i}".encode() for i in range(40)])
    records = await consume(tansu.bootstrap, ["edge.telemetry"], 40)
    ids = {dict(r.headers)["edge-message-id"].decode() for r in records}
    assert len(ids) == 40  # duplicates are recognised by message id
    unique: dict[str, bytes] = {}
    for record in records:
        unique.setdefault(dict(record.headers)["edge-message-id"].decode(), record.value)
    assert list(unique.values()) == [f"k{i}".encode() for i in range(40)]
    assert {r.key for r in records} == {b"sensors/t1"}
    # Downlink: a consumer group on edge.cmd.gw7, published locally once.
    from aiokafka import AIOKafkaProducer

    device = Remote(broker.port, "valve")
    device.subscribe("cmd/#", 1)
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    await producer.start()
    try:
        for word in (b"open", b"close"):
            await producer.send_and_wait("edge.cmd.gw7", word, key=b"gw7",
                                         headers=[("mqtt-topic", b"cmd/valve1")])
    finally:
        await producer.stop()
    got = await asyncio.to_thread(device.wait_for, 2, 60.0)
    assert [(m.topic, m.payload) for m in got] == [("cmd/valve1", b"open"),
                                                   ("cmd/valve1", b"close")]
    device.client.disconnect()
    device.client.loop_stop()


# --------------------------------------------------------------------------- MQTT upstream


async def test_mqtt_upstream_uplink_and_downlink(
        tmp_path: Path, mosquitto: Mosquitto, brokers: Callable[[Path], BrokerProcess]) -> None:
    config = write_config(tmp_path, f'''
[[bridges]]
name = "cloud"
kind = "mqtt"
servers = ["mqtt://127.0.0.1:{mosquitto.port}"]
topics = ['sensors/# out 1 "" site1/gw7/', 'cmd/# in 2 "" site1/gw7/',
          'config/# both 1 "" site1/gw7/']
backoff_initial = 1
backoff_max = 2
''')
    cloud = Remote(mosquitto.port, "cloud")
    cloud.subscribe("site1/gw7/sensors/#", 1)
    broker = brokers(config)
    device = Remote(broker.port, "valve")
    device.subscribe("cmd/#", 2)
    await asyncio.to_thread(publish, broker.port, "sensors/t1",
                            [f"m{i}".encode() for i in range(20)])
    got = await asyncio.to_thread(cloud.wait_for, 20)
    assert [(m.topic, m.payload) for m in got] == [
        ("site1/gw7/sensors/t1", f"m{i}".encode()) for i in range(20)]
    # Downlink at QoS 2: once into the local broker.
    await until(lambda: _connected(broker), "the bridge connected")
    cloud.publish("site1/gw7/cmd/valve1", b"open", 2)
    (command,) = await asyncio.to_thread(device.wait_for, 1)
    assert (command.topic, command.payload) == ("cmd/valve1", b"open")
    status = await bridge_status(broker)
    (bridge,) = status["bridges"]
    assert bridge["forwarded"] == 20 and bridge["downlink_published"] == 1
    # A "both" line: what came down is not sent back up (the marker published locally
    # after it goes up; the echo, had there been one, would have arrived before it).
    config_watch = Remote(mosquitto.port, "config-watch")
    config_watch.subscribe("site1/gw7/config/#", 1)
    device.subscribe("config/#", 1)
    config_watch.publish("site1/gw7/config/a", b"down", 1)
    got = await asyncio.to_thread(device.wait_for, 2)
    assert (got[1].topic, got[1].payload) == ("config/a", b"down")
    await asyncio.to_thread(publish, broker.port, "config/b", [b"marker"])
    seen = await asyncio.to_thread(config_watch.wait_for, 2)
    assert [(m.topic, m.payload) for m in seen] == [("site1/gw7/config/a", b"down"),
                                                    ("site1/gw7/config/b", b"marker")]
    config_watch.client.disconnect()
    config_watch.client.loop_stop()
    # The same figures in $SYS (retained) and in /metrics.
    watcher = Remote(broker.port, "watcher")
    watcher.subscribe("$SYS/broker/bridges/cloud/#", 0)

    def sys_values() -> dict[str, bytes]:
        return {m.topic.rsplit("/bridges/cloud/", 1)[1]: m.payload for m in watcher.received}

    await until(lambda: sys_values().get("forwarded") == b"21", "$SYS forwarded = 21")
    values = sys_values()
    assert values["connected"] == b"1" and values["backlog/messages"] == b"0"
    assert int(values["cursor"]) >= 21 and values["dropped"] == b"0"
    metrics = await asyncio.to_thread(_metrics, broker)
    assert 'edge_broker_bridge_forwarded_total{bridge="cloud",kind="mqtt"} 21' in metrics
    assert 'edge_broker_bridge_connected{bridge="cloud",kind="mqtt"} 1' in metrics
    watcher.client.disconnect()
    watcher.client.loop_stop()
    for client in (cloud, device):
        client.client.disconnect()
        client.client.loop_stop()


def _metrics(broker: BrokerProcess) -> str:
    port = int(re.search(r"HTTP on 127\.0\.0\.1:(\d+)", broker.stderr).group(1))  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


async def _connected(broker: BrokerProcess) -> bool:
    status = await bridge_status(broker)
    return bool(status["bridges"][0]["connected"])

