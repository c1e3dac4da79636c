"""Black-box scale: 2,000 concurrent connections, every message to exactly the right subscribers.

2,000 raw-socket clients (half MQTT 5, half 3.1.1; half subscribed at QoS 1, half at QoS 0)
each subscribe to their own topic `scale/<i>`; one more (MQTT 5, QoS 1) subscribes to `#`.
A publisher sends one QoS 1 message to every `scale/<i>`, plus a few to topics only `#`
matches and a few to `$`-topics that nothing matches ([MQTT-4.7.2-1] (5.0): `#` does not match
a topic starting with `$`). Subscriber i must get exactly its one message, at the QoS it asked
for, and nothing else; the `#` subscriber every non-`$` message exactly once.

The clients are asyncio Protocols in the test's event loop (the broker runs in its own thread
and loop), connected in waves of 200 so the listen backlog never overflows. The test holds
both ends of every connection in one process (about 4,100 descriptors), so it raises
RLIMIT_NOFILE and skips when the hard limit does not allow it. It is bounded to 60 s and
prints how long each phase took.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.conftest import BrokerThread
from tests.integration.wirebytes import (
    CONNACK,
    PUBACK,
    PUBLISH,
    SUBACK,
    Frame,
    connect,
    frame,
    publish,
    publish_fields,
    reason,
    split_frames,
    subscribe,
)

CLIENTS = 2000
WAVE = 200
PUBLISH_WAVE = 250
TIME_LIMIT_S = 60.0
NEEDED_FDS = 4200
ONLY_HASH_TOPICS = [f"scale/{CLIENTS + k}" for k in range(5)] + ["scale/7/below", "scale"]
NOBODY_TOPICS = ["$nobody/1", "$nobody/2", "$scale/3"]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED_FDS:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {NEEDED_FDS}: 2,000 connections need "
                    "both ends in this process")
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class ScaleClient(asyncio.Protocol):
    """A raw MQTT client: records PUBLISHes (acknowledging QoS 1), queues other packets."""

    def __init__(self, version: int, on_publish: Callable[[], None]) -> None:
        self.version = version
        self.on_publish = on_publish
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.received: list[tuple[str, bytes, int]] = []  # (topic, payload, qos)
        self.replies: asyncio.Queue[Frame] = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        acks = []
        for frame_ in split_frames(self.buf):
            if frame_.type == PUBLISH:
                topic, payload, qos, packet_id = publish_fields(frame_, self.version)
                self.received.append((topic, payload, qos))
                if qos:
                    assert packet_id is not None
                    acks.append(frame(0x40, packet_id.to_bytes(2, "big")))
                self.on_publish()
            else:
                self.replies.put_nowait(frame_)
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def reply(self, timeout: float = 20.0) -> Frame:
        return await asyncio.wait_for(self.replies.get(), timeout)


async def open_client(port: int, version: int, client_id: str, topic_filter: str | None,
                      qos: int, on_publish: Callable[[], None]) -> ScaleClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: ScaleClient(version, on_publish), "127.0.0.1", port)
    data = connect(version, client_id)
    if topic_filter is not None:
        data += subscribe(version, 1, topic_filter, qos)
    client.send(data)  # CONNECT and SUBSCRIBE in one write (3.1.4 (5.0) allows it)
    connack = await client.reply()
    assert connack.type == CONNACK and reason(connack, version) == 0, connack
    if topic_filter is not None:
        suback = await client.reply()
        assert suback.type == SUBACK and reason(suback, version) == (qos,), suback
    return client


class Progress:
    """Counts deliveries; `wait(n)` returns once n arrived in total."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    async def wait(self, target: int, timeout: float) -> None:
        self.target = target
        if self.count < target:
            self.reached.clear()
            await asyncio.wait_for(self.reached.wait(), timeout)


def sub_version(i: int) -> int:
    return 5 if i % 2 == 0 else 4


def sub_qos(i: int) -> int:
    return (i // 2) % 2  # both versions get both QoS levels


async def test_2000_connections_each_message_to_exactly_its_subscribers(
        make_broker: Callable[..., BrokerThread]) -> None:
    raise_fd_limit()
    broker = make_broker()
    port = broker.port
    started = time.monotonic()
    timings: dict[str, float] = {}
    progress = Progress()
    clients: list[ScaleClient] = []
    try:
        async with asyncio.timeout(TIME_LIMIT_S):
            # -- connect and subscribe, in waves
            for start in range(0, CLIENTS, WAVE):
                clients += await asyncio.gather(*(
                    open_client(port, sub_version(i), f"scale-{i}", f"scale/{i}", sub_qos(i),
                                progress)
                    for i in range(start, min(start + WAVE, CLIENTS))))
            everything = await open_client(port, 5, "scale-hash", "#", 1, progress)
            publisher = await open_client(port, 5, "scale-pub", None, 0, progress)
            timings["connect+subscribe"] = time.monotonic() - started
            app = broker.app
            assert app is not None
            assert broker.call(lambda: len(app.clients)) == CLIENTS + 2

            # -- publish: one QoS 1 message per subscriber topic, paced in waves so no
            # session queue nears its bound (the `#` subscriber gets everything)
            phase = time.monotonic()
            topics = [f"scale/{i}" for i in range(CLIENTS)] + ONLY_HASH_TOPICS + NOBODY_TOPICS
            expected_deliveries = 0
            packet_id = 0
            for start in range(0, len(topics), PUBLISH_WAVE):
                wave = topics[start:start + PUBLISH_WAVE]
                chunks = []
                for topic in wave:
                    packet_id += 1
                    chunks.append(publish(5, topic, f"m:{topic}".encode(), qos=1,
                                          packet_id=packet_id))
                publisher.send(b"".join(chunks))
                for _ in wave:
                    puback = await publisher.reply()
                    assert puback.type == PUBACK, puback
                for topic in wave:
                    if topic.startswith("$"):
                        continue
                    expected_deliveries += 1  # the `#` subscriber
                    if topic.startswith("scale/") and topic[6:].isdigit() and (
                            int(topic[6:]) < CLIENTS):
                        expected_deliveries += 1  # its own subscriber
                await progress.wait(expected_deliveries, timeout=TIME_LIMIT_S)
            timings["publish+deliver"] = time.monotonic() - phase
            await asyncio.sleep(0.5)  # anything extra or duplicated would arrive now

            # -- exactly the right messages
            assert progress.count == expected_deliveries == 2 * CLIENTS + len(ONLY_HASH_TOPICS)
            wrong = {}
            for i, client in enumerate(clients):
                want = [(f"scale/{i}", f"m:scale/{i}".encode(), sub_qos(i))]
                if client.received != want:
                    wrong[i] = client.received
            assert not wrong, f"{len(wrong)} subscribers got the wrong messages, e.g. " \
                              f"{list(wrong.items())[:5]}"
            got = Counter((topic, payload) for topic, payload, _ in everything.received)
            want_all = Counter((topic, f"m:{topic}".encode()) for topic in topics
                               if not topic.startswith("$"))
            assert got == want_all, (f"`#` subscriber: missing {want_all - got}, "
                                     f"extra {got - want_all}")
            assert all(qos == 1 for _, _, qos in everything.received)
            assert publisher.received == []

            # -- a clean goodbye from everyone; the broker ends with no connection
            phase = time.monotonic()
            for client in [*clients, everything, publisher]:
                client.send(b"\xe0\x00")
            await asyncio.gather(*(client.lost for client in [*clients, everything, publisher]))
            deadline = time.monotonic() + 10
            while broker.call(lambda: (len(app.connections), len(app.core.sessions))) != (0, 0):
                assert time.monotonic() < deadline, "connections or sessions left over"
                await asyncio.sleep(0.05)
            timings["disconnect"] = time.monotonic() - phase
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.abort()
    total = time.monotonic() - started
    timings["total"] = total
    print("\n2,000 connections: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    assert total < TIME_LIMIT_S

