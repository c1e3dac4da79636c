"""CPU time per message of the broker's live path, in-process, without sockets.

    python -m benchmarks.hotpath                      # S1-, S2- and S3-like, 5 runs each
    python -m benchmarks.hotpath --cases s1 --messages 200000 --repeat 9

A publisher's bytes (pre-encoded PUBLISH packets, fed in 64 KiB reads as a socket would
deliver them) go to a real `ClientHandler` through `data_received`; the subscribers'
transports count what is written to them and (QoS 1) answer each PUBLISH with a PUBACK.
What is measured is the process CPU time (`time.process_time`) from the first read to the
last delivery, divided by the messages published: the broker's own cost per message, from
framing to the write, without the kernel's socket work and without the other processes on
the machine (which make the socket-level benchmark's figures vary 3x on a shared machine).
The store is the in-memory one. Use it to compare two versions of the code (interleave
them: `PYTHONPATH=<other checkout> python -m benchmarks.hotpath`); the socket-level
`python -m benchmarks` stays the measure against mosquitto.

cases: s1 QoS 0 1->1, s2 QoS 0 1->50, s3 QoS 1 1->1 (window: the publisher's reads are
fed as the subscriber acknowledges, at most 100 unacknowledged).

Instructions per message, independent of the machine's load: the measured phase begins and
ends with a call of `time.process_time`, so callgrind can count that phase alone (the second
of the dumps it writes before each such call):

    PYTHONHASHSEED=0 valgrind --tool=callgrind --dump-before=time_process_time \
        --callgrind-out-file=/tmp/cg/o python -B -m benchmarks.hotpath --cases s3 \
        --repeat 1 --messages 2000 --loop asyncio && grep '^totals:' /tmp/cg/o.2

(divide by the messages; repeated runs agree within 0.2 %, where differences of whole runs
varied by 10 %: start-up, and the .pyc files compiled by the first run only.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_broker.config import Config, ListenerConfig
from edge_broker.mqtt.codec import encode, split_frame
from edge_broker.mqtt.packets import Connect, PubAck, Publish, Subscribe, Subscription
from edge_broker.server.app import BrokerApp
from edge_broker.server.client import ClientHandler

READ = 65536


class FakeTransport:
    """Enough of asyncio.Transport for a ClientHandler; counts PUBLISHes written."""

    def __init__(self, on_data: Any = None) -> None:
        self.closing = False
        self.publishes = 0
        self.buf = bytearray()
        self.on_data = on_data
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while True:
            frame = split_frame(buf, pos, 1 << 30)
            if frame is None:
                break
            if frame[0] >> 4 == 3:
                self.publishes += 1
                if self.on_data is not None:
                    self.on_data(buf, frame)
            pos = frame[2]
        del buf[:pos]

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        return None

    def abort(self) -> None:
        self.closing = True


def _config(data_dir: Path) -> Config:
    base = Config()
    return dataclasses.replace(
        base, listeners=(ListenerConfig(host="127.0.0.1", port=0),),
        broker=dataclasses.replace(base.broker, data_dir=data_dir, sys_interval_s=0),
        storage=dataclasses.replace(base.storage, persistence="memory"))


async def _settle(loop: asyncio.AbstractEventLoop, done: Any, timeout: float = 60.0) -> None:
    deadline = loop.time() + timeout
    while not done():
        if loop.time() > deadline:
            raise TimeoutError("the broker did not finish")
        await asyncio.sleep(0)


async def _case(name: str, messages: int) -> float:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        app = BrokerApp(_config(Path(tmp)))
        await app.start()
        try:
            return await _run(app, loop, name, messages)
        finally:
            await app.stop()


async def _run(app: BrokerApp, loop: asyncio.AbstractEventLoop, name: str,
               messages: int) -> float:
    qos = 1 if name == "s3" else 0
    n_subs = 50 if name == "s2" else 1
    level = 4
    subs: list[tuple[ClientHandler, FakeTransport]] = []
    for k in range(n_subs):
        handler = ClientHandler(app)
        acks: list[bytes] = []

        def ack(buf: bytearray, frame: tuple[int, int, int], acks: list[bytes] = acks) -> None:
            if (buf[frame[0]] >> 1) & 3:
                start = frame[1] + 2 + ((buf[frame[1]] << 8) | buf[frame[1] + 1])
                acks.append(encode(PubAck((buf[start] << 8) | buf[start + 1]), level))

        transport = FakeTransport(ack if qos else None)
        handler.connection_made(transport)  # type: ignore[arg-type]
        handler.data_received(encode(Connect(f"sub{k}", level, True, 0), level)
                              + encode(Subscribe(1, (Subscription("bench/t", qos),)), level))
        subs.append((handler, transport))
        setattr(transport, "acks", acks)  # noqa: B010
    publisher = ClientHandler(app)
    pub_transport = FakeTransport()
    publisher.connection_made(pub_transport)  # type: ignore[arg-type]
    publisher.data_received(encode(Connect("pub", level, True, 0), level))
    await _settle(loop, lambda: all(h.client_id is not None for h, _ in subs)
                  and publisher.client_id is not None)
    await asyncio.sleep(0.01)
    payload = b"x" * 32
    if qos:
        packets = [encode(Publish("bench/t", payload, 1, False, False, (i % 65535) + 1), level)
                   for i in range(messages)]
    else:
        one = encode(Publish("bench/t", payload), level)
        packets = [one] * messages
    data = b"".join(packets)
    per = len(packets[0])
    expected = messages * n_subs
    sub_transports = [t for _, t in subs]
    sub_handlers = [h for h, _ in subs]

    def delivered() -> int:
        return sum(t.publishes for t in sub_transports)

    start_cpu = time.process_time()
    start_wall = time.perf_counter()
    if not qos:
        pos = 0
        while pos < len(data):
            while pub_transport.paused:  # reading paused: the broker takes its turns
                await asyncio.sleep(0)
            publisher.data_received(data[pos:pos + READ])
            pos += READ
            await asyncio.sleep(0)
        await _settle(loop, lambda: delivered() >= expected)
    else:
        window = 100
        sent = 0
        transport = sub_transports[0]
        acks: list[bytes] = transport.acks  # type: ignore[attr-defined]
        while delivered() < expected:
            room = window - (sent - delivered())
            if room > 0 and sent < messages and not pub_transport.paused:
                n = min(room, messages - sent)
                publisher.data_received(data[sent * per:(sent + n) * per])
                sent += n
            if acks:
                chunk = b"".join(acks)
                acks.clear()
                sub_handlers[0].data_received(chunk)
            await asyncio.sleep(0)
    cpu = time.process_time() - start_cpu
    wall = time.perf_counter() - start_wall
    assert delivered() == expected, (delivered(), expected)
    for handler in [publisher, *sub_handlers]:
        handler.connection_lost(None)
    return cpu / messages * 1e6 if wall else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="s1,s2,s3")
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        run = uvloop.run
    else:
        run = asyncio.run
    for name in args.cases.split(","):
        n = args.messages // 10 if name == "s2" else args.messages
        figures = [run(_case(name, n)) for _ in range(args.repeat)]
        # The minimum is the figure least disturbed by other processes (as timeit's).
        print(f"{name}: min {min(figures):.2f} median {statistics.median(figures):.2f} us CPU "
              f"per message published ({args.repeat} runs: "
              f"{', '.join(f'{f:.2f}' for f in figures)})")


if __name__ == "__main__":
    main()
