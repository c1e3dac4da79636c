"""The Kafka sink and a broker that refuses a record batch as too large (MESSAGE_TOO_LARGE:
over its message.max.bytes or the topic's max.message.bytes). tansu has no such limit to
set, so the producer here is a stand-in for aiokafka's in front of such a broker (the calls
the sink makes: `send_batch`, `create_batch`, the cluster metadata), driven by the real
forwarder and the real sink.

The broker's answer is about a whole record batch, not a record: the window goes again with
its first record in a batch of its own (`Resend`); refused alone, that record is `Refused`
and skipped (the forwarder's `refused`); the others are stored, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatch

from edge_broker.bridge.base import Backoff, parse_message_id
from edge_broker.bridge.forward import Forwarder
from edge_broker.bridge.kafka import KafkaSink
from tests.bridge.memlog import MemoryLog
from tests.bridge.test_kafka import STORE_ID, bridge_config

LIMIT = 2000  # bytes of a record batch the broker takes


class OneRecord:
    """What the sink asks `create_batch` for: aiokafka's BatchBuilder, for one record."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, list[tuple[str, bytes]]]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: Any,
               headers: list[tuple[str, bytes]]) -> object:
        self.records.append((value, headers))
        return object()

    def close(self) -> None:
        pass

    def size(self) -> int:
        return sum(len(v) + sum(len(n) + len(h) for n, h in hs) for v, hs in self.records)

    def offsets(self) -> list[int]:
        return [_offset(headers) for _, headers in self.records]


def _offset(headers: Sequence[tuple[str, bytes]]) -> int:
    return parse_message_id(dict(headers)["edge-message-id"].decode())[2]


class LimitedBroker:
    """aiokafka's producer, as the sink calls it, with a broker behind it that refuses
    record batches over LIMIT bytes and stores the others (`stored`: their offsets)."""

    def __init__(self) -> None:
        cluster = SimpleNamespace(partitions_for_topic=lambda topic: {0},
                                  available_partitions_for_topic=lambda topic: {0})
        self.client = SimpleNamespace(cluster=cluster)
        self.stored: list[int] = []
        self.refused_batches: list[list[int]] = []

    def create_batch(self) -> OneRecord:
        return OneRecord()

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        if isinstance(batch, OneRecord):
            offsets = batch.offsets()
        else:  # the sink's own record batch (kafka_records.RecordBatch): its bytes
            offsets = [_offset(record.headers)
                       for record in DefaultRecordBatch(bytearray(bytes(batch._build())))]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if batch.size() > LIMIT:
            self.refused_batches.append(offsets)
            future.set_exception(MessageSizeTooLargeError())
        else:
            self.stored.extend(offsets)
            future.set_result(None)
        return future

    async def stop(self) -> None:
        pass


class LimitedSink(KafkaSink):
    def __init__(self, broker: LimitedBroker) -> None:
        super().__init__(bridge_config("127.0.0.1:1"), gateway_id="gw7", store_id=STORE_ID)
        self.broker = broker

    async def start(self) -> None:
        self._producer = self.broker  # type: ignore[assignment]


async def test_a_record_the_broker_refuses_alone_is_skipped_the_rest_stored_in_order() -> None:
    log = MemoryLog()
    sizes = [10, 10, 3000, 10, 10, 10]  # the third is over the broker's limit
    for size in sizes:
        log.append("sensors/a", b"p" * size)
    broker = LimitedBroker()
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    forwarder = Forwarder(lambda: LimitedSink(broker), log, cursor=0, window=8, depth=2,
                          sleep=sleep, backoff=Backoff(1.0, 8.0, rand=lambda: 0.5))
    for _ in range(50):
        if log.committed >= len(sizes):
            break
        await forwarder.step()
    assert log.committed == len(sizes)
    assert broker.stored == [1, 2, 4, 5, 6]
    # The window's batch refused: its first record goes alone (stored), the rest again in
    # one batch (refused), its first alone, ... until 3 alone: refused, skipped. Then 4-6
    # in one batch.
    assert broker.refused_batches == [[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6], [3, 4, 5, 6], [3]]
    status = forwarder.status
    assert (status.refused, status.forwarded) == (1, 5)
    assert status.failures == 3 and "MESSAGE_TOO_LARGE" in (status.last_error or "")
