"""Fuzz campaign: mutated valid packets for MQTT 3.1, 3.1.1 and 5.0 against a real broker.

Run the full campaign (about 100,000 cases) from the repository root:

    .venv/bin/python -m tests.fuzz_campaign --count 100000 --seed 1

`tests/system/test_fuzz.py` runs a smaller count in the normal suite. Options: `--workers`
(parallel fuzzing connections), `--deadline` (seconds a control round trip may take),
`--workdir` (keeps the broker's data, its stderr log and `cases.jsonl`, one line per case with
its bytes, to reproduce a finding), `--broker-arg` (extra `edge-broker` arguments; e.g. a
strict configuration, with small limits, as `--broker-arg=--config --broker-arg=strict.toml`).

What it does. The broker (the installed `edge-broker` script) runs as a subprocess on a free
port, its stderr in a file. Worker threads take case numbers in turn; each case is built from
`random.Random(f"{seed}:{case}")` (tests/fuzz_mutations.py) in one of three modes:

* session (60%): a mutated packet on an established connection of the case's protocol level,
  reused from case to case while the broker keeps it open (in a third of them behind one to
  three valid packets in the same write);
* pipelined (25%): a valid CONNECT and a mutated packet in one write, on a new connection; on
  5.0 a third of these CONNECTs announce a tiny Maximum Packet Size (1 to 8 bytes);
* connect (15%): a mutated CONNECT as the first bytes of a new connection.

When the bytes end in whole packets a PINGREQ follows and the worker reads until the PINGRESP
(the connection is alive) or the close; when the last packet is incomplete the worker shuts its
sending side and waits for the close. Meanwhile a control client does QoS 1 round trips
(PUBLISH, PUBACK and its own copy back) on a `$` topic no fuzzed wildcard matches; each must
complete within the deadline. At the end the broker must still be running, stop cleanly on
SIGTERM, and its log must hold no "Traceback", "Fatal error" or "internal error". Findings are
grouped by the exception they end with; the client ids named in the first one's log lines are
matched to the cases sent on those connections (cases.jsonl), which are printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from edge_broker.mqtt.codec import encode
from tests.fuzz_mutations import LEVELS, PINGREQ, SEEDS, connect_packet, frames_state, mutate
from tests.integration.brokerprocess import BrokerProcess

BAD_LOG_PATTERNS = ("Traceback", "Fatal error", "internal error")
IO_TIMEOUT_S = 5.0
_CLIENT = re.compile(r"\bfz-[pcw][\w-]*")


@dataclass
class Case:
    index: int
    mode: str  # "session", "pipelined", "connect"
    level: int
    data: bytes


def make_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    level = rng.choice(LEVELS)
    roll = rng.random()
    if roll < 0.60:
        # Client packets but CONNECT / DISCONNECT; a third of the cases first send one to
        # three of them unchanged, so the error meets state (answers owed, QoS 2 in flight).
        packets = [s for s in SEEDS[level] if s[0] >> 4 not in (1, 2, 9, 11, 13, 14)]
        prefix = b"".join(rng.choice(packets) for _ in range(rng.randint(1, 3))) if (
            rng.random() < 1 / 3) else b""
        return Case(index, "session", level, prefix + mutate(rng, rng.choice(packets), level))
    if roll < 0.85:
        tiny = level == 5 and rng.random() < 1 / 3
        connect = encode(connect_packet(level, f"fz-p{index}",
                                        maximum_packet_size=rng.randint(1, 8) if tiny else None),
                         level)
        data = mutate(rng, rng.choice(SEEDS[level]), level)
        return Case(index, "pipelined", level, connect + data)
    connect = encode(connect_packet(level, f"fz-c{index}", rng), level)
    return Case(index, "connect", level, mutate(rng, connect, level))


# --------------------------------------------------------------------------- reading


def _read_frames(sock: socket.socket, buf: bytearray, deadline: float) -> list[int] | None:
    """Read once; the first bytes of the complete frames now in `buf` (removed from it).
    None at end of stream; [] on timeout (the caller checks the deadline)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return []
    sock.settimeout(remaining)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return []
    except OSError:
        return None
    if not data:
        return None
    buf += data
    firsts = []
    while len(buf) >= 2:
        value = shift = 0
        pos = 1
        while True:
            if pos >= len(buf):
                return firsts
            if pos > 4:
                raise AssertionError(f"the broker sent a bad frame: {bytes(buf[:16])!r}")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if pos + value > len(buf):
            return firsts
        firsts.append(buf[0])
        del buf[:pos + value]
    return firsts


def exchange(sock: socket.socket, data: bytes) -> str:
    """Send `data` (plus a PINGREQ when it ends in whole packets); "alive" when the PINGRESP
    came back, "closed" when the broker closed the connection, "timeout" otherwise."""
    complete = frames_state(data) == "complete"
    try:
        sock.sendall(data + PINGREQ if complete else data)
        if not complete:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        return "closed"
    deadline = time.monotonic() + IO_TIMEOUT_S
    buf = bytearray()
    while time.monotonic() < deadline:
        firsts = _read_frames(sock, buf, deadline)
        if firsts is None:
            return "closed"
        if complete and 0xD0 in firsts:
            return "alive"
    return "timeout"


def open_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def handshake(port: int, level: int, client_id: str) -> socket.socket:
    sock = open_connection(port)
    sock.sendall(encode(connect_packet(level, client_id), level))
    buf = bytearray()
    deadline = time.monotonic() + IO_TIMEOUT_S
    while time.monotonic() < deadline:
        firsts = _read_frames(sock, buf, deadline)
        if firsts is None:
            break
        if 0x20 in firsts:
            return sock
    sock.close()
    raise AssertionError(f"no CONNACK for a valid level {level} CONNECT ({client_id})")


# --------------------------------------------------------------------------- the campaign


@dataclass
class Totals:
    cases: int = 0
    connections: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    timeouts: list[int] = field(default_factory=list)  # case numbers without any answer
    errors: list[str] = field(default_factory=list)


class Campaign:
    def __init__(self, port: int, seed: int, count: int, cases_file: TextIO) -> None:
        self.port = port
        self.seed = seed
        self.count = count
        self._indices = itertools.count()
        self._lock = threading.Lock()
        self._cases_file = cases_file
        self.totals = Totals()
        self.stop = threading.Event()

    def next_index(self) -> int | None:
        with self._lock:
            index = next(self._indices)
        return index if index < self.count and not self.stop.is_set() else None

    def record(self, case: Case, client: str, port: int, outcome: str,
               new_connection: bool) -> None:
        with self._lock:
            totals = self.totals
            totals.cases += 1
            totals.connections += new_connection
            totals.outcomes[outcome] = totals.outcomes.get(outcome, 0) + 1
            if outcome == "timeout":
                totals.timeouts.append(case.index)
            self._cases_file.write(json.dumps({"case": case.index, "mode": case.mode,
                                               "level": case.level, "client": client,
                                               "port": port,
                                               "outcome": outcome, "hex": case.data.hex()})
                                   + "\n")

    def worker(self, number: int) -> None:
        sessions: dict[int, tuple[socket.socket, str]] = {}
        names = itertools.count()
        try:
            while (index := self.next_index()) is not None:
                case = make_case(self.seed, index)
                if case.mode == "session":
                    new = case.level not in sessions
                    if new:
                        client = f"fz-w{number}-{next(names)}"
                        sessions[case.level] = (handshake(self.port, case.level, client),
                                                client)
                    sock, client = sessions[case.level]
                    port = sock.getsockname()[1]
                    outcome = exchange(sock, case.data)
                    if outcome != "alive":
                        sock.close()
                        del sessions[case.level]
                else:
                    new = True
                    client = f"fz-{case.mode[0]}{case.index}"  # as the CONNECT names it
                    sock = open_connection(self.port)
                    port = sock.getsockname()[1]
                    outcome = exchange(sock, case.data)
                    sock.close()
                self.record(case, client, port, outcome, new)
        except Exception as error:  # a worker failing is a finding, not a crash
            with self._lock:
                self.totals.errors.append(f"worker {number}: {error!r}")
            self.stop.set()
        finally:
            for sock, _ in sessions.values():
                sock.close()


class Control:
    """QoS 1 round trips to itself, each within `deadline_s`."""

    def __init__(self, port: int, deadline_s: float) -> None:
        self.port = port
        self.deadline_s = deadline_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.topic = f"$fuzz-control/{random.getrandbits(48):012x}"
        self.thread = threading.Thread(target=self._run, name="control", daemon=True)

    def _run(self) -> None:
        from tests.integration.rawclient import PUBACK, RawClient, connect

        client: RawClient | None = None
        try:
            client = connect(self.port, f"control-{random.getrandbits(48):012x}", version=4)
            client.subscribe((self.topic, 1))
            for number in itertools.count(1):
                if self.stop.is_set():
                    break
                started = time.monotonic()
                packet_id = number % 65535 + 1
                payload = str(number).encode()
                client.publish(self.topic, payload, qos=1, packet_id=packet_id)
                acked = delivered = False
                while not (acked and delivered):
                    remaining = started + self.deadline_s - time.monotonic()
                    packet = client.read(max(remaining, 0.0)) if remaining > 0 else None
                    if packet is None:
                        self.failures.append(f"round trip {number} not done within "
                                             f"{self.deadline_s} s")
                        return
                    if packet.packet_type == PUBACK and packet.packet_id == packet_id:
                        acked = True
                    elif packet.packet_type == 3 and packet.payload == payload:
                        delivered = True
                        client.ack(PUBACK, packet.packet_id)
                self.latencies.append(time.monotonic() - started)
                self.stop.wait(0.02)  # pace: a round trip every ~20 ms at most
        except (AssertionError, OSError, EOFError) as error:
            self.failures.append(f"control client: {error!r}")
        finally:
            if client is not None:
                client.close()


@dataclass
class Result:
    totals: Totals
    control_round_trips: int
    control_max_latency_s: float
    control_p99_latency_s: float
    control_failures: list[str]
    log_findings: list[str]
    broker_alive: bool
    exit_code: int | None
    wall_s: float
    log_path: Path

    @property
    def ok(self) -> bool:
        return (not self.totals.errors and not self.control_failures and not self.log_findings
                and self.broker_alive and self.exit_code == 0 and self.control_round_trips > 0)

    def summary(self) -> str:
        t = self.totals
        lines = [
            f"cases: {t.cases}  connections: {t.connections}  outcomes: {t.outcomes}",
            f"control round trips: {self.control_round_trips}  max latency: "
            f"{self.control_max_latency_s * 1000:.1f} ms  p99: "
            f"{self.control_p99_latency_s * 1000:.1f} ms",
            f"broker alive at the end: {self.broker_alive}  exit code on SIGTERM: "
            f"{self.exit_code}  wall time: {self.wall_s:.1f} s  log: {self.log_path}",
        ]
        if t.timeouts:
            lines.append(f"cases without an answer within {IO_TIMEOUT_S} s: "
                         f"{len(t.timeouts)} (first: {t.timeouts[:10]})")
        lines += [f"worker error: {e}" for e in t.errors]
        lines += [f"control failure: {f}" for f in self.control_failures]
        lines += [f"log finding: {f}" for f in self.log_findings]
        lines.append("CLEAN" if self.ok else "FAILED")
        return "\n".join(lines)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d ")


def scan_log(log: str, cases_path: Path, limit: int = 5) -> list[str]:
    """The bad log lines grouped by the exception they end with (count, first occurrence
    with its context, and the last cases sent from the peer ports named near it)."""
    lines = log.splitlines()
    groups: dict[str, list[int]] = {}
    for number, line in enumerate(lines):
        if not any(pattern in line for pattern in BAD_LOG_PATTERNS):
            continue
        end = number + 1
        while end < len(lines) and not _TIMESTAMP.match(lines[end]) and end - number < 80:
            end += 1
        block = [text for text in lines[number:end] if text.strip()]
        key = block[-1].strip() if len(block) > 1 else line.strip()
        groups.setdefault(re.sub(r"\d+", "N", key), []).append(number)
    findings = []
    for key, numbers in list(groups.items())[:limit]:
        first = numbers[0]
        context = lines[first:first + 40]
        clients = set(_CLIENT.findall("\n".join(context)))
        with open(cases_path) as file:
            cases = [row for row in map(json.loads, file) if row["client"] in clients]
        findings.append(f"{len(numbers)} x {key}\n  first at log line {first + 1}; cases of "
                        f"{sorted(clients)}:\n  "
                        + "\n  ".join(json.dumps(row) for row in cases[-6:]))
    if len(groups) > limit:
        findings.append(f"... and {len(groups) - limit} more kinds")
    return findings


def run_campaign(count: int, seed: int, workdir: Path, *, workers: int = 6,
                 deadline_s: float = 5.0, broker_args: tuple[str, ...] = ()) -> Result:
    started = time.monotonic()
    broker = BrokerProcess(workdir / "data", "--log-level", "info", *broker_args,
                           log_dir=workdir)
    cases_path = workdir / "cases.jsonl"
    try:
        broker.wait_listening()
        control = Control(broker.port, deadline_s)
        control.thread.start()
        with open(cases_path, "w") as cases_file:
            campaign = Campaign(broker.port, seed, count, cases_file)
            threads = [threading.Thread(target=campaign.worker, args=(n,), name=f"fuzz-{n}")
                       for n in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        control.stop.set()
        control.thread.join(deadline_s + IO_TIMEOUT_S)
        alive = broker.process.poll() is None
        exit_code = broker.stop() if alive else broker.process.returncode
    finally:
        broker.kill()
    latencies = sorted(control.latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return Result(campaign.totals, len(latencies), latencies[-1] if latencies else 0.0, p99,
                  control.failures, scan_log(broker.stderr, cases_path), alive, exit_code,
                  time.monotonic() - started, broker.stderr_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="number of cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--deadline", type=float, default=5.0,
                        help="seconds a control round trip may take")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the broker data, log and cases.jsonl go (kept)")
    parser.add_argument("--broker-arg", action="append", default=[],
                        help="an extra edge-broker argument (repeatable)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-broker-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = run_campaign(args.count, args.seed, workdir, workers=args.workers,
                          deadline_s=args.deadline, broker_args=tuple(args.broker_arg))
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
