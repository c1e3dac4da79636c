"""The Kafka sink's per-record work (compiled in the compiled build; bridge/kafka.py, which
imports aiokafka, is not): the partition lanes, the record batches the sink encodes itself,
and the loop that appends a window's records to them.

`RecordBatch` is a Kafka record batch (format v2, magic 2, uncompressed), encoded here and
handed to aiokafka's `send_batch` in place of its `BatchBuilder` (it has the methods
aiokafka's producer calls on a handed-over batch: `close`, `closed`, `record_count`, `size`,
`_set_producer_state`, `_build`, and an `append` that refuses, as a closed `BatchBuilder`'s
does). The bytes are those aiokafka's own builder makes for the same records (a test
compares them), but the headers that depend only on a message's topic and publisher (its
route: `mqtt-topic`, `mqtt-qos`, `mqtt-retain`, `mqtt-client-id`, and the record key) are
encoded once per route and copied, the publish time's once per distinct time, and per
record only the message id is encoded: aiokafka's builder encodes every header's name twice
and each value once per record. Used when the sink has no compression and aiokafka has its
compiled CRC-32C; otherwise the lane fills aiokafka's own batches as before.

`fill` is the loop over a window (`KafkaSink.submit`): per message one look-up of its route
and an append to its lane's open batch; it stops at a message it cannot take (no route yet,
a large payload, MQTT 5 properties, no open batch of ours or a full one), which the sink
takes through `PartitionLane.append`, then calls it again after that message.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..errors import BridgeError
from .message import H_MESSAGE_ID, H_PUBLISH_TIME, BridgeMessage, format_time

# Batches of one partition with aiokafka at once: the one in its produce request and the
# next, queued (what comes meanwhile gathers in the partition's open batch).
LANE_OUTSTANDING: Final = 2

# The v2 record batch header: base offset, length, partition leader epoch, magic, CRC,
# attributes, last offset delta, first and max timestamp, producer id and epoch, base
# sequence, record count. The CRC-32C covers the attributes to the end of the batch.
_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE: Final = 61
_LENGTH_FROM: Final = 12  # the length counts from the partition leader epoch on
_CRC_AT: Final = 17
_ATTRIBUTES_AT: Final = 21
_NO_LEADER_EPOCH: Final = -1
_ZERO: Final = b"\x00"


def _unsigned(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL: Final = [_unsigned(value * 2) for value in range(8192)]


def varint(value: int) -> bytes:
    """Kafka's varint of a signed value (zigzag, then base-128, low group first)."""
    if 0 <= value < 8192:
        return _SMALL[value]
    return _unsigned(value * 2 if value >= 0 else -value * 2 - 1)


def header_bytes(name: str, value: bytes) -> bytes:
    """One record header as the record holds it."""
    key = name.encode()
    return varint(len(key)) + key + varint(len(value)) + value


def headers_bytes(headers: Sequence[tuple[str, bytes]]) -> bytes:
    return b"".join([header_bytes(name, value) for name, value in headers])


_MID_NAME: Final = varint(len(H_MESSAGE_ID.encode())) + H_MESSAGE_ID.encode()


class RecordBatch:
    """A record batch encoded here (see the module docstring)."""

    def __init__(self, limit: int, crc: Callable[[memoryview], int]) -> None:
        # The records' pieces, joined once at `_build` (one list append per piece instead
        # of a bytearray's resize and copy), and the batch's size with its header.
        self._parts: list[bytes] = []
        self._size = HEADER_SIZE
        self._limit = limit
        self._crc = crc
        self._count = 0
        self._first_ts = -1
        self._max_ts = -1
        self._closed = False
        self._built: bytearray | None = None
        self._producer_id = -1
        self._producer_epoch = -1
        self._base_sequence = 0

    def add(self, timestamp: int, key: bytes, value: bytes, head: bytes, mid: bytes | None,
            fixed: bytes, tail: bytes) -> bool:
        """Append a record: `key` with its length before it, the value, then `head`, the
        length of `mid` and `mid` (when not None), `fixed` and `tail` (the header count and
        the headers, encoded). False, and nothing appended, when it would make the batch
        larger than its limit (a batch takes its first record whatever its size)."""
        if self._closed:
            return False
        count = self._count
        first = self._first_ts
        if first < 0:
            first = timestamp
        delta = varint(timestamp - first)
        number = varint(count)
        length = varint(len(value))
        body = (1 + len(delta) + len(number) + len(key) + len(length) + len(value)
                + len(head) + len(fixed) + len(tail))
        mid_length = b""
        if mid is not None:
            mid_length = varint(len(mid))
            body += len(mid_length) + len(mid)
        prefix = varint(body)
        size = self._size + len(prefix) + body
        if count and size >= self._limit:
            return False
        self._size = size
        parts = self._parts
        parts.append(prefix)
        parts.append(_ZERO)  # attributes
        parts.append(delta)
        parts.append(number)
        parts.append(key)
        parts.append(length)
        parts.append(value)
        parts.append(head)
        if mid is not None:
            parts.append(mid_length)
            parts.append(mid)
        parts.append(fixed)
        parts.append(tail)
        if count == 0:
            self._first_ts = self._max_ts = timestamp
        elif timestamp > self._max_ts:
            self._max_ts = timestamp
        self._count = count + 1
        return True

    def add_headers(self, timestamp: int, key: bytes, value: bytes,
                    headers: Sequence[tuple[str, bytes]]) -> bool:
        """`add` of a record given as aiokafka's `append` takes it."""
        return self.add(timestamp, varint(len(key)) + key, value,
                        varint(len(headers)) + headers_bytes(headers), None, b"", b"")

    # -- what aiokafka's producer calls on a handed-over batch (its BatchBuilder's) -------

    def append(self, *, timestamp: Any, key: Any, value: Any, headers: Any = None) -> None:
        """aiokafka's `BatchBuilder.append` on a closed batch: refused (None)."""
        return None

    def close(self) -> None:
        self._closed = True

    def closed(self) -> bool:
        return self._closed

    def record_count(self) -> int:
        return self._count

    def size(self) -> int:
        return self._size

    def _set_producer_state(self, producer_id: int, producer_epoch: int,
                            base_sequence: int) -> None:
        self._producer_id = producer_id
        self._producer_epoch = producer_epoch
        self._base_sequence = base_sequence

    def _build(self) -> bytearray:
        self._closed = True
        built = self._built
        if built is None:
            built = bytearray(HEADER_SIZE)
            built += b"".join(self._parts)
            self._parts = []
            _HEADER.pack_into(built, 0, 0, len(built) - _LENGTH_FROM, _NO_LEADER_EPOCH, 2, 0,
                              0, max(self._count - 1, 0), self._first_ts, self._max_ts,
                              self._producer_id, self._producer_epoch, self._base_sequence,
                              self._count)
            crc = self._crc(memoryview(built)[_ATTRIBUTES_AT:])
            struct.pack_into(">I", built, _CRC_AT, crc)
            self._built = built
        return built


class PartitionLane:
    """The records of one (Kafka topic, partition) not handed to aiokafka yet, and the task
    that hands them over in order, keeping at most LANE_OUTSTANDING of its batches with
    aiokafka at once (see bridge/kafka.py `KafkaSink.submit`). Each batch's outcome is a
    future of ours, made when the batch opens and settled from aiokafka's when the broker
    answers. With `crc` (aiokafka's CRC-32C) its batches are `RecordBatch`es of at most
    `limit` bytes; without, the producer's own (`create_batch`)."""

    def __init__(self, producer: Any, topic: str, partition: int,
                 crc: Callable[[memoryview], int] | None = None, limit: int = 0) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self._crc = crc
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._open: tuple[Any, asyncio.Future[Any]] | None = None  # (builder, outcome)
        # The open batch when it is a RecordBatch (else None), and its outcome: what `fill`
        # appends to.
        self.own: RecordBatch | None = None
        self.outcome: asyncio.Future[Any] | None = None
        # The open batch's record builder's own `append` (`record_adder`) and the records
        # in it: None when there is no open batch or it has no such builder.
        self._add: Any = None
        self._count = 0
        self._ready: deque[tuple[Any, asyncio.Future[Any]]] = deque()  # full, in order
        self._outstanding = 0  # batches handed over and not answered yet
        self._lock = asyncio.Lock()  # one hand-over at a time: they keep the log's order
        self._wake = asyncio.Event()
        self.woken = False  # `_wake` set and the pump not run since
        # The failed outcome of a batch aiokafka refused: nothing more is sent (see
        # `_hand_over_next`), and what is appended after it fails with it.
        self.broken: asyncio.Future[Any] | None = None
        self._task = asyncio.ensure_future(self._pump())

    def wake(self) -> None:
        """The pump runs on the next loop turn (once per turn, not per record)."""
        if not self.woken:
            self.woken = True
            self._wake.set()

    def append(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
               ) -> asyncio.Future[Any]:
        """Add a record to the open batch; the future of that batch's outcome (failed at
        once after a hand-over failed: see `_hand_over_next`)."""
        add = self._add
        if add is not None and add(self._count, None, key, value, headers) is not None:
            self._count += 1
            self.wake()
            return self._open[1]  # type: ignore[index]
        return self._append_slow(key, value, headers)

    def _append_slow(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
                     ) -> asyncio.Future[Any]:
        """`append` when there is no open batch, it is full, its builder has no
        `record_adder`, it is a RecordBatch (or the lane is broken)."""
        if self.broken is not None:
            return self.broken
        entry = self._open
        if entry is None:
            entry = self._start()
        elif self.own is not None:
            if self.own.add_headers(_now_ms(), key, value, headers):
                self.wake()
                return entry[1]
            self._seal()  # full: it goes as it is
            self._ready.append(entry)
            entry = self._start()
        elif self._add is not None:  # it was full: it goes as it is
            self._seal()
            self._ready.append(entry)
            entry = self._start()
        own = self.own
        if own is not None:
            if not own.add_headers(_now_ms(), key, value, headers):
                raise BridgeError(f"a record of {len(value)} bytes does not fit a batch")
        elif self._add is not None:
            if self._add(self._count, None, key, value, headers) is None:
                raise BridgeError(f"a record of {len(value)} bytes does not fit a batch")
            self._count += 1
        elif entry[0].append(key=key, value=value, timestamp=None, headers=headers) is None:
            self._ready.append(entry)  # full: it goes as it is
            entry = self._start()
            entry[0].append(key=key, value=value, timestamp=None, headers=headers)
        self.wake()
        return entry[1]

    def start_next(self) -> None:
        """The open RecordBatch is full: it goes as it is, and a new one opens (`fill`)."""
        entry = self._open
        if entry is not None:
            self._seal()
            self._ready.append(entry)
        self._start()

    def _start(self) -> tuple[Any, asyncio.Future[Any]]:
        outcome: asyncio.Future[Any] = self._loop.create_future()
        if self._crc is not None:
            own = RecordBatch(self._limit, self._crc)
            self._open = entry = (own, outcome)
            self.own = own
            self._add = None
        else:
            builder = self.producer.create_batch()
            self._open = entry = (builder, outcome)
            self._add = record_adder(builder)
        self.outcome = outcome
        self._count = 0
        return entry

    def _seal(self) -> None:
        """The open batch takes no more records: its builder's record count is set (what
        aiokafka's own `append` keeps up to date per record)."""
        if self._add is not None and self._open is not None:
            self._open[0]._relative_offset = self._count
        self._add = None
        self.own = None
        self.outcome = None

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.woken = False
            async with self._lock:
                while self._outstanding < LANE_OUTSTANDING and (
                        self._ready or self._open is not None):
                    await self._hand_over_next()

    async def hand_over_all(self) -> None:
        """Hand every record appended so far to aiokafka (before a record that goes
        through `producer.send`, so that it comes after them)."""
        async with self._lock:
            while self._ready or self._open is not None:
                await self._hand_over_next()

    async def _hand_over_next(self) -> None:
        if self._ready:
            builder, outcome = self._ready.popleft()
        else:
            assert self._open is not None
            self._seal()
            (builder, outcome), self._open = self._open, None
        builder.close()
        try:
            acked = await self.producer.send_batch(builder, self.topic,
                                                   partition=self.partition)
        except asyncio.CancelledError:
            _fail(outcome, BridgeError("the Kafka sink was closed"))
            raise
        except Exception as exc:  # the producer refused it: the windows waiting see why
            _fail(outcome, exc)
            # Nothing after it goes out on this connection (the forwarder sends again
            # from its cursor on a new one): no later record of the partition is stored
            # before this batch's.
            self.broken = outcome
            self._fail_pending(exc)
            return
        self._outstanding += 1
        acked.add_done_callback(functools.partial(self._answered, outcome))

    def _answered(self, outcome: asyncio.Future[Any], acked: asyncio.Future[Any]) -> None:
        self._outstanding -= 1
        self._wake.set()
        if acked.cancelled():
            _fail(outcome, BridgeError("the batch was cancelled"))
        elif (error := acked.exception()) is not None:
            _fail(outcome, error)
        elif not outcome.done():
            outcome.set_result(acked.result())

    def close(self) -> None:
        """Stop handing over; the batches not handed over fail (the sink is closed)."""
        self._task.cancel()
        self._fail_pending(BridgeError("the Kafka sink was closed"))

    def _fail_pending(self, error: BaseException) -> None:
        for _, outcome in self._ready:
            _fail(outcome, error)
        if self._open is not None:
            _fail(self._open[1], error)
        self._ready.clear()
        self._open = None
        self._add = None
        self.own = None
        self.outcome = None


def record_adder(builder: Any) -> Any:
    """The `append(offset delta, timestamp, key, value, headers)` of the record builder
    inside aiokafka's `BatchBuilder`, or None when `builder` is not one as aiokafka 0.10 to
    0.14 make it (then its public `append` is used). `BatchBuilder.append` only checks that
    the batch is open, passes key and value through the (unset) serializers, calls it with
    its count of records and counts one more: per record two Python calls with keyword
    arguments. `PartitionLane` keeps the count itself and sets it on the batch when the
    batch is sealed (`_seal`)."""
    try:
        from aiokafka.producer.message_accumulator import BatchBuilder
    except ImportError:  # pragma: no cover - another aiokafka layout: the public append
        return None
    if (type(builder) is not BatchBuilder
            or builder._key_serializer is not None or builder._value_serializer is not None
            or builder._closed or builder._relative_offset != 0):
        return None
    inner = getattr(builder, "_builder", None)
    return getattr(inner, "append", None)


def _fail(outcome: asyncio.Future[Any], error: BaseException) -> None:
    if not outcome.done():
        outcome.set_exception(error)
        outcome.exception()  # retrieved: a dropped window's outcome is not logged


def _now_ms() -> int:
    return int(time.time() * 1000)


class Route:
    """What the records of one (MQTT topic, QoS, retain, client id) share: their partition's
    lane, the record key (raw, and with its length for a RecordBatch), and the headers that
    depend only on these (the list for aiokafka's batches; encoded, with the header count
    and the message id header's name before them, for a RecordBatch)."""

    __slots__ = ("fixed", "fixed_bytes", "head", "key", "key_bytes", "lane")

    def __init__(self, lane: PartitionLane, key: bytes,
                 fixed: tuple[tuple[str, bytes], ...]) -> None:
        self.lane = lane
        self.key = key
        self.fixed = fixed
        self.key_bytes = varint(len(key)) + key
        # message id, the fixed headers, publish time
        self.head = varint(len(fixed) + 2) + _MID_NAME
        self.fixed_bytes = headers_bytes(fixed)


class Clock:
    """The publish time last formatted (`mqtt-publish-time`): a window's messages often
    share it. `value` is the header value, `encoded` the header as a record holds it."""

    __slots__ = ("at", "encoded", "value")

    def __init__(self) -> None:
        self.at = -1.0
        self.value = b""
        self.encoded = b""

    def update(self, at: float) -> None:
        self.at = at
        self.value = format_time(at).encode()
        self.encoded = header_bytes(H_PUBLISH_TIME, self.value)


def fill(window: Sequence[BridgeMessage], start: int, routes: dict[tuple[str, int, bool, str],
                                                                  Route],
         prefix: bytes, now_ms: int, clock: Clock, large: int,
         owners: list[asyncio.Future[Any] | None]) -> int:
    """Append window[start:] to the open RecordBatches of their routes' lanes, each
    record's batch outcome to `owners`, up to the first message it cannot take (see the
    module docstring); its index (len(window) when it took them all). The publish time
    header comes from `clock`, formatted again when a message's time is not the last's."""
    end = len(window)
    at = start
    while at < end:
        message = window[at]
        route = routes.get((message.topic, message.qos, message.retain, message.client_id))
        if route is None:
            return at
        lane = route.lane
        batch = lane.own
        payload = message.payload
        if (batch is None or len(payload) > large or message.content_type is not None
                or message.payload_utf8 or message.user_properties):
            return at
        if message.publish_time != clock.at:
            clock.update(message.publish_time)
        if not batch.add(now_ms, route.key_bytes, payload, route.head,
                         prefix + str(message.offset).encode(), route.fixed_bytes,
                         clock.encoded):
            lane.start_next()
            continue  # the same message, into the new batch
        owners.append(lane.outcome)
        if not lane.woken:
            lane.wake()
        at += 1
    return end
