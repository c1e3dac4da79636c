"""No client can stall the others (issue 7, items 2 and 3).

A control client does QoS 1 round trips to itself (PUBLISH -> PUBACK + the message back)
while other clients load the broker: a QoS 0 flood, 20 threads churning persistent sessions,
a takeover storm on one client id. Every round trip must be answered within a generous
deadline (ROUND_TRIP_S); on the code before the fix they stalled for seconds.

The broker runs as the real console script (`edge-broker`, with uvloop when installed, as in
production), with its default SQLite store, so its commits take the time they take on disk.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.integration.rawclient import (
    CONNACK,
    PUBACK,
    PUBLISH,
    RawClient,
    connect,
    connect_packet,
    disconnect_packet,
    publish_packet,
    subscriber,
)

pytestmark = needs_console_script

ROUND_TRIPS = 100
ROUND_TRIP_S = 2.0  # a generous bound: the unfixed broker exceeded it by far
LOAD_START_S = 30.0  # the load must have visibly started within this


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path / "data").wait_listening()
    yield broker
    broker.stop()
    assert "Traceback" not in broker.stderr, broker.stderr


def control_round_trips(port: int, count: int = ROUND_TRIPS) -> None:
    """`count` QoS 1 round trips, each answered (PUBACK and the message) within
    ROUND_TRIP_S."""
    control = subscriber(port, "control", ("ctl/t", 1))
    try:
        for i in range(count):
            payload = str(i).encode()
            packet_id = control.publish("ctl/t", payload, qos=1)
            got_ack = got_message = False
            deadline = time.monotonic() + ROUND_TRIP_S
            while not (got_ack and got_message):
                remaining = deadline - time.monotonic()
                packet = control.read(max(0.0, remaining))
                assert packet is not None, (
                    f"round trip {i} not answered within {ROUND_TRIP_S} s "
                    f"(ack={got_ack}, message={got_message})")
                if packet.packet_type == PUBACK:
                    assert packet.packet_id == packet_id
                    got_ack = True
                elif packet.packet_type == PUBLISH:
                    assert packet.payload == payload
                    got_message = True
                    if packet.packet_id is not None:
                        control.ack(PUBACK, packet.packet_id)
        control.disconnect()
    finally:
        control.close()


class Load:
    """Threads running `work(stop)` until stopped; `progress` counts what they achieved."""

    def __init__(self, work: Callable[[Load], None], threads: int) -> None:
        self.stop = threading.Event()
        self.progress = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(work,), daemon=True)
                         for _ in range(threads)]

    def _run(self, work: Callable[[Load], None]) -> None:
        try:
            work(self)
        except BaseException as error:  # reported by join()
            self.errors.append(error)

    def count(self, n: int = 1) -> None:
        with self._lock:
            self.progress += n

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait_started(self, at_least: int = 1) -> None:
        deadline = time.monotonic() + LOAD_START_S
        while self.progress < at_least:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the load did not start"
            self.stop.wait(0.01)  # polling interval, bounded by the deadline

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)


def flooding(port: int, client_id: str, block: bytes,
             version: int = 4) -> Callable[[Load], None]:
    """A `Load` work: one client sending `block` again and again, as fast as it is read."""
    def flood(load: Load) -> None:
        client = connect(port, client_id, version=version)
        try:
            while not load.stop.is_set():
                client.sock.settimeout(1.0)
                with contextlib.suppress(TimeoutError):
                    client.sock.sendall(block)
                    load.count()
        finally:
            client.close()
    return flood


def test_qos0_flood_does_not_starve_a_control_client(broker_process: BrokerProcess) -> None:
    port = broker_process.port
    block = publish_packet("flood/x", b"x" * 16) * 4096  # about 90 KB of QoS 0 PUBLISH
    with Load(flooding(port, "flooder", block), threads=1) as load:
        load.wait_started(at_least=20)
        control_round_trips(port)
        assert load.progress > 20  # the flood ran all along
    assert not load.errors, load.errors


def test_persistent_session_churn_does_not_stall_a_control_client(
        broker_process: BrokerProcess) -> None:
    port = broker_process.port

    def churn(load: Load) -> None:
        name = threading.current_thread().name
        while not load.stop.is_set():
            client = connect(port, f"churn-{name}", clean=False)
            client.send(disconnect_packet())
            client.close()
            load.count()

    with Load(churn, threads=20) as load:
        load.wait_started(at_least=20)
        control_round_trips(port)
        churned = load.progress
    assert not load.errors, load.errors
    assert churned > 20


def test_session_takeover_storm_makes_progress(broker_process: BrokerProcess) -> None:
    """Many connections CONNECT with one persistent client id, each taking the session over
    from the previous one: the broker must keep answering them (CONNACKs keep coming)."""
    port = broker_process.port

    def storm(load: Load) -> None:
        while not load.stop.is_set():
            client = RawClient(port, 4)
            try:
                client.send(connect_packet("storm", clean=False))
                with contextlib.suppress(EOFError, OSError):
                    packet = client.read(2.0)
                    if packet is not None and packet.packet_type == CONNACK:
                        load.count()
            finally:
                client.close()

    with Load(storm, threads=20) as load:
        load.wait_started(at_least=10)
        seen = load.progress
        control_round_trips(port)
        # The storm kept being answered while the control client ran.
        deadline = time.monotonic() + 10.0
        while load.progress < seen + 50:
            assert time.monotonic() < deadline, (
                f"only {load.progress - seen} CONNACKs in 10 s of takeover storm")
            load.stop.wait(0.05)  # polling interval, bounded by the deadline
    assert not load.errors, load.errors
