"""KafkaSink and KafkaDownlink against a real Kafka-protocol broker (tansu, memory storage).

tansu 0.6 answers InitProducerId with an error, so these tests set idempotence = false and
count duplicates by the edge-message-id header instead (docs/bridges.md).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from edge_broker.bridge.base import BridgeMessage, decode_text, parse_message_id
from edge_broker.bridge.config import BridgeConfig, parse_bridges
from edge_broker.bridge.kafka import KafkaDownlink, KafkaSink
from edge_broker.errors import BridgeError
from tests.bridge.proxy import TcpProxy
from tests.bridge.servers import Tansu

STORE_ID = "5eed0000000000b2"
ROUTES = [{"filter": "alarms/#", "topic": "edge.alarms"},
          {"filter": "sensors/#", "topic": "edge.telemetry"}]


def bridge_config(bootstrap: str, **extra: Any) -> BridgeConfig:
    table = {"name": "lake", "kind": "kafka", "servers": [bootstrap], "topic_map": ROUTES,
             "idempotence": False, **extra}
    (config,) = parse_bridges([table], file="test.toml", gateway_id="gw7")
    return config


def messages(first: int, count: int) -> list[BridgeMessage]:
    topics = ["sensors/a", "sensors/b", "alarms/x"]
    return [BridgeMessage(offset=o, topic=topics[o % 3], payload=f"m{o}".encode(), qos=1,
                          client_id=f"dev{o % 2}", publish_time=1_765_000_000.0)
            for o in range(first, first + count)]


async def consume(bootstrap: str, topics: list[str], count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        async def fill() -> None:
            while len(out) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(records)
        await asyncio.wait_for(fill(), 30)
    finally:
        await consumer.stop()
    return out


def offset_of(record: Any) -> int:
    return parse_message_id(dict(record.headers)["edge-message-id"].decode())[2]


async def test_window_routes_by_first_match_with_topic_keys_and_headers(tansu: Tansu) -> None:
    sink = KafkaSink(bridge_config(tansu.bootstrap), gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    try:
        batch = [*messages(1, 300), BridgeMessage(offset=301, topic="other/x", payload=b"")]
        assert await sink.send(batch) == 301
        assert sink.unrouted == 1  # matched no route: skipped, counted, cursor moves on
    finally:
        await sink.close()
    records = await consume(tansu.bootstrap, ["edge.alarms", "edge.telemetry"], 300)
    by_key: dict[tuple[str, bytes], list[int]] = {}
    for record in records:
        by_key.setdefault((record.topic, record.key), []).append(offset_of(record))
    # First matching route; in log order per key (the order Kafka keeps, per partition).
    assert by_key == {("edge.alarms", b"alarms/x"): list(range(2, 301, 3)),
                      ("edge.telemetry", b"sensors/a"): list(range(3, 301, 3)),
                      ("edge.telemetry", b"sensors/b"): list(range(1, 301, 3))}
    first = next(r for r in records if offset_of(r) == 1)
    headers = {k: v.decode() for k, v in first.headers}
    assert first.key == b"sensors/b" and first.value == b"m1"
    assert decode_text(headers["mqtt-topic"]) == "sensors/b"
    assert headers["mqtt-qos"] == "1" and headers["mqtt-client-id"] == "dev1"
    assert headers["edge-message-id"] == f"gw7-{STORE_ID}-1"


async def test_key_can_be_the_client_id(tansu: Tansu) -> None:
    sink = KafkaSink(bridge_config(tansu.bootstrap, key="client_id"), gateway_id="gw7",
                     store_id=STORE_ID)
    await sink.start()
    try:
        assert await sink.send(messages(1, 4)) == 4
    finally:
        await sink.close()
    records = await consume(tansu.bootstrap, ["edge.telemetry", "edge.alarms"], 4)
    assert sorted((offset_of(r), r.key) for r in records) == [
        (1, b"dev1"), (2, b"dev0"), (3, b"dev1"), (4, b"dev0")]


async def test_blackholed_uplink_then_reconnect_delivers_everything_in_order(
        tmp_path: Path) -> None:
    server = Tansu(tmp_path / "tansu")
    proxy = await TcpProxy("127.0.0.1", server.port).start()
    server.advertised_port = proxy.port  # clients reach the broker only through the proxy
    server.start()
    sink = KafkaSink(bridge_config(proxy.address), gateway_id="gw7", store_id=STORE_ID,
                     ack_timeout=1.5)
    try:
        await sink.start()
        cursor = 1
        cursor += await sink.send(messages(cursor, 100))
        proxy.blackhole()
        with pytest.raises(BridgeError):
            cursor += await sink.send(messages(cursor, 100))
        await sink.close()
        proxy.cut()
        proxy.forward()
        while cursor <= 600:  # the bridge loop: reconnect and resend from the cursor
            try:
                if sink._producer is None:
                    await sink.start()
                cursor += await sink.send(messages(cursor, min(100, 601 - cursor)))
            except BridgeError:
                await sink.close()
        await sink.close()
        records = await consume(server.bootstrap, ["edge.telemetry", "edge.alarms"], 600)
    finally:
        await sink.close()
        await proxy.close()
        server.kill()
    counts = Counter(offset_of(r) for r in records)
    assert set(counts) == set(range(1, 601))  # nothing lost
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates == 0  # nothing reached tansu during the blackhole
    for key in (b"sensors/a", b"sensors/b", b"alarms/x"):
        seen = [offset_of(r) for r in records if r.key == key]
        assert seen == sorted(seen)  # in log order per key (one key, one partition)


async def test_downlink_consumer_group_commits_after_local_commit(tansu: Tansu) -> None:
    config = bridge_config(tansu.bootstrap, downlink=["edge.cmd.gw7"])
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    await producer.start()
    try:
        # One key, so one partition and one order (auto-created topics have several).
        await producer.send_and_wait("edge.cmd.gw7", b"open", key=b"gw7", headers=[
            ("mqtt-topic", b"cmd/valve%201"), ("mqtt-qos", b"2")])
        await producer.send_and_wait("edge.cmd.gw7", b"close", key=b"gw7")  # prefix + topic
        await producer.send_and_wait("edge.cmd.gw7", b"third", key=b"gw7")
    finally:
        await producer.stop()

    async def take(source: KafkaDownlink, count: int) -> list[Any]:
        out = []
        async for message in source.messages():
            out.append(message)
            if len(out) == count:
                break
        return out

    first = KafkaDownlink(config, fetch_timeout=0.5, session_timeout=1.0)
    await first.start()
    got = await asyncio.wait_for(take(first, 2), 30)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("cmd/valve 1", b"open", 2), ("cmd/edge.cmd.gw7", b"close", 1)]
    await first.ack(got[0])  # committed locally, acknowledged; got[1]: crash before the ack
    await first.close()

    again = KafkaDownlink(config, fetch_timeout=0.5, session_timeout=1.0)
    await again.start()
    redelivered = await asyncio.wait_for(take(again, 2), 30)
    assert [(m.payload, m.source, m.position) for m in redelivered] == [
        (b"close", got[1].source, got[1].position), (b"third", got[1].source,
                                                     got[1].position + 1)]
    await again.close()


async def test_idempotence_on_a_broker_without_it_fails_fast_with_the_fix(tansu: Tansu) -> None:
    """tansu 0.6 answers InitProducerId with an error (why the other tests turn idempotence
    off): the sink says so at start instead of hanging on its first send."""
    sink = KafkaSink(bridge_config(tansu.bootstrap, idempotence=True), gateway_id="gw7",
                     store_id=STORE_ID, ack_timeout=5.0)
    with pytest.raises(BridgeError, match="set idempotence = false"):
        await sink.start()
    await sink.close()


def test_cached_record_parts_are_the_documented_headers_routes_and_keys() -> None:
    """The per-topic cache (KafkaSink._record_parts) gives every message exactly the route,
    key and headers (names, values, order) of its own `headers()`, as computed uncached."""
    varied = [
        BridgeMessage(offset=7, topic="sensors/a", payload=b"1", qos=1, client_id="dev1",
                      publish_time=1_765_000_000.5),
        BridgeMessage(offset=8, topic="sensors/a", payload=b"2", qos=0, retain=True,
                      client_id="", publish_time=1_765_000_000.75),
        BridgeMessage(offset=9, topic="alarms/x y", payload=b"3", qos=2, client_id="dev 2",
                      content_type="text/plain", payload_utf8=True,
                      user_properties=(("a", "1"), ("\u00e9", " ")),
                      publish_time=1_765_000_001.0),
        BridgeMessage(offset=10, topic="other/t", payload=b"4", qos=1, client_id="dev1"),
        BridgeMessage(offset=11, topic="sensors/a", payload=b"5", qos=1, client_id="dev1",
                      user_properties=(("k", "v"),), publish_time=1_765_000_002.0),
    ]
    for key in ("topic", "client_id"):
        sink = KafkaSink(bridge_config("127.0.0.1:9", key=key), gateway_id="gw-7",
                         store_id=STORE_ID)
        for _ in range(2):  # the second round from the cache
            for message in varied:
                topic, record_key, headers = sink._record_parts(message)
                expected_topic = {"sensors": "edge.telemetry", "alarms": "edge.alarms"}.get(
                    message.topic.split("/")[0])
                assert topic == expected_topic
                if topic is None:
                    continue
                assert record_key == sink.record_key(message)
                mid = f"gw-7-{STORE_ID}-{message.offset}"
                assert headers == [(k, v.encode()) for k, v in message.headers(mid).items()]


def test_cached_partition_is_the_default_partitioners() -> None:
    """Records carry the partition aiokafka's own default partitioner would choose (murmur2
    of the key), so per-key order and placement are as without the cache."""
    from types import SimpleNamespace

    from aiokafka.partitioner import DefaultPartitioner

    class Cluster:
        def __init__(self) -> None:
            self.known: dict[str, set[int]] = {}

        def partitions_for_topic(self, topic: str) -> set[int] | None:
            return self.known.get(topic)

        def available_partitions_for_topic(self, topic: str) -> set[int] | None:
            return self.known.get(topic)

    cluster = Cluster()
    sink = KafkaSink(bridge_config("127.0.0.1:9"), gateway_id="gw7", store_id=STORE_ID)
    sink._producer = SimpleNamespace(client=SimpleNamespace(cluster=cluster))
    assert sink._partition_of("edge.telemetry", b"sensors/a") is None  # no metadata yet
    cluster.known["edge.telemetry"] = {0, 1, 2, 3, 4, 5, 6}
    keys = [f"sensors/{n}".encode() for n in range(50)]
    for _ in range(2):  # the second round from the cache
        for key in keys:
            assert sink._partition_of("edge.telemetry", key) == DefaultPartitioner()(
                key, [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6])
    assert len({sink._partition_of("edge.telemetry", k) for k in keys}) > 1


async def test_windows_in_flight_at_once_arrive_in_order_per_key(tansu: Tansu) -> None:
    """The forwarder keeps several windows in flight; while a partition's batches wait for
    their answer the next windows gather in one batch (kafka.py `_PartitionLane`). Every
    window is acknowledged in full and each key's records arrive in log order, also with a
    large record (which goes through `producer.send`) between them."""
    from edge_broker.bridge.kafka import LARGE_RECORD

    sink = KafkaSink(bridge_config(tansu.bootstrap), gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    try:
        windows = [messages(1 + 100 * n, 100) for n in range(12)]
        big = windows[6][50]
        windows[6][50] = BridgeMessage(offset=big.offset, topic=big.topic, qos=1,
                                       payload=b"x" * (LARGE_RECORD + 1))
        acks = [await sink.submit(window) for window in windows]
        assert [await ack for ack in acks] == [100] * 12
    finally:
        await sink.close()
    records = await consume(tansu.bootstrap, ["edge.alarms", "edge.telemetry"], 1200)
    by_key: dict[bytes, list[int]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(offset_of(record))
    assert by_key == {b"alarms/x": list(range(2, 1201, 3)),
                      b"sensors/a": list(range(3, 1201, 3)),
                      b"sensors/b": list(range(1, 1201, 3))}



async def test_submit_does_not_wait_for_a_slow_broker(tmp_path: Path) -> None:
    """While the broker does not answer, the windows after the first ones are still taken
    at once (they gather per partition): the forwarder goes on reading the log instead of
    waiting inside `submit` for aiokafka to take the partition's previous batch. Their
    acknowledgements still wait for the broker: none is acknowledged while it is silent."""
    server = Tansu(tmp_path / "tansu")
    proxy = await TcpProxy("127.0.0.1", server.port).start()
    server.advertised_port = proxy.port
    server.start()
    sink = KafkaSink(bridge_config(proxy.address), gateway_id="gw7", store_id=STORE_ID,
                     ack_timeout=2.0)
    try:
        await sink.start()
        assert await sink.send(messages(1, 30)) == 30  # metadata known, partitions cached
        proxy.blackhole()
        acks = []
        for n in range(6):  # each within a second although nothing is answered
            acks.append(await asyncio.wait_for(sink.submit(messages(31 + 30 * n, 30)), 1.0))
        for ack in acks:
            with pytest.raises(BridgeError):
                await ack
    finally:
        await sink.close()
        await proxy.close()
        server.kill()


async def test_after_a_refused_batch_nothing_later_of_the_partition_is_sent() -> None:
    """When aiokafka refuses a partition's batch (`send_batch` raises), the records after it
    are not handed over on that connection (they would be stored before the refused ones,
    which the forwarder sends again from its cursor): they fail with it."""
    from edge_broker.bridge.kafka import _PartitionLane

    class Builder:
        def __init__(self) -> None:
            self.records: list[bytes] = []

        def append(self, *, key: bytes, value: bytes, timestamp: None,
                   headers: list[tuple[str, bytes]]) -> object | None:
            if len(self.records) == 2:
                return None  # full
            self.records.append(value)
            return object()

        def close(self) -> None:
            pass

    class Producer:
        def __init__(self) -> None:
            self.sent: list[list[bytes]] = []

        def create_batch(self) -> Builder:
            return Builder()

        async def send_batch(self, builder: Builder, topic: str, *, partition: int) -> Any:
            if not self.sent:
                self.sent.append(builder.records)
                raise RuntimeError("refused")
            self.sent.append(builder.records)
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    producer = Producer()
    lane = _PartitionLane(producer, "t", 0)  # type: ignore[arg-type]
    first = [lane.append(b"k", b"m%d" % n, []) for n in range(5)]  # three batches
    with pytest.raises(RuntimeError):
        await first[0]
    for outcome in first[2:]:
        with pytest.raises(RuntimeError):
            await outcome
    with pytest.raises(RuntimeError):
        await lane.append(b"k", b"m5", [])
    lane.close()
    assert producer.sent == [[b"m0", b"m1"]]


async def test_every_record_of_a_drain_carries_its_own_documented_headers(tansu: Tansu) -> None:
    """Windows of messages from several publishers and topics, some with MQTT 5 properties,
    arrive with exactly the documented headers of each message (names, values, order),
    also when the fixed part of its headers comes from the sink's per-topic cache
    (`KafkaSink._routes`): nothing of one message leaks into another's record."""
    variants = [
        {"topic": "sensors/a", "qos": 1, "client_id": "dev1"},
        {"topic": "sensors/b", "qos": 0, "retain": True, "client_id": ""},
        {"topic": "alarms/x y", "qos": 2, "client_id": "dev 2", "content_type": "text/plain",
         "payload_utf8": True, "user_properties": (("a", "1"), ("\u00e9", " "))},
        {"topic": "sensors/a", "qos": 1, "client_id": "dev3",
         "user_properties": (("k", "v"),)},
    ]
    window = [BridgeMessage(offset=o, payload=b"v%d" % o,
                            publish_time=1_765_000_000.0 + o // 7 * 0.25,
                            **variants[o % len(variants)])  # type: ignore[arg-type]
              for o in range(1, 401)]
    sink = KafkaSink(bridge_config(tansu.bootstrap), gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    try:
        acks = [await sink.submit(window[at:at + 100]) for at in range(0, 400, 100)]
        assert [await ack for ack in acks] == [100] * 4
    finally:
        await sink.close()
    records = await consume(tansu.bootstrap, ["edge.alarms", "edge.telemetry"], 400)
    by_offset = {offset_of(r): r for r in records}
    assert sorted(by_offset) == list(range(1, 401))
    for message in window:
        record = by_offset[message.offset]
        mid = f"gw7-{STORE_ID}-{message.offset}"
        assert list(record.headers) == [(k, v.encode())
                                        for k, v in message.headers(mid).items()]
        assert record.value == message.payload
        assert record.key == message.topic.encode()


async def test_a_batch_handed_over_counts_the_records_appended_to_it() -> None:
    """The lane appends to aiokafka's record builder itself (kafka_records.py `record_adder`); the
    batch it hands over says how many records it holds (aiokafka's idempotent producer
    numbers the next batch's records from it), also for a batch that filled up."""
    from aiokafka.producer.message_accumulator import BatchBuilder

    from edge_broker.bridge.kafka import _PartitionLane

    class Producer:
        def __init__(self) -> None:
            self.handed: list[tuple[int, int]] = []  # (record_count(), records in the bytes)

        def create_batch(self) -> BatchBuilder:
            return BatchBuilder(16 * 1024, 0)

        async def send_batch(self, builder: BatchBuilder, topic: str, *,
                             partition: int) -> Any:
            from aiokafka.record.default_records import DefaultRecordBatch

            data = builder._build()
            self.handed.append((builder.record_count(), len(list(DefaultRecordBatch(data)))))
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    producer = Producer()
    lane = _PartitionLane(producer, "t", 0)  # type: ignore[arg-type]
    outcomes = [lane.append(b"k", b"x" * 100, [("h", b"1")]) for _ in range(300)]
    await asyncio.gather(*outcomes)
    lane.close()
    assert len(producer.handed) > 1  # one filled up
    assert sum(count for count, _ in producer.handed) == 300
    assert all(count == records for count, records in producer.handed)
