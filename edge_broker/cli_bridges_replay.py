"""`edge-broker replay --bridge NAME`: history read back from the central log a bridge writes to.

The same options and output as `replay --stream` (cli_streams), with the bridge's own
configuration (servers, credentials, TLS):

- **jetstream**: an ephemeral pull consumer (no acks, in memory, removed at the end) on the
  bridge's stream (`jetstream_stream`) filtered to `<subject_prefix>.>` (this gateway's
  subjects only, in a stream that many gateways may share). Each subject maps back to its
  MQTT topic by the reverse of the escaping table. `offset` is the stream sequence; `--from N`
  starts at stream sequence N; `--since`/`--at` at the server's store time. It reads what the
  stream holds when the command starts, then stops.
- **kafka**: a consumer without a group assigned every partition of the `topic_map` topics.
  The topic is the record's `mqtt-topic` header. `offset` is the record's offset in its
  partition (printed with `kafka_topic` and `partition`); `--from N` starts every partition at
  offset N; `--since`/`--at` start where the broker's time index (ListOffsets by time) says
  and skip records older than the time by their timestamp (the producer's: when the gateway
  sent them). Partitions
  are printed one after another (sorted by topic, then partition), each in offset order, up to
  their end (what they hold when the command reads them).

Each line is the JSON object `replay --stream` prints (`offset`, `time`, `topic`, `qos`,
`retain`, `payload`, `payload_encoding`, `properties`), with the values of the documented
headers (`mqtt-publish-time` for `time`, ...), plus `message_id` (Kafka: the
`edge-message-id`, JetStream: the `Nats-Msg-Id`: the gateway, its store and the offset in the
gateway's log). `--topic` selects by MQTT filter on
the client side. The "mqtt" kind has no history to read (an MQTT broker keeps none).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from .bridge.base import (
    H_CONTENT_TYPE,
    H_MESSAGE_ID,
    H_PAYLOAD_FORMAT,
    H_PUBLISH_TIME,
    H_QOS,
    H_RETAIN,
    H_TOPIC,
    H_USER_PROPERTIES,
    NATS_MSG_ID,
    decode_text,
    decode_user_properties,
)
from .bridge.config import BridgeConfig
from .errors import BridgeError
from .mqtt.topics import topic_matches

Position = str | int | float
"""As `replay --stream`: "earliest", "latest", an offset/sequence (int) or a time (float)."""

PAGE = 256
TIMEOUT_S = 10.0
TAIL_S = 0.3
"""Kafka: how long a fetch past a partition's end waits for more (see _partition_records)."""


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _time_of(headers: dict[str, str], fallback: float) -> str:
    text = headers.get(H_PUBLISH_TIME)
    if text:
        try:
            return _iso(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return _iso(fallback)


def row(offset: int, topic: str, payload: bytes, headers: dict[str, str],
        stored_at: float) -> dict[str, Any]:
    """One remote message as `replay` prints it (the keys of `replay --stream`, then
    `message_id`)."""
    try:
        text, encoding = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    qos = headers.get(H_QOS, "0")
    properties: dict[str, Any] = {}
    if headers.get(H_PAYLOAD_FORMAT) == "1":
        properties["payload_format_indicator"] = 1
    if H_CONTENT_TYPE in headers:
        properties["content_type"] = decode_text(headers[H_CONTENT_TYPE])
    if H_USER_PROPERTIES in headers:
        with contextlib.suppress(ValueError):
            properties["user_properties"] = [
                list(pair) for pair in decode_user_properties(headers[H_USER_PROPERTIES])]
    return {"offset": offset, "time": _time_of(headers, stored_at), "topic": topic,
            "qos": int(qos) if qos in ("0", "1", "2") else 0,
            "retain": headers.get(H_RETAIN) == "1", "payload": text,
            "payload_encoding": encoding, "properties": properties,
            # JetStream carries the id as Nats-Msg-Id only (older gateways sent both)
            "message_id": headers.get(H_MESSAGE_ID, headers.get(NATS_MSG_ID))}


def rows(bridge: BridgeConfig, position: Position, topic_filter: str | None,
         limit: int | None) -> AsyncIterator[dict[str, Any]]:
    """The bridge's history from `position`, as replay rows (see the module docstring)."""
    if bridge.kind == "jetstream":
        return _jetstream_rows(bridge, position, topic_filter, limit)
    if bridge.kind == "kafka":
        return _kafka_rows(bridge, position, topic_filter, limit)
    raise BridgeError(f'bridge {bridge.name!r} is an "{bridge.kind}" bridge: an MQTT broker '
                      "keeps no history to replay (jetstream and kafka bridges have one)")


# --------------------------------------------------------------------------- JetStream


async def _jetstream_rows(bridge: BridgeConfig, position: Position, topic_filter: str | None,
                          limit: int | None) -> AsyncIterator[dict[str, Any]]:
    import nats.errors
    import nats.js.errors
    from nats.js import api

    from .bridge.jetstream import connect
    from .bridge.topic_map import subject_to_topic

    assert bridge.jetstream is not None
    options = bridge.jetstream
    if position == "latest" or limit == 0:
        return
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, mem_storage=True,
                                inactive_threshold=60.0, headers_only=False)
    if isinstance(position, bool) or position == "earliest":
        config.deliver_policy = api.DeliverPolicy.ALL
    elif isinstance(position, int):
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(position, 1)
    elif isinstance(position, float):
        config.deliver_policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.fromtimestamp(position, UTC)
    else:
        raise ValueError(f"not a replay position: {position!r}")
    nc = await connect(bridge)  # BridgeError naming the server's complaint
    js = nc.jetstream()
    subject = f"{options.subject_prefix}.>"
    sub: Any = None
    try:
        try:
            sub = await js.pull_subscribe(subject, stream=options.stream, config=config)
            pending = (await sub.consumer_info()).num_pending
        except nats.js.errors.NotFoundError:
            raise BridgeError(f"JetStream stream {options.stream!r} does not exist on "
                              f"{list(bridge.servers)}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BridgeError(f"JetStream stream {options.stream!r}: {exc!r}") from exc
        left = limit
        while pending > 0 and (left is None or left > 0):
            try:
                batch = await sub.fetch(min(PAGE, pending), timeout=TIMEOUT_S)
            except nats.errors.TimeoutError:
                raise BridgeError(f"JetStream stream {options.stream!r}: no message within "
                                  f"{TIMEOUT_S} s while {pending} were pending") from None
            for msg in batch:
                pending = msg.metadata.num_pending
                try:
                    topic = subject_to_topic(options.subject_prefix, msg.subject)
                except ValueError:
                    continue  # not a subject the escaping table produces
                if topic_filter is not None and not topic_matches(topic_filter, topic):
                    continue
                yield row(msg.metadata.sequence.stream, topic, msg.data, msg.headers or {},
                          msg.metadata.timestamp.timestamp())
                if left is not None:
                    left -= 1
                    if left == 0:
                        break
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):
                name = (await sub.consumer_info()).name
                await js.delete_consumer(options.stream, name)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


# --------------------------------------------------------------------------- Kafka


async def _kafka_rows(bridge: BridgeConfig, position: Position, topic_filter: str | None,
                      limit: int | None) -> AsyncIterator[dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    from .bridge.kafka import client_options

    assert bridge.kafka is not None
    if position == "latest" or limit == 0:
        return
    topics = sorted({route.topic for route in bridge.kafka.topic_map})
    consumer = AIOKafkaConsumer(**client_options(bridge), enable_auto_commit=False,
                                group_id=None, request_timeout_ms=int(TIMEOUT_S * 1000))
    try:
        await asyncio.wait_for(consumer.start(), TIMEOUT_S)
    except (KafkaError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise BridgeError(f"cannot connect to Kafka {list(bridge.servers)}: {exc!r}") from exc
    try:
        partitions: list[Any] = []
        existing = await consumer.topics()  # fetches the cluster's metadata
        for topic in topics:
            found = consumer.partitions_for_topic(topic) if topic in existing else None
            partitions += [TopicPartition(topic, p) for p in sorted(found or ())]
        if not partitions:
            return
        consumer.assign(partitions)
        ends: dict[Any, int] = await consumer.end_offsets(partitions)
        starts: dict[Any, int] = await consumer.beginning_offsets(partitions)
        not_before = 0.0
        for tp in partitions:
            if isinstance(position, bool) or position == "earliest":
                consumer.seek(tp, starts[tp])
            elif isinstance(position, int):
                consumer.seek(tp, max(position, starts[tp]))
            elif isinstance(position, float):
                # Start at the broker's answer (the start when it has no time index), and
                # skip older records anyway: tansu 0.6 answers ListOffsets by time loosely.
                found_at = await _offset_for_time(consumer, tp, position)
                consumer.seek(tp, starts[tp] if found_at is None else found_at)
                not_before = position
            else:
                raise ValueError(f"not a replay position: {position!r}")
        left = limit
        for tp in partitions:
            async for record in _partition_records(consumer, tp, ends[tp]):
                if record.timestamp is not None and record.timestamp / 1000 < not_before:
                    continue
                headers = {k: v.decode(errors="replace") for k, v in record.headers}
                if H_TOPIC in headers:
                    topic = decode_text(headers[H_TOPIC])
                elif record.key is not None and bridge.kafka.key == "topic":
                    topic = record.key.decode(errors="replace")
                else:
                    topic = record.topic
                if topic_filter is not None and not topic_matches(topic_filter, topic):
                    continue
                out = row(record.offset, topic, record.value or b"", headers,
                          (record.timestamp or 0) / 1000)
                out["kafka_topic"] = record.topic
                out["partition"] = record.partition
                yield out
                if left is not None:
                    left -= 1
                    if left == 0:
                        return
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


async def _offset_for_time(consumer: Any, tp: Any, timestamp: float) -> int | None:
    """The first offset at or after `timestamp` (the end offset when none is); None when the
    broker cannot say."""
    from aiokafka.errors import KafkaError

    try:
        found = await consumer.offsets_for_times({tp: int(timestamp * 1000)})
    except (KafkaError, ValueError, TypeError):
        return None
    hit = found.get(tp)
    if hit is None:
        return int((await consumer.end_offsets([tp]))[tp])
    return int(hit.offset)


async def _partition_records(consumer: Any, tp: Any, end: int) -> AsyncIterator[Any]:
    """The records of one partition from its current position to its end: past the end
    offset seen at the start, one more short fetch, until one comes back empty. (tansu 0.6
    reports a partition's end offset in record batches rather than records, so the end offset
    alone would stop early.)"""
    while True:
        reached = await consumer.position(tp) >= end
        batch = await consumer.getmany(tp, timeout_ms=int((TAIL_S if reached else TIMEOUT_S)
                                                          * 1000), max_records=PAGE)
        records = batch.get(tp, [])
        if not records:
            if reached:
                return
            raise BridgeError(f"Kafka {tp.topic}:{tp.partition}: no record within {TIMEOUT_S} "
                              f"s before offset {end}")
        for record in records:
            yield record
