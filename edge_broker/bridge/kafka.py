"""The Kafka sink and downlink source (aiokafka). Imported only for a "kafka" bridge.

Uplink: `KafkaSink.send(batch)` hands the whole window to the producer at once (it batches
per partition), each record to the Kafka topic of the first matching `topic_map` route, with
key = the MQTT topic (default) or the publishing client id, value = the raw payload and the
documented headers (`edge-message-id` among them), then waits for the acks in order
(`acks=all`). It returns how many from the start of the window are stored; a message that
matches no route is not sent, counted in `unrouted` (the forwarder's figure: `take_passed`)
and logged once per topic, and counts as done so the cursor moves.

Too large: a record larger than the producer's `max_request_size` (MAX_REQUEST_BYTES, 1 MiB:
aiokafka's estimate of the record with its key and headers) is not sent: the window is cut
before it (`written`), and when it is the window's first, `submit` raises `Refused`
(bridge/base.py: the forwarder skips it and counts it in `refused`). When the broker refuses
the batch of a window's first record as too large (MESSAGE_TOO_LARGE: over its
`message.max.bytes` or the topic's `max.message.bytes`) the window goes again (`Resend`)
with that record alone in a batch of its own; refused alone too, it is `Refused`.

Idempotence: the idempotent producer is on by default (`idempotence = true`), so producer
retries never duplicate. A resend after an outage or a crash (a new producer) can still
store a record twice: consumers drop it by `edge-message-id`. tansu 0.6 answers
InitProducerId with an error, so with tansu set `idempotence = false` (the tests do).

Downlink: `KafkaDownlink` is a consumer group member on the downlink topics, auto commit
off; each record is yielded with source `<topic>:<partition>` and its offset as position,
and `ack(message)` commits offset + 1 for its partition after the local commit. The local
topic is the record's `mqtt-topic` header, else `<downlink_local_prefix><kafka topic>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

try:  # aiokafka's compiled CRC-32C: the sink encodes its own record batches with it
    from aiokafka.record._crecords import crc32c_cython as _CRC32C
except ImportError:  # pragma: no cover - aiokafka without its extensions: its own batches
    _CRC32C = None

import logging

from edge_broker.errors import BridgeError

from .base import (
    H_CONTENT_TYPE,
    H_MESSAGE_ID,
    H_PAYLOAD_FORMAT,
    H_PUBLISH_TIME,
    H_QOS,
    H_RETAIN,
    H_TOPIC,
    H_USER_PROPERTIES,
    BridgeMessage,
    DownlinkMessage,
    OncePerKey,
    Refused,
    Resend,
    decode_text,
    decode_user_properties,
    message_id,
    shown_topic,
    ssl_context,
)
from .config import BridgeConfig, KafkaOptions
from .kafka_records import Clock, Route, fill
from .kafka_records import PartitionLane as _PartitionLane
from .topic_map import route_kafka

__all__ = ["KafkaDownlink", "KafkaSink", "_PartitionLane", "client_options"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES: Final = 1024 * 1024  # the producer's max_request_size (aiokafka's default)
MAX_BATCH_BYTES: Final = 512 * 1024  # half of it
LARGE_RECORD: Final = MAX_BATCH_BYTES // 2  # payloads above it go through producer.send
PARTS_CACHE: Final = 4096  # (topic, qos, retain, client id) whose record parts are kept
_OPTIONAL: Final = (H_CONTENT_TYPE, H_PAYLOAD_FORMAT, H_USER_PROPERTIES)
_PARTITIONER: Final = DefaultPartitioner()  # what AIOKafkaProducer uses when not told otherwise
_UNROUTED: dict[str, OncePerKey] = {}  # bridge -> the unrouted topics logged


def _too_large(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> Refused | None:
    """`Refused` for a record the producer would refuse (larger than its max_request_size,
    as aiokafka estimates it in `send`), else None."""
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    if size <= MAX_REQUEST_BYTES:
        return None
    return Refused(f"the Kafka record would be {size:,} bytes, over the producer's "
                   f"max_request_size of {MAX_REQUEST_BYTES:,}", "max_request_size")


def _kafka(config: BridgeConfig) -> KafkaOptions:
    if config.kafka is None:
        raise BridgeError(f"bridge {config.name!r} is not a kafka bridge")
    return config.kafka


def client_options(config: BridgeConfig) -> dict[str, Any]:
    """Keyword arguments shared by the producer and the consumer: servers, SASL, TLS."""
    kafka = _kafka(config)
    context = ssl_context(config.tls)
    sasl = kafka.sasl_mechanism is not None
    protocol = {(False, False): "PLAINTEXT", (True, False): "SSL",
                (False, True): "SASL_PLAINTEXT", (True, True): "SASL_SSL"}[
        (context is not None, sasl)]
    options: dict[str, Any] = {"bootstrap_servers": list(config.servers),
                               "security_protocol": protocol,
                               "client_id": f"edge-broker-{config.name}"}
    if context is not None:
        options["ssl_context"] = context
    if sasl:
        options.update(sasl_mechanism=kafka.sasl_mechanism,
                       sasl_plain_username=config.username,
                       sasl_plain_password=config.password)
    return options


class KafkaSink:
    """Uplink to Kafka topics. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, gateway_id: str, store_id: str,
                 ack_timeout: float | None = None) -> None:
        self.config = config
        self.options = _kafka(config)
        self.gateway_id = gateway_id
        self.store_id = store_id
        self.ack_timeout = config.ack_timeout_s if ack_timeout is None else ack_timeout
        self.unrouted = 0
        """Messages no `topic_map` entry sends (not sent; the cursor moves on)."""
        self.written = 0
        """How many of the last window `submit` handed over: fewer than the window when it
        cut it before a record too large (bridge/forward.py)."""
        self._passed: dict[int, int] = {}  # window's first offset -> its unrouted (acked)
        self._alone = 0  # the offset of a record to send alone (its batch was too large)
        self._producer: AIOKafkaProducer | None = None
        message_id(gateway_id, store_id, 1)  # ValueError for ids that cannot be one
        self._mid_prefix = f"{gateway_id}-{store_id}-"
        self._mid_prefix_bytes = self._mid_prefix.encode()
        # (MQTT topic, QoS, retain, client id) -> its partition's lane, record key and the
        # headers that depend only on these: `submit`'s one look-up per record.
        self._routes: dict[tuple[str, int, bool, str], Route] = {}
        # aiokafka's CRC-32C when the lanes encode their own batches (no compression)
        self._crc = _CRC32C if self.options.compression == "none" else None
        self._parts: dict[tuple[str, int, bool, str],
                          tuple[str | None, bytes, list[tuple[str, bytes]]]] = {}
        self._partitions: dict[tuple[str, bytes], int] = {}  # (Kafka topic, key) -> partition
        self._lanes: dict[tuple[str, int], _PartitionLane] = {}  # (Kafka topic, partition)
        self._clock = Clock()  # the publish time last formatted, and its header

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            **client_options(self.config), acks="all",
            enable_idempotence=self.options.idempotence,
            compression_type=None if self.options.compression == "none"
            else self.options.compression,
            request_timeout_ms=int(self.ack_timeout * 1000), linger_ms=5,
            max_request_size=MAX_REQUEST_BYTES,
            # Bigger record batches than aiokafka's 16 KiB: it has one request in flight
            # per broker, each with at most one batch per partition, so the batch size
            # bounds what a round trip carries (a drain of small records was ~60 per trip).
            max_batch_size=MAX_BATCH_BYTES)
        try:
            await asyncio.wait_for(producer.start(), self.ack_timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            hint = ""
            if self.options.idempotence and isinstance(exc, KafkaError):
                hint = ("; if this broker does not support idempotent producers "
                        "(InitProducerId; tansu 0.6 does not), set idempotence = false")
            raise BridgeError(f"cannot connect to Kafka {list(self.config.servers)}: "
                              f"{exc!r}{hint}") from exc
        self._producer = producer

    def record_key(self, message: BridgeMessage) -> bytes:
        value = message.client_id if self.options.key == "client_id" else message.topic
        return value.encode()

    def _record_parts(self, message: BridgeMessage
                      ) -> tuple[str | None, bytes, list[tuple[str, bytes]]]:
        """(Kafka topic or None when no route takes it, key, headers) of a message. What
        depends only on the topic and the publisher (the route, the key, the encoded
        `mqtt-topic`/`-qos`/`-retain`/`-client-id` headers) is computed once per such
        combination and cached: it was a large share of the CPU time per message."""
        cache_key = (message.topic, message.qos, message.retain, message.client_id)
        parts = self._parts.get(cache_key)
        if parts is None:
            if len(self._parts) >= PARTS_CACHE:
                self._parts.clear()
            probe = BridgeMessage(1, message.topic, b"", message.qos, message.retain, 0.0,
                                  message.client_id)
            static = [(k, v.encode()) for k, v in probe.headers("-").items()
                      if k not in (H_MESSAGE_ID, H_PUBLISH_TIME)]
            parts = self._parts[cache_key] = (
                route_kafka(self.options.topic_map, message.topic), self.record_key(message),
                static)
        topic, key, static = parts
        if topic is None:
            return None, key, []
        mid = (self._mid_prefix + str(message.offset)).encode()
        headers = [(H_MESSAGE_ID, mid), *static, (H_PUBLISH_TIME, self._time_of(message))]
        if (message.content_type is not None or message.payload_utf8
                or message.user_properties):
            full = message.headers("-")  # the optional ones, in the documented order
            headers += [(k, full[k].encode()) for k in _OPTIONAL if k in full]
        return topic, key, headers

    def _time_of(self, message: BridgeMessage) -> bytes:
        """The `mqtt-publish-time` value of a message (`_clock`: a window's messages often
        share it)."""
        clock = self._clock
        if message.publish_time != clock.at:
            clock.update(message.publish_time)
        return clock.value

    def _partition_of(self, topic: str, key: bytes) -> int | None:
        """The partition aiokafka's default partitioner gives `key` (murmur2 of the key over
        the topic's partitions), worked out once per (topic, key) and cached: aiokafka's
        murmur2 is pure Python and was the largest single cost per record. None while the
        topic's metadata is not known yet (aiokafka then partitions it itself, the same way).
        The cache lives as long as the sink (one connection): partitions added to a topic
        meanwhile take new keys only after the next reconnect."""
        cache = self._partitions
        partition = cache.get((topic, key))
        if partition is None:
            cluster: Any = getattr(getattr(self._producer, "client", None), "cluster", None)
            if cluster is None:
                return None
            partitions = cluster.partitions_for_topic(topic)
            if not partitions:
                return None
            available = cluster.available_partitions_for_topic(topic) or ()
            partition = int(_PARTITIONER(key, list(partitions), list(available)))
            if len(cache) >= PARTS_CACHE:
                cache.clear()
            cache[(topic, key)] = partition
        return partition

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        """Send the window; the number acknowledged from its start (see module doc)."""
        if not batch:
            return 0
        return await (await self.submit(batch))

    async def submit(self, batch: Sequence[BridgeMessage]) -> asyncio.Future[int]:
        """Hand the window to the producer; a future of the number acknowledged from its
        start (`PipelinedSink`, bridge/forward.py).

        The records go into record batches built here, one open batch per (Kafka topic,
        partition) (`_PartitionLane`), handed over with `send_batch` (aiokafka's public
        batch API): one future per batch instead of one per record, and none of `send`'s
        per-record metadata check, partitioner and accumulator walk. The partition is the
        one `send` would choose (`_partition_of`); records keep their order per partition.
        While a partition has LANE_OUTSTANDING (kafka_records.py) batches with aiokafka, the windows
        after them gather in its open batch, so one produce request carries what arrived during a
        round trip (aiokafka sends one request per broker at a time, with one batch per partition:
        handing over a batch per window limited a drain to one window per round trip). A record too
        large for a batch of its own, or of a topic whose partitions are not known, goes through
        `send`, after its partition's records before it were handed over (order per partition
        holds).

        Per record (a drain's hot path, CPU per message), in `fill` (bridge/kafka_records.py,
        compiled): one look-up of its route (`_routes`, per topic and publisher: its lane,
        key and fixed headers, encoded once), its message id, and the append to its lane's
        open `RecordBatch`. What `fill` does not take goes through `_append` (the lane's
        `append`, aiokafka's batches) or `_submit_one` (no route yet, large)."""
        if not batch:
            raise BridgeError("nothing to send")
        if self._producer is None:
            raise BridgeError("send before start")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        self.written = len(batch)
        if batch[0].offset == self._alone:  # its batch was too large: alone now
            self.written = 1
            owner = await self._submit_alone(batch[0])
            return asyncio.ensure_future(self._collect([owner], deadline, batch[0].offset))
        # Per message the future of its batch (None: unrouted, done), in window order.
        owners: list[asyncio.Future[Any] | None] = []
        routes = self._routes
        prefix = self._mid_prefix_bytes
        clock = self._clock
        now_ms = int(time.time() * 1000)  # the records' timestamp: when they were sent
        end = len(batch)
        at = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    at = fill(batch, at, routes, prefix, now_ms, clock, LARGE_RECORD, owners)
                    if at >= end:
                        break
                    message = batch[at]
                    route = routes.get((message.topic, message.qos, message.retain,
                                        message.client_id))
                    if route is None or len(message.payload) > LARGE_RECORD:
                        owners.append(await self._submit_one(message))
                    else:
                        owners.append(self._append(route, message))
                    at += 1
        except Refused:  # a record too large: the window ends before it
            if not owners:
                raise
            self.written = len(owners)
        except (KafkaError, TimeoutError) as exc:
            if not any(f is not None for f in owners):
                raise BridgeError(f"Kafka send failed: {exc!r}") from exc
            self.written = len(owners)
        return asyncio.ensure_future(self._collect(owners, deadline, batch[0].offset))

    def _append(self, route: Route, message: BridgeMessage) -> asyncio.Future[Any]:
        """A message of a known route through its lane's `append`: the headers as a list
        (aiokafka's batches; a message with MQTT 5 properties; a new publish time)."""
        headers = [(H_MESSAGE_ID, self._mid_prefix_bytes + str(message.offset).encode()),
                   *route.fixed, (H_PUBLISH_TIME, self._time_of(message))]
        if (message.content_type is not None or message.payload_utf8
                or message.user_properties):
            full = message.headers("-")  # the optional ones, in the documented order
            headers += [(k, full[k].encode()) for k in _OPTIONAL if k in full]
        # (Without user properties a record cannot exceed MAX_REQUEST_BYTES here: its
        # payload is at most LARGE_RECORD and its topic and client id at most 64 KiB.)
        if message.user_properties and (refused := _too_large(route.key, message.payload,
                                                              headers)) is not None:
            raise refused
        return route.lane.append(route.key, message.payload, headers)

    async def _submit_one(self, message: BridgeMessage) -> asyncio.Future[Any] | None:
        """`submit` for a message with no entry in `_routes` yet (it makes one once the
        partition is known), one no route takes (None), or a large one (`producer.send`)."""
        producer = self._producer
        assert producer is not None
        topic, key, headers = self._record_parts(message)
        if topic is None:
            self._note_unrouted(message)
            return None
        refused = _too_large(key, message.payload, headers)
        if refused is not None:
            raise refused
        partition = self._partition_of(topic, key)
        if partition is None:
            await producer.partitions_for(topic)  # waits for the metadata
            partition = self._partition_of(topic, key)
        lanes = self._lanes
        if partition is None or len(message.payload) > LARGE_RECORD:
            broken = None
            for (lane_topic, lane_partition), lane in list(lanes.items()):
                if lane_topic == topic and partition in (None, lane_partition):
                    await lane.hand_over_all()
                    broken = broken or lane.broken
            if broken is not None:
                return broken
            try:
                sent: asyncio.Future[Any] = await producer.send(
                    topic, message.payload, key=key, partition=partition, headers=headers)
            except MessageSizeTooLargeError as exc:  # (estimated as _too_large does)
                raise Refused(f"the producer refused it: {exc}", "max_request_size") from exc
            return sent
        found = lanes.get((topic, partition))
        if found is None:
            found = lanes[(topic, partition)] = _PartitionLane(
                producer, topic, partition, self._crc, MAX_BATCH_BYTES)
        routes = self._routes
        if len(routes) >= PARTS_CACHE:
            routes.clear()
        # The headers that depend only on the cache key: all but the first (the message
        # id) and the last two at most (the publish time, then the optional ones).
        fixed = tuple(h for h in headers if h[0] not in (H_MESSAGE_ID, H_PUBLISH_TIME,
                                                           *_OPTIONAL))
        routes[(message.topic, message.qos, message.retain, message.client_id)] = Route(
            found, key, fixed)
        return found.append(key, message.payload, headers)

    def _note_unrouted(self, message: BridgeMessage) -> None:
        """Log a topic no `topic_map` entry sends, once per topic (per bridge, for the
        first 1,000 such topics)."""
        noted = _UNROUTED.setdefault(self.config.name, OncePerKey())
        if noted.first(message.topic):
            log.warning("bridge %s: no topic_map entry sends topic %s (log offset %d): its "
                        "messages are not sent, counted in unrouted (logged once per topic%s)",
                        self.config.name, shown_topic(message.topic), message.offset,
                        f"; the {noted.limit:,}th such topic: no more are logged"
                        if noted.full else "")

    async def _submit_alone(self, message: BridgeMessage) -> asyncio.Future[Any] | None:
        """`message` in a record batch of its own (after its partition's records before
        it): the broker refused the batch it was in as too large; now its answer is about
        this record alone (`_collect`)."""
        producer = self._producer
        assert producer is not None
        topic, key, headers = self._record_parts(message)
        if topic is None:
            return None
        partition = self._partition_of(topic, key)
        if partition is None:
            await producer.partitions_for(topic)
            partition = self._partition_of(topic, key)
        for (lane_topic, lane_partition), lane in list(self._lanes.items()):
            if lane_topic == topic and partition in (None, lane_partition):
                await lane.hand_over_all()
        if partition is None:
            sent: asyncio.Future[Any] = await producer.send(topic, message.payload, key=key,
                                                            headers=headers)
            return sent
        builder = producer.create_batch()
        builder.append(key=key, value=message.payload, timestamp=None, headers=headers)
        builder.close()
        alone: asyncio.Future[Any] = await producer.send_batch(builder, topic,
                                                               partition=partition)
        return alone

    def take_passed(self, batch: Sequence[BridgeMessage],
                    acknowledged: int) -> tuple[int, int, int]:
        """(expired, refused, unrouted) of the window `batch` just acknowledged (its first
        `acknowledged`; bridge/forward.py): its unrouted messages, as `_collect` counted."""
        passed = self._passed
        if not passed:
            return 0, 0, 0
        first = batch[0].offset
        unrouted = min(passed.pop(first, 0), acknowledged)
        for stale in [offset for offset in passed if offset < first]:  # dropped windows
            del passed[stale]
        return 0, 0, unrouted

    def _note_passed(self, first: int, unrouted: int) -> None:
        """The unrouted count of the window starting at `first`, as `_collect` found it this
        time (none: an older count of a window that started there is forgotten)."""
        if unrouted:
            self._passed[first] = unrouted
        else:
            self._passed.pop(first, None)

    async def _collect(self, owners: list[asyncio.Future[Any] | None],
                       deadline: float, first: int) -> int:
        """Wait for the window's acks until `deadline`; how many from its start (the window
        starts at log offset `first`)."""
        loop = asyncio.get_running_loop()
        futures = set(owners)
        futures.discard(None)
        pending = [f for f in futures if f is not None and not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        failed = False
        for future in futures:
            # (exception() also marks it retrieved: asyncio does not log it)
            if future is not None and (not future.done() or future.cancelled()
                                       or future.exception() is not None):
                failed = True
        if not failed:  # the usual case: every batch of the window was stored
            if first == self._alone:
                self._alone = 0
            unrouted = owners.count(None)
            self.unrouted += unrouted
            self._note_passed(first, unrouted)
            return len(owners)
        acknowledged = 0
        unrouted = 0
        first_error: BaseException | None = None
        for future in owners:
            if future is None:
                unrouted += 1
                acknowledged += 1
                continue
            if not future.done() or future.cancelled():
                first_error = TimeoutError(f"no ack within {self.ack_timeout} s")
                break
            if (error := future.exception()) is not None:
                first_error = error
                break
            acknowledged += 1
        self.unrouted += unrouted
        self._note_passed(first, unrouted)
        if acknowledged == 0 and isinstance(first_error, MessageSizeTooLargeError):
            if first == self._alone:  # refused alone: this record, for good
                self._alone = 0
                raise Refused("the Kafka broker refused it as too large (MESSAGE_TOO_LARGE: "
                              "over its message.max.bytes or the topic's max.message.bytes)",
                              "broker_too_large") from first_error
            self._alone = first
            raise Resend("the Kafka broker refused a record batch as too large "
                         "(MESSAGE_TOO_LARGE); its first record goes again alone"
                         ) from first_error
        if acknowledged == 0 and first_error is not None:
            raise BridgeError(f"Kafka send failed: {first_error!r}") from first_error
        return acknowledged

    async def close(self) -> None:
        self._routes.clear()
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            lane.close()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)


class KafkaDownlink:
    """A consumer group member on the downlink topics. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, fetch_timeout: float = 1.0,
                 session_timeout: float = 30.0) -> None:
        self.config = config
        self.options = _kafka(config)
        self.fetch_timeout = fetch_timeout
        self.session_timeout = session_timeout
        """Seconds after which the group gives a silent member's partitions to another
        (a gateway that crashed holds its partitions this long)."""
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.config.downlink, **client_options(self.config),
            group_id=self.options.downlink_group, enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(self.session_timeout * 1000),
            rebalance_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=max(100, int(self.session_timeout * 1000) // 10))
        try:
            await consumer.start()
        except (KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise BridgeError(f"cannot connect to Kafka: {exc!r}") from exc
        self._consumer = consumer

    def local_topic(self, kafka_topic: str, headers: dict[str, str]) -> str:
        """The record's `mqtt-topic` header, else `<downlink_local_prefix><kafka topic>`. Not
        checked here: the broker counts, logs and acknowledges one that is not a valid topic
        (server/bridge_downlink.py)."""
        if H_TOPIC in headers:
            return decode_text(headers[H_TOPIC])
        return self.options.downlink_local_prefix + kafka_topic

    async def messages(self) -> AsyncIterator[DownlinkMessage]:
        if self._consumer is None:
            raise BridgeError("messages before start")
        while True:
            batches = await self._consumer.getmany(timeout_ms=int(self.fetch_timeout * 1000))
            for partition, records in batches.items():
                for record in records:
                    headers = {k: v.decode(errors="replace") for k, v in record.headers}
                    topic = self.local_topic(record.topic, headers)
                    props: tuple[tuple[str, str], ...] = ()
                    if H_USER_PROPERTIES in headers:
                        with contextlib.suppress(ValueError):
                            props = decode_user_properties(headers[H_USER_PROPERTIES])
                    qos = headers.get(H_QOS, "1")
                    message = DownlinkMessage(
                        topic=topic, payload=record.value or b"",
                        source=f"{partition.topic}:{partition.partition}",
                        position=record.offset, qos=int(qos) if qos in ("0", "1", "2") else 1,
                        retain=headers.get(H_RETAIN) == "1", user_properties=props,
                        handle=partition)
                    yield message

    async def ack(self, message: DownlinkMessage) -> None:
        if self._consumer is None:
            raise BridgeError("ack after close")
        partition = message.handle
        assert isinstance(partition, TopicPartition)
        await self._consumer.commit({partition: message.position + 1})

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5)
