"""The record batches the Kafka sink encodes itself (bridge/kafka_records.py `RecordBatch`):
the same bytes as aiokafka's own builder for the same records (header, CRC, varints,
headers, producer state of the idempotent producer), read back by aiokafka's parser, and a
lane's batches handed over with the count of the records in them."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.record._crecords import crc32c_cython
from aiokafka.record.default_records import (
    DefaultRecordBatch,
    DefaultRecordBatchBuilder,
)

from edge_broker.bridge.kafka_records import (
    Clock,
    PartitionLane,
    RecordBatch,
    Route,
    fill,
    header_bytes,
    varint,
)
from edge_broker.bridge.message import BridgeMessage

LIMIT = 16 * 1024


def records(count: int) -> list[tuple[int, bytes, bytes, list[tuple[str, bytes]]]]:
    out = []
    for n in range(count):
        headers = [("edge-message-id", b"gw-5eed-%d" % (n * 977)), ("mqtt-topic", b"t/%d" % n),
                   ("h\u00e9", b"x" * (n * 37 % 300))]
        out.append((1_765_000_000_000 + n * 3 - (5 if n == 4 else 0), b"key-%d" % (n % 3),
                    b"v" * (n * 53 % 9000), headers[: n % 4]))
    return out


def test_a_batch_is_the_bytes_aiokafkas_builder_makes() -> None:
    ours = RecordBatch(LIMIT, crc32c_cython)
    theirs = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, 0, LIMIT)
    taken = 0
    for n, (ts, key, value, headers) in enumerate(records(200)):
        fits = ours.add_headers(ts, key, value, headers)
        assert fits == (theirs.append(n, ts, key, value, headers) is not None)
        if not fits:
            break
        taken += 1
    assert 5 < taken < 200  # it filled up where aiokafka's does
    assert ours.record_count() == taken
    # the idempotent producer's state, set on a handed-over batch before it is built
    ours._set_producer_state(4242, 7, 1000)
    theirs.set_producer_state(4242, 7, 1000)
    built = ours._build()
    assert bytes(built) == bytes(theirs.build())
    assert ours.size() == len(built) and ours.closed()
    read = list(DefaultRecordBatch(bytes(built)))
    assert [(r.key, r.value, list(r.headers)) for r in read] == [
        (key, value, headers) for _, key, value, headers in records(taken)]


async def test_the_route_parts_encode_the_records_of_the_header_list() -> None:
    """`fill`'s record (route key, encoded fixed headers, message id, publish time) is the
    record of the same headers given as a list."""
    fixed = (("mqtt-topic", b"sensors/a"), ("mqtt-qos", b"1"), ("mqtt-client-id", b"dev%201"))
    by_parts = RecordBatch(LIMIT, crc32c_cython)
    by_list = RecordBatch(LIMIT, crc32c_cython)
    lane = PartitionLane(None, "t", 0, crc32c_cython, LIMIT)
    route = Route(lane, b"sensors/a", fixed)
    clock = Clock()
    clock.update(1_765_000_000.25)
    for offset in (1, 300, 70000):
        mid = b"gw7-5eed-%d" % offset
        assert by_parts.add(7, route.key_bytes, b"p", route.head, mid, route.fixed_bytes,
                            clock.encoded)
        assert by_list.add_headers(7, b"sensors/a", b"p", [
            ("edge-message-id", mid), *fixed, ("mqtt-publish-time", clock.value)])
    assert clock.value == b"2025-12-06T05:46:40.250Z"
    assert clock.encoded == header_bytes("mqtt-publish-time", clock.value)
    assert bytes(by_parts._build()) == bytes(by_list._build())
    lane.close()


def test_varints_are_kafkas() -> None:
    from aiokafka.record.util import encode_varint

    for value in (0, 1, -1, 63, 64, -64, -65, 8191, 8192, 300000, -300000, 1 << 40):
        out = bytearray()
        encode_varint(value, out.append)
        assert varint(value) == bytes(out)


async def test_fill_appends_a_window_to_record_batches_that_count_their_records() -> None:
    class Producer:
        def __init__(self) -> None:
            self.handed: list[tuple[int, list[Any]]] = []

        async def send_batch(self, builder: Any, topic: str, *, partition: int) -> Any:
            data = bytes(builder._build())
            self.handed.append((builder.record_count(), list(DefaultRecordBatch(data))))
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    producer = Producer()
    lane = PartitionLane(producer, "t", 0, crc32c_cython, 4096)
    lane.append(b"k", b"first", [])  # opens a batch (as `_submit_one` does)
    routes = {("t/a", 1, False, "dev1"): Route(lane, b"t/a", (("mqtt-qos", b"1"),))}
    window = [BridgeMessage(n, "t/a", b"m%d" % n * 20, 1, False, 1_765_000_000.0 + n // 50,
                            "dev1") for n in range(1, 301)]
    owners: list[Any] = []
    assert fill(window, 0, routes, b"gw-", 123, Clock(), 1 << 20, owners) == 300
    await asyncio.gather(*owners)
    lane.close()
    assert len(producer.handed) > 2  # several filled up
    assert sum(count for count, _ in producer.handed) == 301
    assert all(count == len(read) for count, read in producer.handed)
    read = [r for _, batch in producer.handed for r in batch][1:]
    assert [r.value for r in read] == [m.payload for m in window]
    assert [dict(r.headers)["edge-message-id"] for r in read] == [
        b"gw-%d" % m.offset for m in window]
    assert {dict(r.headers)["mqtt-publish-time"] for r in read} == {
        b"2025-12-06T05:46:%02d.000Z" % s for s in range(40, 47)}
