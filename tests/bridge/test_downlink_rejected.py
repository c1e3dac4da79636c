"""Downlink messages that cannot be published locally, whatever the ACL, through the real
broker: a JetStream subject that does not map back to a topic (not an escape of the table in
docs/bridges.md), a Kafka record whose `mqtt-topic` header is not a topic name. Each is
counted in `downlink_denied`, logged (naming the bridge, the message and why) and
acknowledged remotely (JetStream: terminated; Kafka: its offset committed), so it is not
redelivered; the commands after it are published.

Waiting is polling with a deadline (gateway.wait_until) or paho's queue with a timeout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.bridge.gateway import Gateway, jetstream_bridge, kafka_bridge, wait_until
from tests.bridge.servers import NatsServer, Tansu
from tests.bridge.test_mqtt_upstream import Remote
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

BAD_SUBJECTS = ["site1.gw7.cmd.bad~zz", "site1.gw7.cmd.lower~2e", "site1.gw7.cmd.tail~"]


async def _stream_exists(url: str) -> bool:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().stream_info("EDGE")
        return True
    except Exception:
        return False
    finally:
        await nc.close()


async def _publish(url: str, subjects: list[str]) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for subject in subjects:
            await js.publish(subject, b"x")
    finally:
        await nc.close()


async def _consumer(url: str) -> Any:
    import nats

    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info("EDGE", "gw7-central")
    finally:
        await nc.close()


def test_jetstream_subject_that_is_no_topic_is_counted_logged_and_terminated(
        tmp_path: Path, nats_server: NatsServer, started: list[Any]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url],
                                                 downlink='["site1.gw7.cmd.>"]'))
    started.append(gateway.start())
    device = Remote(gateway.port, "valve")
    started.append(device)
    device.subscribe("cmd/#", 1)
    wait_until(lambda: asyncio.run(_stream_exists(nats_server.url)), 30,
               "the EDGE stream the bridge makes")
    asyncio.run(_publish(nats_server.url, [*BAD_SUBJECTS, "site1.gw7.cmd.ok"]))

    (got,) = device.wait_for(1, 30)
    assert (got.topic, got.payload) == ("cmd/ok", b"x")  # those after them go on
    status = wait_until(lambda: (s := gateway.status("central"))["downlink_denied"] == 3
                        and s, 30, "3 messages counted in downlink_denied")
    assert status["downlink_published"] == 1
    line = next((line for line in gateway.log.splitlines()
                 if "site1.gw7.cmd.bad~zz" in line), "")
    assert "WARNING" in line and "bridge central" in line, gateway.log
    assert "does not map back to an MQTT topic" in line
    # Terminated: nothing waits for an acknowledgement, nothing is redelivered.
    info = wait_until(lambda: (i := asyncio.run(_consumer(nats_server.url))).num_ack_pending
                      == 0 and i, 30, "no message pending on the durable consumer")
    assert info.num_redelivered == 0
    assert info.delivered.stream_seq == 4
    gateway.stop()
    # The two held back by the rate limit (one line per 10 s) are told at the end.
    assert "2 more downlink message(s) not published" in gateway.log


async def _produce(bootstrap: str, records: list[tuple[bytes, bytes]]) -> list[Any]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        return [await producer.send_and_wait("edge.cmd.gw7", payload, key=b"gw7",
                                             headers=[("mqtt-topic", topic)])
                for topic, payload in records]
    finally:
        await producer.stop()


async def _committed(bootstrap: str, partition: int) -> int | None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="edge-broker-gw7-lake",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition("edge.cmd.gw7",
                                                                     partition))
        return offset
    finally:
        await consumer.stop()


def test_kafka_record_whose_topic_is_not_valid_is_counted_logged_and_committed(
        tmp_path: Path, tansu: Tansu, started: list[Any]) -> None:
    pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")
    gateway = Gateway(tmp_path, kafka_bridge([tansu.bootstrap], downlink='["edge.cmd.gw7"]'))
    started.append(gateway.start())
    device = Remote(gateway.port, "valve")
    started.append(device)
    device.subscribe("cmd/#", 1)
    bad, ok = asyncio.run(_produce(tansu.bootstrap, [(b"cmd/+/x", b"bad"),
                                                     (b"cmd/ok", b"ok")]))

    (got,) = device.wait_for(1, 60)
    assert (got.topic, got.payload) == ("cmd/ok", b"ok")
    status = wait_until(lambda: (s := gateway.status("lake"))["downlink_denied"] == 1 and s,
                        30, "the record counted in downlink_denied")
    assert status["downlink_published"] == 1
    line = next((line for line in gateway.log.splitlines() if "'cmd/+/x'" in line), "")
    assert "WARNING" in line and "bridge lake" in line, gateway.log
    assert f"edge.cmd.gw7:{bad.partition} offset {bad.offset}" in line
    assert "not a valid MQTT topic name" in line
    # Committed past both: the group does not read the bad record again.
    assert bad.partition == ok.partition
    wait_until(lambda: asyncio.run(_committed(tansu.bootstrap, ok.partition)) == ok.offset + 1,
               30, "the group's offset past the records")
