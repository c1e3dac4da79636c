"""Interference with the store of a running broker (issue 7, item 9), with real broker processes
(tests/integration/brokerprocess.py) and raw-socket MQTT clients:

- the store file (and its -wal/-shm) deleted while the broker runs: no acknowledgement of a new
  QoS 1/2 message after that (MQTT 5: PUBACK 0x97; 3.1.1: none), one error in the log naming
  the file, the broker keeps running and still delivers what it holds;
- the data directory's lock file removed: a second broker still cannot open the same store
  (exit code 2, "do not restart", naming the file), and the admin CLI neither reads the file
  as if no broker ran nor hangs.
"""

from __future__ import annotations

import time
from pathlib import Path

from edge_broker.mqtt.packets import Publish
from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_cli
from tests.integration.rawclient import (
    DISCONNECT,
    PINGREQ_BYTES,
    PINGRESP,
    PUBACK,
    RawClient,
    connect,
    subscriber,
)
from tests.integration.test_restart import persistent, receive

pytestmark = needs_console_script

QUOTA_EXCEEDED = 0x97
LOST = "was deleted or replaced while the broker runs"


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)  # polling interval, bounded by the deadline


def remove_store(data_dir: Path) -> None:
    for name in ("edge-broker.db", "edge-broker.db-wal", "edge-broker.db-shm"):
        (data_dir / name).unlink(missing_ok=True)


def not_acknowledged(client: RawClient, topic: str, payload: bytes) -> None:
    """Publish at QoS 1 (MQTT 5): the broker refuses it with 0x97, or closes the connection
    without a PUBACK; it never says 0x00 / 0x10 (stored)."""
    packet_id = client.publish(topic, payload, qos=1)
    try:
        packet = client.read(5.0)
    except EOFError:
        return
    assert packet is not None, "no answer at all"
    if packet.packet_type == DISCONNECT:
        return
    assert packet.packet_type == PUBACK and packet.packet_id == packet_id, packet
    assert packet.reason_code == QUOTA_EXCEEDED, packet


def test_deleting_the_store_file_stops_acknowledgements_and_is_logged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    broker = BrokerProcess(data_dir).wait_listening()
    try:
        keeper = subscriber(broker.port, "keeper", ("x/#", 1), version=4, **persistent(4))
        keeper.disconnect()
        pub5 = connect(broker.port, "pub5", version=5)
        pub4 = connect(broker.port, "pub4", version=4)
        for i in range(3):
            assert pub5.publish_acked("x/before", f"b{i}".encode()) == 0
        assert LOST not in broker.stderr

        remove_store(data_dir)
        # Right after the deletion: whether or not the broker noticed yet, no success.
        not_acknowledged(pub5, "x/right-after", b"r")
        wait_for(lambda: LOST in broker.stderr, 5.0, "the error in the log")

        pub5 = connect(broker.port, "pub5b", version=5)
        assert pub5.publish_acked("x/after", b"a") == QUOTA_EXCEEDED
        pub4.publish("x/after", b"a", qos=1)  # 3.1.1 has no refusal: no PUBACK
        pub4.ping()  # PINGRESP came first: the PUBLISH was handled, not acknowledged
        pub4.expect_nothing()

        # What the broker holds in memory is still delivered.
        keeper = connect(broker.port, "keeper", version=4, **persistent(4))
        assert keeper.connack.session_present
        assert [p.payload for p in receive(keeper, 3)] == [b"b0", b"b1", b"b2"]
        # "x/right-after" too if the broker took it before it noticed (its publisher got no
        # acknowledgement and sends it again: at least once). Nothing else.
        keeper.send(PINGREQ_BYTES)
        while (packet := keeper.read()) is not None and packet.packet_type != PINGRESP:
            assert isinstance(packet, Publish) and packet.payload == b"r", packet
            keeper.ack(PUBACK, packet.packet_id or 0)
        assert packet is not None

        log = broker.stderr
        assert log.count(LOST) == 1, log  # once, not per message
        assert str(data_dir / "edge-broker.db") in log, log
        assert "restart" in log and "Traceback" not in log, log
        stats = run_cli("store", "stats", "--data-dir", str(data_dir))
        assert stats.returncode == 0 and "DELETED OR REPLACED" in stats.stdout, stats
        assert broker.process.poll() is None  # still running
    finally:
        assert broker.stop() == 0, broker.stderr


def test_a_second_broker_cannot_open_the_store_when_the_lock_file_was_removed(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db = data_dir / "edge-broker.db"
    first = BrokerProcess(data_dir).wait_listening()
    try:
        (data_dir / "edge-broker.lock").unlink()
        second = BrokerProcess(data_dir)
        wait_for(lambda: second.process.poll() is not None or "listening on" in second.stderr,
                 15.0, "the second broker exits or listens")
        second.kill()
        assert second.process.returncode == 2, second.stderr  # RestartPreventExitStatus
        assert str(db) in second.stderr and "in use" in second.stderr, second.stderr

        # The first broker was not disturbed.
        sub = subscriber(first.port, "s", ("up/#", 1))
        publisher = connect(first.port, "p")
        assert publisher.publish_acked("up/t", b"ok") == 0
        assert sub.expect_publish().payload == b"ok"

        # The admin CLI: the lock file says nobody runs, the store file says otherwise. It
        # asks the broker over its socket ...
        stats = run_cli("store", "stats", "--data-dir", str(data_dir))
        assert stats.returncode == 0, stats.stderr
        assert "the broker running on" in stats.stdout, stats.stdout
        # ... and, with no socket either, fails clearly instead of reading the file.
        (data_dir / "admin.sock").unlink()
        # (run_cli raises TimeoutExpired should it hang)
        listing = run_cli("sessions", "list", "--data-dir", str(data_dir), timeout=20)
        assert listing.returncode == 2, listing
        assert str(db) in listing.stderr and "admin socket" in listing.stderr, listing.stderr
    finally:
        assert first.stop() == 0, first.stderr
    # With no broker running, the commands read the file again.
    stats = run_cli("store", "stats", "--data-dir", str(data_dir))
    assert stats.returncode == 0 and "no broker is running" in stats.stdout, stats
