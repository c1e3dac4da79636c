"""Crash tests: the broker, a real subprocess, is killed again and again under load.

The promise under test: once the broker acknowledged a QoS 1 or QoS 2 message for a persistent
session (PUBACK / PUBREC), the message survives any crash and is delivered as the spec says -
QoS 1 at least once, QoS 2 exactly once - to every subscriber subscribed to it, online or
offline.

Both tests share one harness (`Storm`), all in one asyncio loop in the test process:

- the broker: `python -m edge_broker --config ... --port P --data-dir D` (SQLite store,
  durability fsync, and every queue setting at its default: the promise must hold as
  shipped, so the default bounds must hold what the offline subscribers pile up), restarted
  on the same data directory and port each cycle; it is ready when its log says it started
  (read from its stderr pipe, no polling);
- 5 publishers (3 MQTT 5, 2 MQTT 3.1.1, persistent sessions) sending QoS 1 and QoS 2 messages
  (chosen at random) at full speed, pipelined (WINDOW unacknowledged each). Every payload
  carries a unique id (publisher, sequence). After each restart they reconnect with clean
  session 0 and resend what was not acknowledged, as the protocol requires: PUBLISH with DUP
  and the same packet id while no PUBACK/PUBREC came, PUBREL while a PUBREC came but no
  PUBCOMP. They hold back new messages while an online subscriber is BACKLOG_HIGH messages
  behind, so the queues the broker re-reads at every restart stay bounded (and cycles short);
- 2 online subscribers (3.1.1 and 5, persistent, `crash/#`) that reconnect after every
  restart and ack everything at once; 2 persistent subscribers (3.1.1 and 5) offline during
  the whole storm, which connect only at the end to drain, subscribed to one publisher each
  (so what they accumulate stays bounded too). The MQTT 5 subscribers announce a Receive
  Maximum of 50, the 3.1.1 ones get the broker's default max_inflight_messages. The QoS 2
  receiver side is method B (4.3.3 (5.0)): the packet id is recorded at PUBLISH and
  acknowledged with PUBREC; a PUBLISH with the same packet id before the PUBREL is the same
  message again, not a new delivery; PUBREL releases the id;
- 1 online MQTT 5 subscriber at QoS 0 (at most once), sending a PINGREQ after every read so
  that its connection is also pumped after its own commits: a QoS 2 message must never reach
  it twice. That checks the commit watermark (`BrokerCore.pull` hands out nothing whose batch
  has not committed: sent before its commit, lost in a crash and published again by its
  publisher, it would arrive twice); the QoS 2 subscribers cannot see it, their packet ids
  being committed before the PUBLISH leaves anyway.

Packets are built by hand (struct/bytes), independent of edge_broker.mqtt.codec.

`test_crash_sigkill_under_load`: SIGKILL from outside, 20 times, after a random 0.3-1.0 s of
load (0.02-0.3 s in one cycle of four: while clients reconnect and resend).
`test_power_loss_mid_commit`: 20 times, the broker kills itself inside its N-th group commit
(`python -m tests.faults --kill-in-commit N`, N random in 5..200), after the statements ran and
before COMMIT; each restart must succeed (the store is never left unusable). Neither can
tell a missing fsync from a present one: the kernel keeps what a killed process wrote.

After the last restart (no fault), publishers stop sending new messages, finish their flows
and publish an end marker each (QoS 1, after everything else they sent, so it is queued
behind it); a subscriber is done when it has every marker and no QoS 2 flow open. Then:

- every message whose PUBACK (QoS 1) / PUBCOMP (QoS 2) reached its publisher was delivered to
  every subscriber subscribed to it (also those acknowledged with PUBREC only, should a
  publisher never get the PUBCOMP: the broker had accepted them);
- no QoS 2 message was delivered twice to any subscriber, the QoS 0 one included (counted by
  unique id); QoS 1 duplicates are allowed, counted and printed;
- no protocol anomaly (a persistent session not present after a restart, an ack for an
  unknown packet id, a packet id reused for another message while in flight, a QoS changed,
  a connection closed by a live broker), and no ERROR or "body is missing" line in the
  broker's log.

Every wait is bounded (the drain phase as a whole has DRAIN_TIMEOUT_S); the only sleeps choose
the moment of a kill (the experiment). The counts are printed (`pytest -s`); a failure prints
the first missing ids with the cycles in which they were sent, PUBREC'ed and acknowledged, and
the path of the broker's log (every cycle, each line prefixed with its cycle).
CRASH_TEST_SEED=n replays a run's random choices (not its timing); CRASH_TEST_SOAK=k runs k
times as many cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

WINDOW = 50  # unacknowledged messages per publisher
# Publishers send no new message while the slower online subscriber is this many acknowledged
# messages behind, until it is half as many behind: queues (all re-read at every restart) stay
# bounded, so cycles stay short, and messages are still queued, in flight and half-done (QoS 2)
# at every kill.
BACKLOG_HIGH = 3000
PUBLISHERS = 5
PAD = b"." * 48  # payload padding after the id
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0  # a restart (opening a growing store) must be ready within this
DRAIN_TIMEOUT_S = 60.0
SELF_KILL_TIMEOUT_S = 10.0  # power-loss cycles: the fault must fire within this
CONNECT_TIMEOUT_S = 5.0
LOST_EXIT_S = 5.0  # a connection dropped: the broker must have died, at most this before
SESSION_EXPIRY_S = 3600
SUBSCRIBER_RECEIVE_MAXIMUM = 50  # MQTT 5 subscribers; 3.1.1 ones get max_inflight_messages

SOAK = int(os.environ.get("CRASH_TEST_SOAK", "1"))

CONFIG = """\
[broker]
sys_interval = 0

"""

# --------------------------------------------------------------------------- wire, by hand

CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, DISCONNECT = 2, 3, 4, 5, 6, 7, 9, 14


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(client_id: str, v5: bool, clean: bool,
                   receive_maximum: int | None = None) -> bytes:
    flags = 0x02 if clean else 0x00
    header = _utf8("MQTT") + bytes((5 if v5 else 4, flags)) + struct.pack("!H", 0)
    if v5:  # Session Expiry Interval (0x11), Receive Maximum (0x21)
        props = b"\x11" + struct.pack("!I", SESSION_EXPIRY_S)
        if receive_maximum is not None:
            props += b"\x21" + struct.pack("!H", receive_maximum)
        header += _varint(len(props)) + props
    return _frame(0x10, header + _utf8(client_id))


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int, dup: bool,
                   v5: bool) -> bytes:
    body = _utf8(topic) + struct.pack("!H", packet_id) + (b"\x00" if v5 else b"") + payload
    return _frame(0x30 | (0x08 if dup else 0) | (qos << 1), body)


def ack_packet(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP with success (the v5 reason code may be omitted)."""
    return bytes(((kind << 4) | (0x02 if kind == PUBREL else 0), 2)) + struct.pack("!H",
                                                                                  packet_id)


def subscribe_packet(packet_id: int, topic_filters: tuple[str, ...], v5: bool,
                     qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if v5 else b"")
    for topic_filter in topic_filters:
        body += _utf8(topic_filter) + bytes((qos,))  # maximum QoS
    return _frame(0x82, body)


DISCONNECT_PACKET = b"\xe0\x00"
PINGREQ_PACKET = b"\xc0\x00"


def split_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete packets off the front of `buf`: [(first byte, body)]."""
    frames = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        length, multiplier, i, complete = 0, 1, pos + 1, False
        while i < end:
            byte = buf[i]
            i += 1
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                complete = True
                break
        if not complete or i + length > end:
            break
        frames.append((buf[pos], bytes(buf[i:i + length])))
        pos = i + length
    del buf[:pos]
    return frames


def parse_publish(first: int, body: bytes, v5: bool) -> tuple[int, bool, int, bytes]:
    """(qos, dup, packet id, payload) of a PUBLISH from the broker."""
    qos = (first >> 1) & 3
    topic_len = struct.unpack_from("!H", body)[0]
    pos = 2 + topic_len
    packet_id = 0
    if qos:
        packet_id = struct.unpack_from("!H", body, pos)[0]
        pos += 2
    if v5:
        length, multiplier = 0, 1
        while True:
            byte = body[pos]
            pos += 1
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        pos += length
    return qos, bool(first & 0x08), packet_id, body[pos:]


class ConnectionLost(Exception):
    pass


class Link:
    """One TCP connection to the broker, reading whole packets."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int) -> Link:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=1 << 20), CONNECT_TIMEOUT_S)
        return cls(reader, writer)

    async def frames(self, timeout: float | None = None) -> list[tuple[int, bytes]]:
        """The next packets (at least one); ConnectionLost on EOF or a reset."""
        while True:
            frames = split_frames(self.buf)
            if frames:
                return frames
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            except TimeoutError:
                raise ConnectionLost(f"nothing received within {timeout} s") from None
            except (ConnectionError, OSError) as error:
                raise ConnectionLost(str(error)) from None
            if not data:
                raise ConnectionLost("EOF")
            self.buf += data

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as error:
            raise ConnectionLost(str(error)) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# --------------------------------------------------------------------------- bookkeeping


@dataclass(slots=True)
class MessageRecord:
    """One message as its publisher saw it. Cycles are broker generations (1 = first)."""

    qos: int
    sent_cycle: int
    resends: int = 0
    pubrec_cycle: int | None = None
    acked_cycle: int | None = None  # PUBACK (QoS 1) or PUBCOMP (QoS 2)


@dataclass(slots=True)
class Outgoing:
    uid: tuple[int, int]
    qos: int
    topic: str
    payload: bytes
    state: int  # PUBLISH: awaiting PUBACK/PUBREC; PUBREL: awaiting PUBCOMP


@dataclass
class Stats:
    restarts: int = 0
    external_kills: int = 0
    self_kills: int = 0
    fault_timeouts: int = 0
    start_times: list[float] = field(default_factory=list)
    publish_resends: int = 0
    pubrel_resends: int = 0
    pubcomp_not_found: int = 0


class BrokerProcess:
    """The broker as a subprocess; its stderr goes to `log_path`, each line prefixed with the
    cycle. `start()` returns once the broker logged that it started (listening)."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.data_dir = tmp / "data"
        self.config = tmp / "edge-broker.toml"
        self.config.write_text(CONFIG)
        self.log_path = tmp / "broker.log"
        self.log = self.log_path.open("a", buffering=1)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self.bad_lines: list[str] = []

    async def start(self, cycle: int, fault_at: int | None = None) -> float:
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env["PYTHONPATH"] = str(REPO)
        # The fault hook is installed by the test's launcher (tests/faults.py), never by an
        # environment variable the broker would read.
        launcher = (["-m", "tests.faults", "--kill-in-commit", str(fault_at), "--"]
                    if fault_at is not None else ["-m", "edge_broker"])
        self.log.write(f"[{cycle}] ---- start (fault at commit {fault_at})\n")
        started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *launcher, "--config", str(self.config),
            "--port", str(self.port), "--data-dir", str(self.data_dir),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env)
        ready = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._read_log(self.proc, cycle, ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT_S)
        except TimeoutError:
            await self.kill()
            pytest.fail(f"cycle {cycle}: the broker did not start within {START_TIMEOUT_S} s "
                        f"(log: {self.log_path}):\n{self.tail()}")
        if not ready.result():
            await self.wait_exit(5)
            pytest.fail(f"cycle {cycle}: the broker exited with {self.proc.returncode} instead "
                        f"of starting (the store left unusable?):\n{self.tail()}")
        return time.monotonic() - started

    async def _read_log(self, proc: asyncio.subprocess.Process, cycle: int,
                        ready: asyncio.Future[bool]) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.write(f"[{cycle}] {line}\n")
            if not ready.done() and " started (persistence=" in line:
                ready.set_result(True)
            if (" ERROR " in line or " CRITICAL " in line or "Traceback" in line
                    or "body is missing" in line):
                self.bad_lines.append(f"[{cycle}] {line}")
        if not ready.done():
            ready.set_result(False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_exit(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for the process to exit; True if it did."""
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return False
        if self._pump is not None:
            await asyncio.wait_for(asyncio.shield(self._pump), 5)
        return True

    async def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        assert await self.wait_exit(10), "SIGKILL did not end the broker"

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        self.log.close()


class Storm:
    """The broker, the publishers, the subscribers and the ledger they share."""

    def __init__(self, tmp: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.broker = BrokerProcess(tmp, free_port())
        self.cycle = 0  # broker generation; clients connect to the current one
        self.up = False  # set once the current generation started, cleared before a kill
        self.changed = asyncio.Condition()
        self.stop_new = False  # drain phase: publishers send no new messages
        self.accepted_count = 0  # messages that got a PUBACK or a PUBREC
        self.flow = asyncio.Event()  # cleared while the online subscribers lag too far
        self.flow.set()
        self.drain_started = 0.0
        self.drain_took: dict[str, float] = {}  # client id -> s from the last restart to done
        self.messages: dict[tuple[int, int], MessageRecord] = {}
        self.anomalies: list[str] = []
        self.stats = Stats()
        self.publishers = [Publisher(self, i, v5=(i % 2 == 0)) for i in range(PUBLISHERS)]
        # The offline subscribers take one publisher each (both QoS): every message queued
        # for them is re-read at every restart, and that load grows with the storm.
        every = range(PUBLISHERS)
        self.subscribers = [Subscriber(self, "online-v311", v5=False, online=True, of=every),
                            Subscriber(self, "online-v5", v5=True, online=True, of=every),
                            Subscriber(self, "offline-v311", v5=False, online=False, of=[0]),
                            Subscriber(self, "offline-v5", v5=True, online=False, of=[1]),
                            # At most once; checks the commit watermark: a QoS 2 message
                            # must not reach it twice (sent before its commit, lost in a
                            # crash, and published again by its publisher).
                            Subscriber(self, "online-v5-qos0", v5=True, online=True, of=every,
                                       qos=0)]

    def anomaly(self, text: str) -> None:
        if len(self.anomalies) < 1000:
            self.anomalies.append(f"cycle {self.cycle}: {text}")

    async def wait_up(self, newer_than: int = 0) -> int:
        async with self.changed:
            await self.changed.wait_for(lambda: self.up and self.cycle > newer_than)
            return self.cycle

    def backlog(self) -> int:
        """Acknowledged messages the slower online subscriber has not received yet."""
        return self.accepted_count - min(s.received for s in self.subscribers
                                         if s.online and s.max_qos)

    async def broker_died(self, cycle: int) -> bool:
        """A connection to broker `cycle` was lost: True if that broker died (was killed, or
        killed itself in a commit), False if it is alive and well (an anomaly)."""
        if cycle != self.cycle or not self.up:
            return True
        return await self.broker.wait_exit(LOST_EXIT_S)

    async def start_broker(self, fault_at: int | None = None) -> None:
        took = await self.broker.start(self.cycle + 1, fault_at)
        self.stats.start_times.append(took)
        async with self.changed:
            self.cycle += 1
            self.up = True
            self.changed.notify_all()

    async def broker_down(self) -> None:
        async with self.changed:
            self.up = False

    # -- the two experiments -----------------------------------------------------------------

    async def setup(self) -> None:
        await self.start_broker()
        for sub in self.subscribers:
            await sub.subscribe_once()

    async def run(self, cycles: int, *, power_loss: bool) -> float:
        """`cycles` crashes under load, then a last restart that drains everything. Returns
        how long the storm (the part with crashes) took."""
        await self.setup()
        tasks = [asyncio.create_task(p.run(), name=p.client_id) for p in self.publishers]
        tasks += [asyncio.create_task(s.run(), name=s.client_id)
                  for s in self.subscribers if s.online]
        storm_started = time.monotonic()
        try:
            fault_at: int | None = None  # of the running broker
            for _ in range(cycles):
                await self._end_cycle(fault_at)
                self._check(tasks)
                # Power loss: the next broker dies in its N-th group commit, after the
                # statements ran and before COMMIT.
                fault_at = self.rng.randint(5, 200) if power_loss else None
                await self.start_broker(fault_at)
            await self._end_cycle(fault_at)
            self._check(tasks)
            storm_s = time.monotonic() - storm_started
            # The last restart: no faults; drain everything.
            self.drain_started = time.monotonic()
            await self.start_broker()
            self.stop_new = True
            self.flow.set()
            tasks += [asyncio.create_task(s.run(), name=s.client_id)
                      for s in self.subscribers if not s.online]
            waits = [p.done.wait() for p in self.publishers] + [
                s.done.wait() for s in self.subscribers]
            drain = asyncio.gather(*waits)
            try:
                await asyncio.wait_for(asyncio.shield(drain), DRAIN_TIMEOUT_S)
            except TimeoutError:
                drain.cancel()
                self._check(tasks)
                waiting = [c.client_id for c in (*self.publishers, *self.subscribers)
                           if not c.done.is_set()]
                pytest.fail("\n".join([
                    f"not drained within {DRAIN_TIMEOUT_S} s; not done: {', '.join(waiting)}",
                    self.report(), *self.problems(), f"broker log: {self.broker.log_path}"]))
            self._check(tasks)
            return storm_s
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.broker.kill()
            self.broker.close()

    async def _end_cycle(self, fault_at: int | None) -> None:
        """The running broker dies: SIGKILL after a random 0.3-1.0 s of load (0.02-0.3 s in
        one cycle of four), or, when it was started with a fault, by its own hand in a
        commit."""
        if fault_at is None:
            # The experiment: when to kill. Mostly under steady load; one cycle in four
            # early, while clients reconnect and resend.
            early = self.rng.random() < 0.25
            await asyncio.sleep(self.rng.uniform(0.02, 0.3) if early
                                else self.rng.uniform(0.3, 1.0))
            await self.broker_down()
            await self.broker.kill()
            self.stats.external_kills += 1
        else:
            died = await self.broker.wait_exit(SELF_KILL_TIMEOUT_S)
            await self.broker_down()
            code = self.broker.proc.returncode if self.broker.proc else None
            if died and code == -signal.SIGKILL:
                self.stats.self_kills += 1
            elif died:
                pytest.fail(f"cycle {self.cycle}: the broker exited with {code}:\n"
                            f"{self.broker.tail()}")
            else:
                self.stats.fault_timeouts += 1
                await self.broker.kill()
        self.stats.restarts += 1

    def _check(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    # -- verdict ---------------------------------------------------------------------------

    def accepted(self) -> dict[tuple[int, int], MessageRecord]:
        """Messages the broker acknowledged: PUBACK, PUBREC (and so PUBCOMP)."""
        return {uid: m for uid, m in self.messages.items()
                if m.acked_cycle is not None or m.pubrec_cycle is not None}

    def missing_report(self, limit: int = 10) -> list[str]:
        lines = []
        for sub in self.subscribers:
            if not sub.max_qos:
                continue  # at most once: losses allowed
            missing = [uid for uid in self.accepted()
                       if uid[0] in sub.publishers and uid not in sub.delivered]
            if not missing:
                continue
            lines.append(f"{sub.client_id}: {len(missing)} acknowledged messages missing; "
                         f"first {min(limit, len(missing))}:")
            for uid in sorted(missing)[:limit]:
                m = self.messages[uid]
                lines.append(f"  publisher {uid[0]} seq {uid[1]} QoS {m.qos}: sent in cycle "
                             f"{m.sent_cycle}, resent {m.resends}x, PUBREC in cycle "
                             f"{m.pubrec_cycle}, acknowledged in cycle {m.acked_cycle}")
        return lines

    def report(self) -> str:
        s = self.stats
        sent = Counter(m.qos for m in self.messages.values())
        acked = Counter(m.qos for m in self.messages.values() if m.acked_cycle is not None)
        lines = [
            f"seed {self.seed}; cycles {self.cycle}, restarts {s.restarts} (external SIGKILL "
            f"{s.external_kills}, killed in a commit {s.self_kills}, fault not reached "
            f"{s.fault_timeouts}); broker start {min(s.start_times):.2f}-"
            f"{max(s.start_times):.2f} s",
            f"sent: QoS 1 {sent[1]}, QoS 2 {sent[2]} (PUBLISH resent with DUP "
            f"{s.publish_resends}, PUBREL resent {s.pubrel_resends}, PUBCOMP 0x92 "
            f"{s.pubcomp_not_found})",
            f"acknowledged: QoS 1 {acked[1]}, QoS 2 {acked[2]}",
            "drained (s after the last restart): " + ", ".join(
                f"{cid.removeprefix('crash-')} {took:.1f}"
                for cid, took in sorted(self.drain_took.items(), key=lambda kv: kv[1])),
        ]
        for sub in self.subscribers:
            lines.append(f"{sub.client_id}: delivered{' at QoS 0' if not sub.max_qos else ''}"
                         f" QoS 1 {sub.distinct[1]}, QoS 2 "
                         f"{sub.distinct[2]}; duplicates QoS 1 {sub.duplicates[1]}, QoS 2 "
                         f"{sub.duplicates[2]}; QoS 2 resends recognised by packet id "
                         f"{sub.qos2_resends}; PUBREL for released ids {sub.stale_pubrels}; "
                         f"reconnects {sub.connects}")
        return "\n".join(lines)

    def problems(self) -> list[str]:
        problems = []
        unacked = [uid for uid, m in self.messages.items() if m.acked_cycle is None]
        if unacked:
            problems.append(f"{len(unacked)} messages never acknowledged after the drain, "
                            f"e.g. {sorted(unacked)[:5]}")
        problems += self.missing_report()
        for sub in self.subscribers:
            twice = sorted(uid for uid, n in sub.delivered.items()
                           if n > 1 and self.messages[uid].qos == 2)
            if twice:
                problems.append(f"{sub.client_id}: {len(twice)} QoS 2 messages delivered more "
                                f"than once; first {min(5, len(twice))} with (cycle, QoS, "
                                f"packet id, DUP) of each PUBLISH received:")
                for uid in twice[:5]:
                    m = self.messages[uid]
                    problems.append(f"  publisher {uid[0]} seq {uid[1]}: "
                                    f"{sub.qos2_receipts[uid]}; sent in cycle {m.sent_cycle}, "
                                    f"resent {m.resends}x, PUBREC in cycle {m.pubrec_cycle}")
        if self.anomalies:
            problems.append(f"{len(self.anomalies)} protocol anomalies:\n  "
                            + "\n  ".join(self.anomalies[:20]))
        if self.broker.bad_lines:
            problems.append("broker log:\n  " + "\n  ".join(self.broker.bad_lines[:20]))
        return problems

    def verdict(self) -> None:
        report = self.report()
        print("\n" + report)
        problems = self.problems()
        if problems:
            pytest.fail("\n".join([report, *problems, f"broker log: {self.broker.log_path}"]))


class Publisher:
    def __init__(self, storm: Storm, index: int, v5: bool) -> None:
        self.storm = storm
        self.index = index
        self.v5 = v5
        self.client_id = f"crash-pub-{index}-{'v5' if v5 else 'v311'}"
        self.rng = random.Random(storm.rng.random())
        self.window: dict[int, Outgoing] = {}  # packet id -> message, in send order
        self.next_seq = 0
        self.next_packet_id = 1
        self.had_session = False
        self.marker_sent = False
        self.done = asyncio.Event()

    def _packet_id(self) -> int:
        candidate = self.next_packet_id
        while candidate in self.window:
            candidate = candidate % 0xFFFF + 1
        self.next_packet_id = candidate % 0xFFFF + 1
        return candidate

    def _new(self, marker: bool = False) -> tuple[int, Outgoing]:
        storm = self.storm
        seq = self.next_seq
        self.next_seq += 1
        qos = 1 if marker else self.rng.choice((1, 2))
        uid = (self.index, seq)
        if marker:
            topic, payload = f"crash/end/{self.index}", b"end:%d:%d" % (self.index, seq)
        else:
            topic, payload = (f"crash/p{self.index}/q{qos}",
                              b"%d:%d:%d:" % (self.index, seq, qos) + PAD)
            storm.messages[uid] = MessageRecord(qos, storm.cycle)
        packet_id = self._packet_id()
        out = self.window[packet_id] = Outgoing(uid, qos, topic, payload, PUBLISH)
        return packet_id, out

    async def run(self) -> None:
        storm = self.storm
        cycle = 0
        while True:
            cycle = await storm.wait_up(cycle)
            try:
                link = await Link.open(storm.broker.port)
            except (OSError, TimeoutError):
                continue  # the broker died meanwhile: wait for the next one
            try:
                if await self._session(link):
                    storm.drain_took[self.client_id] = time.monotonic() - storm.drain_started
                    self.done.set()
                    return
            except ConnectionLost as error:
                if not await storm.broker_died(cycle):
                    storm.anomaly(f"{self.client_id}: connection lost with the broker up: "
                                  f"{error}")
                    cycle -= 1  # retry on the same broker
            finally:
                link.close()

    async def _session(self, link: Link) -> bool:
        storm = self.storm
        v5 = self.v5
        await link.send(connect_packet(self.client_id, v5, clean=False))
        frames = await link.frames(CONNECT_TIMEOUT_S)
        first, body = frames[0]
        if first >> 4 != CONNACK or body[1] != 0:
            storm.anomaly(f"{self.client_id}: bad CONNACK {first:#x} {body!r}")
            raise ConnectionLost("bad CONNACK")
        if self.had_session and not body[0] & 1:
            storm.anomaly(f"{self.client_id}: session not present after a restart")
        self.had_session = True
        # Resend in order what is not acknowledged [MQTT-4.4.0-1] (5.0), same packet ids.
        out = bytearray()
        for packet_id, msg in self.window.items():
            if msg.state == PUBLISH:
                out += publish_packet(msg.topic, msg.payload, msg.qos, packet_id, True, v5)
                storm.stats.publish_resends += 1
                record = storm.messages.get(msg.uid)
                if record is not None:
                    record.resends += 1
            else:
                out += ack_packet(PUBREL, packet_id)
                storm.stats.pubrel_resends += 1
        pending = frames[1:]
        while True:
            out += self._fill()
            if out:
                await link.send(bytes(out))
                out.clear()
            if self.marker_sent and not self.window:
                await link.send(DISCONNECT_PACKET)
                return True
            if not pending:
                if not self.window and not storm.flow.is_set():
                    await storm.flow.wait()  # no deadline needed: the drain phase sets it
                    continue
                pending = await link.frames()
            for first, body in pending:
                out += self._on_packet(first, body)
            pending = []

    def _fill(self) -> bytes:
        out = bytearray()
        storm = self.storm
        if not storm.stop_new and storm.backlog() >= BACKLOG_HIGH:
            storm.flow.clear()
            return b""
        if storm.stop_new:
            if not self.window and not self.marker_sent:
                packet_id, msg = self._new(marker=True)
                self.marker_sent = True
                out += publish_packet(msg.topic, msg.payload, 1, packet_id, False, self.v5)
            return bytes(out)
        while len(self.window) < WINDOW:
            packet_id, msg = self._new()
            out += publish_packet(msg.topic, msg.payload, msg.qos, packet_id, False, self.v5)
        return bytes(out)

    def _on_packet(self, first: int, body: bytes) -> bytes:
        storm = self.storm
        kind = first >> 4
        if kind not in (PUBACK, PUBREC, PUBCOMP):
            if kind == DISCONNECT:
                storm.anomaly(f"{self.client_id}: DISCONNECT from the broker: {body!r}")
            return b""
        packet_id = struct.unpack_from("!H", body)[0]
        reason = body[2] if len(body) > 2 else 0
        msg = self.window.get(packet_id)
        name = {PUBACK: "PUBACK", PUBREC: "PUBREC", PUBCOMP: "PUBCOMP"}[kind]
        expected = {PUBACK: (1, PUBLISH), PUBREC: (2, PUBLISH), PUBCOMP: (2, PUBREL)}[kind]
        if msg is None or (msg.qos, msg.state) != expected:
            storm.anomaly(f"{self.client_id}: {name} for packet id {packet_id} in state "
                          f"{msg and (msg.qos, msg.state)}")
            return b""
        record = storm.messages.get(msg.uid)
        if kind == PUBCOMP:
            if reason == 0x92:
                storm.stats.pubcomp_not_found += 1  # PUBREL committed, PUBCOMP lost
            elif reason:
                storm.anomaly(f"{self.client_id}: PUBCOMP {reason:#x} for {msg.uid}")
        elif reason not in (0, 0x10):  # 0x10: no matching subscribers (still accepted)
            storm.anomaly(f"{self.client_id}: {name} {reason:#x} for {msg.uid}")
        if kind == PUBREC:
            msg.state = PUBREL
            if record is not None:
                record.pubrec_cycle = storm.cycle
                storm.accepted_count += 1
            return ack_packet(PUBREL, packet_id)
        del self.window[packet_id]
        if record is not None:
            if record.pubrec_cycle is None:
                storm.accepted_count += 1
            record.acked_cycle = storm.cycle
        return b""


class Subscriber:
    def __init__(self, storm: Storm, name: str, v5: bool, online: bool,
                 of: Iterable[int], qos: int = 2) -> None:
        self.storm = storm
        self.max_qos = qos  # of its subscriptions
        self.publishers = set(of)  # whose messages it subscribes to
        self.topic_filters = ("crash/end/#",
                              *(("crash/#",) if len(self.publishers) == PUBLISHERS else
                                (f"crash/p{i}/#" for i in sorted(self.publishers))))
        self.client_id = f"crash-sub-{name}"
        self.v5 = v5
        self.online = online
        self.had_session = False
        self.delivered: Counter[tuple[int, int]] = Counter()
        self.distinct: Counter[int] = Counter()  # by the QoS it was published with
        self.duplicates: Counter[int] = Counter()  # by the QoS it was published with
        self.awaiting_pubrel: dict[int, tuple[int, int] | None] = {}  # QoS 2, method B
        # QoS 2 messages: (cycle, QoS, packet id, DUP) of each PUBLISH, to explain duplicates
        self.qos2_receipts: dict[tuple[int, int], list[tuple[int, int, int, bool]]] = {}
        self.markers: set[int] = set()
        self.qos2_resends = 0
        self.received = 0  # distinct messages
        self.stale_pubrels = 0
        self.connects = 0
        self.done = asyncio.Event()

    async def _connect(self, link: Link) -> list[tuple[int, bytes]]:
        storm = self.storm
        # MQTT 5 subscribers take SUBSCRIBER_RECEIVE_MAXIMUM messages in flight at a time;
        # 3.1.1 ones the broker's max_inflight_messages.
        await link.send(connect_packet(self.client_id, self.v5, clean=False,
                                       receive_maximum=SUBSCRIBER_RECEIVE_MAXIMUM))
        frames = await link.frames(CONNECT_TIMEOUT_S)
        first, body = frames[0]
        if first >> 4 != CONNACK or body[1] != 0:
            storm.anomaly(f"{self.client_id}: bad CONNACK {first:#x} {body!r}")
            raise ConnectionLost("bad CONNACK")
        if self.had_session and not body[0] & 1:
            storm.anomaly(f"{self.client_id}: session not present after a restart")
            self.awaiting_pubrel.clear()  # the client discards its session state too
        self.had_session = True
        self.connects += 1
        return frames[1:]

    async def subscribe_once(self) -> None:
        """Before the storm: create the persistent session and its subscription."""
        link = await Link.open(self.storm.broker.port)
        try:
            pending = await self._connect(link)
            await link.send(subscribe_packet(1, self.topic_filters, self.v5, self.max_qos))
            while not any(first >> 4 == SUBACK for first, _ in pending):
                pending = await link.frames(CONNECT_TIMEOUT_S)
            suback = next(body for first, body in pending if first >> 4 == SUBACK)
            codes = suback[-len(self.topic_filters):]
            assert set(codes) == {self.max_qos}, f"{self.client_id}: SUBACK {suback!r}"
            await link.send(DISCONNECT_PACKET)  # the session (and subscription) stays
        finally:
            link.close()

    async def run(self) -> None:
        storm = self.storm
        cycle = 0
        while True:
            cycle = await storm.wait_up(cycle)
            try:
                link = await Link.open(storm.broker.port)
            except (OSError, TimeoutError):
                continue
            try:
                pending = await self._connect(link)
                while True:
                    out = bytearray()
                    for first, body in pending:
                        out += self._on_packet(first, body)
                    if not self.max_qos:
                        # A QoS 0 subscriber acks nothing: a PINGREQ per read gets its
                        # connection pumped after its own (empty) commits too, not only when
                        # woken by the commit of a batch that queued for it.
                        out += PINGREQ_PACKET
                    if out:
                        await link.send(bytes(out))
                    if (self.online and not storm.flow.is_set()
                            and storm.backlog() < BACKLOG_HIGH // 2):
                        storm.flow.set()
                    if (storm.stop_new and len(self.markers) == PUBLISHERS
                            and not self.awaiting_pubrel and not self.done.is_set()):
                        storm.drain_took[self.client_id] = (time.monotonic()
                                                            - storm.drain_started)
                        self.done.set()
                    pending = await link.frames()
            except ConnectionLost as error:
                if not await storm.broker_died(cycle):
                    storm.anomaly(f"{self.client_id}: connection lost with the broker up: "
                                  f"{error}")
                    cycle -= 1
            finally:
                link.close()

    def _on_packet(self, first: int, body: bytes) -> bytes:
        storm = self.storm
        kind = first >> 4
        if kind == PUBREL:
            packet_id = struct.unpack_from("!H", body)[0]
            if self.awaiting_pubrel.pop(packet_id, False) is False:
                self.stale_pubrels += 1  # our PUBCOMP was lost in a crash: answer again
            return ack_packet(PUBCOMP, packet_id)
        if kind != PUBLISH:
            if kind == DISCONNECT:
                storm.anomaly(f"{self.client_id}: DISCONNECT from the broker: {body!r}")
            return b""
        qos, dup, packet_id, payload = parse_publish(first, body, self.v5)
        parts = payload.split(b":")
        if parts[0] == b"end":
            uid, sent_qos = (int(parts[1]), int(parts[2])), 1
            self.markers.add(uid[0])
        else:
            uid, sent_qos = (int(parts[0]), int(parts[1])), int(parts[2])
        if qos != min(sent_qos, self.max_qos):
            storm.anomaly(f"{self.client_id}: {uid} sent at QoS {sent_qos}, received at {qos}")
        if sent_qos == 2:
            self.qos2_receipts.setdefault(uid, []).append((storm.cycle, qos, packet_id, dup))
        if qos == 2:
            if packet_id in self.awaiting_pubrel:
                # Method B: the same packet id before PUBREL is the same message again.
                if self.awaiting_pubrel[packet_id] != uid:
                    storm.anomaly(f"{self.client_id}: packet id {packet_id} reused for {uid} "
                                  f"while {self.awaiting_pubrel[packet_id]} awaits PUBREL")
                elif not dup:
                    storm.anomaly(f"{self.client_id}: {uid} sent again without DUP")
                self.qos2_resends += 1
                return ack_packet(PUBREC, packet_id)
            self.awaiting_pubrel[packet_id] = uid
            self._deliver(uid, sent_qos)
            return ack_packet(PUBREC, packet_id)
        self._deliver(uid, sent_qos)
        return ack_packet(PUBACK, packet_id) if qos == 1 else b""

    def _deliver(self, uid: tuple[int, int], qos: int) -> None:
        """Count a delivery of message `uid`, published with QoS `qos`."""
        if uid not in self.storm.messages:
            return  # an end marker
        n = self.delivered[uid] = self.delivered[uid] + 1
        if n == 1:
            self.distinct[qos] += 1
            self.received += 1
        else:
            self.duplicates[qos] += 1


def run_storm(tmp_path: Path, cycles: int, *, power_loss: bool) -> Storm:
    seed = int(os.environ.get("CRASH_TEST_SEED", random.randrange(1 << 30)))
    started = time.monotonic()

    async def main() -> Storm:
        storm = Storm(tmp_path, seed)
        storm_s = await storm.run(cycles, power_loss=power_loss)
        print(f"\nstorm {storm_s:.1f} s, total {time.monotonic() - started:.1f} s")
        return storm

    storm = asyncio.run(main())
    storm.verdict()
    return storm


def test_crash_sigkill_under_load(tmp_path: Path) -> None:
    cycles = 20 * SOAK
    storm = run_storm(tmp_path, cycles=cycles, power_loss=False)
    assert storm.stats.external_kills >= cycles


def test_power_loss_mid_commit(tmp_path: Path) -> None:
    cycles = 20 * SOAK
    storm = run_storm(tmp_path, cycles=cycles, power_loss=True)
    # The broker restarted after every torn commit (start_broker fails otherwise), and the
    # fault fired in most cycles (a cycle where it did not is ended with SIGKILL instead).
    assert storm.stats.self_kills >= cycles * 0.8, storm.report()
