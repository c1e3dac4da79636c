"""CPU per message of the S4 ingest path, in-process: QoS 1 into offline persistent sessions.

    python -m benchmarks.ingest_hotpath                         # fsync, 20,000 messages, 5 runs
    python -m benchmarks.ingest_hotpath --durability os --messages 50000 --repeat 3
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.ingest_hotpath --messages 2000 --repeat 1 --loop asyncio

A real `BrokerApp` with its SQLite store (in a temporary directory, `durability` as given),
`--sessions` persistent sessions (clean session 0, one QoS 1 subscription each) that
disconnect before the clock starts, and one publisher whose pre-encoded QoS 1 PUBLISHes
(100-byte payloads, as the runner's S4) are fed to its `ClientHandler` through
`data_received` with at most 100 unacknowledged, as each PUBACK comes back from the broker
after its commit. No sockets: what is measured is the broker's own CPU per message from the
first read to the last PUBACK, in the event loop's thread and in the store's writer thread,
without the kernel's socket work and the other processes on the machine. Under valgrind
(callgrind) the instruction count is the figure: (I(3n) - I(n)) / 2n removes start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_broker.config import Config, ListenerConfig
from edge_broker.mqtt.codec import encode, split_frame
from edge_broker.mqtt.packets import Connect, Disconnect, Publish, Subscribe, Subscription
from edge_broker.server.app import BrokerApp
from edge_broker.server.client import ClientHandler

from .hotpath import FakeTransport

TOPIC = "bench/s4"
LEVEL = 4  # MQTT 3.1.1, as the runner's load generator


class PubAckCounter(FakeTransport):
    """The publisher's transport: counts the PUBACKs the broker writes."""

    def __init__(self) -> None:
        super().__init__()
        self.acks = 0
        self.wake = asyncio.Event()  # set on a PUBACK or when reading resumes

    def resume_reading(self) -> None:
        super().resume_reading()
        self.wake.set()

    def write(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while True:
            frame = split_frame(buf, pos, 1 << 30)
            if frame is None:
                break
            if frame[0] >> 4 == 4:
                self.acks += 1
                self.wake.set()
            pos = frame[2]
        del buf[:pos]


def _config(data_dir: Path, durability: str) -> Config:
    base = Config()
    return dataclasses.replace(
        base, listeners=(ListenerConfig(host="127.0.0.1", port=0),),
        broker=dataclasses.replace(base.broker, data_dir=data_dir, sys_interval_s=0),
        storage=dataclasses.replace(base.storage, persistence="sqlite", durability=durability))


async def _settle(loop: asyncio.AbstractEventLoop, done: object, timeout: float = 120.0) -> None:
    deadline = loop.time() + timeout
    while not done():  # type: ignore[operator]
        if loop.time() > deadline:
            raise TimeoutError("the broker did not finish")
        await asyncio.sleep(0.0005)


def _thread_cpu() -> dict[int, float]:
    """CPU seconds per native thread id of this process (from /proc)."""
    import os
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def _case(messages: int, sessions: int, durability: str) -> tuple[float, float, float, float]:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        app = BrokerApp(_config(Path(tmp), durability))
        await app.start()
        try:
            return await _run(app, loop, messages, sessions)
        finally:
            await app.stop()


async def _run(app: BrokerApp, loop: asyncio.AbstractEventLoop, messages: int,
               sessions: int) -> tuple[float, float, float, float]:
    for k in range(sessions):
        handler = ClientHandler(app)
        transport = FakeTransport()
        handler.connection_made(transport)  # type: ignore[arg-type]
        handler.data_received(encode(Connect(f"bench-s4-sub{k}", LEVEL, False, 0), LEVEL)
                              + encode(Subscribe(1, (Subscription(TOPIC, 1),)), LEVEL)
                              + encode(Disconnect(), LEVEL))
        await _settle(loop, lambda h=handler: h.closed or h.transport is None
                      or h.transport.is_closing())
        handler.connection_lost(None)
    publisher = ClientHandler(app)
    pub = PubAckCounter()
    publisher.connection_made(pub)  # type: ignore[arg-type]
    publisher.data_received(encode(Connect("bench-pub", LEVEL, True, 0), LEVEL))
    await _settle(loop, lambda: publisher.client_id is not None)
    await asyncio.sleep(0.05)
    payload = b"x" * 100
    packets = [encode(Publish(TOPIC, payload, 1, False, False, (i % 65535) + 1), LEVEL)
               for i in range(messages)]
    per = len(packets[0])
    data = b"".join(packets)
    main = threading.get_native_id()
    cpu0 = _thread_cpu()
    start = time.process_time()
    start_wall = time.perf_counter()
    window = 100
    sent = 0
    while pub.acks < messages:
        # Waits without spinning: the loop thread's CPU is the broker's, not this loop's.
        pub.wake.clear()
        room = window - (sent - pub.acks)
        if room > 0 and sent < messages and not pub.paused:
            n = min(room, messages - sent)
            publisher.data_received(data[sent * per:(sent + n) * per])
            sent += n
            await asyncio.sleep(0)
            continue
        await pub.wake.wait()
    total = time.process_time() - start
    wall = time.perf_counter() - start_wall
    cpu1 = _thread_cpu()
    loop_s = cpu1.get(main, 0.0) - cpu0.get(main, 0.0)
    others = sum(v - cpu0.get(t, 0.0) for t, v in cpu1.items() if t != main)
    publisher.connection_lost(None)
    queued = sum(s.backlog_count + len(s.queue) for s in app.core.sessions.values())
    assert queued == messages * sessions, (queued, messages * sessions)
    return (total / messages * 1e6, loop_s / messages * 1e6, others / messages * 1e6,
            messages / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--durability", default="fsync", choices=("fsync", "os", "none"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for the run (seconds; an experiment)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.loop == "uvloop":
        import uvloop
        run = uvloop.run
    else:
        run = asyncio.run
    figures = [run(_case(args.messages, args.sessions, args.durability))
               for _ in range(args.repeat)]
    totals = [f[0] for f in figures]
    best = min(figures)
    print(f"S4 ingest {args.durability}, {args.sessions} sessions: min {best[0]:.2f} "
          f"(loop thread {best[1]:.1f}, other threads {best[2]:.1f}) median "
          f"{statistics.median(totals):.2f} us CPU per message ({args.repeat} runs: "
          f"{', '.join(f'{t:.2f}' for t in totals)}); wall rate median "
          f"{statistics.median(f[3] for f in figures):,.0f} msgs/s (no sockets)")


if __name__ == "__main__":
    main()
