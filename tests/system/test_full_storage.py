"""Full storage: the store reaches `[storage] max_store_bytes`, or the disk under the data
directory fills up.

What a gateway operator relies on (docs/configuration.md, `max_store_bytes`): new QoS 1/2
messages are refused - MQTT 5 publishers get PUBACK/PUBREC 0x97 (Quota exceeded), 3.1.1
publishers get no acknowledgement and send again later - while QoS 0 traffic and deliveries go
on; nothing that was acknowledged is lost; it clears by itself once queues drain or space
returns; and the file is never damaged (a restart opens it without --recover).

Brokers run in-process (tests/conftest.py) with raw-socket clients. The real-disk test mounts a
tmpfs (root only). The store reports a disk with less than 8 MiB free as full
(`DISK_RESERVE_BYTES`, not configurable), so that tmpfs is 24 MiB, mostly taken by a filler
file: a smaller disk would be "full" from the start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_broker.config import Config
from edge_broker.mqtt.packets import Publish
from edge_broker.store.sqlite import DISK_RESERVE_BYTES
from tests.conftest import BrokerThread, broker_config
from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.integration.rawclient import (
    PINGREQ_BYTES,
    PINGRESP,
    PUBACK,
    PUBREC,
    RawClient,
    connect,
    disconnect_packet,
    props,
    subscriber,
    unique_id,
)

MakeBroker = Callable[..., BrokerThread]
QUOTA_EXCEEDED = 0x97
DISK_MIB = 24
PUBLISH_LIMIT = 2000  # a bound on the filling loops, far above what fills the store


def storage_config(tmp_path: Path, data_dir: Path | None = None,
                   mqtt: dict[str, Any] | None = None, **storage: Any) -> Config:
    base = broker_config(tmp_path, **(mqtt or {}))
    return dataclasses.replace(
        base,
        broker=dataclasses.replace(base.broker, data_dir=data_dir or base.broker.data_dir),
        storage=dataclasses.replace(base.storage, **storage))


def persistent_v5() -> dict[str, Any]:
    return {"clean": False, "properties": props(session_expiry_interval=600)}


def receive(client: RawClient, count: int, timeout: float = 15.0) -> list[bytes]:
    """Receive `count` QoS 1 messages, acknowledging each; returns their payloads."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        packet = client.read(max(0.0, deadline - time.monotonic()))
        assert packet is not None, f"received {len(got)} of {count} messages in {timeout} s"
        assert isinstance(packet, Publish) and packet.qos == 1, packet
        got.append(packet.payload)
        client.ack(PUBACK, packet.packet_id or 0)
    return got


def v311_publish(client: RawClient, topic: str, payload: bytes, *, packet_id: int | None = None,
                 dup: bool = False) -> bool:
    """QoS 1 PUBLISH then PINGREQ: True if a PUBACK came before the PINGRESP (accepted),
    False if only the PINGRESP came (refused without an acknowledgement)."""
    packet_id = client.publish(topic, payload, qos=1, packet_id=packet_id, dup=dup)
    client.send(PINGREQ_BYTES)
    packet = client.read()
    assert packet is not None, "neither PUBACK nor PINGRESP"
    if packet.packet_type == PINGRESP:
        return False
    assert packet.packet_type == PUBACK and packet.packet_id == packet_id, packet
    client.expect(PINGRESP)
    return True


class Traffic:
    """The clients of a full-storage scenario.

    - `slow`: an MQTT 5 persistent session subscribed to fill/# at QoS 1, offline while the
      store fills (its queue is what fills it);
    - `v5` and `v311`: QoS 1 publishers on fill/...;
    - `talker` -> `listener`: QoS 0 traffic on live/# between two clean sessions.
    """

    def __init__(self, broker: BrokerThread) -> None:
        self.slow_id = unique_id("slow")
        slow = subscriber(broker.port, self.slow_id, ("fill/#", 1), version=5,
                          **persistent_v5())
        slow.disconnect()
        self.listener = subscriber(broker.port, unique_id("listener"), ("live/#", 0), version=5)
        self.talker = connect(broker.port, unique_id("talker"), version=4)
        self.v5 = connect(broker.port, unique_id("pub5"), version=5)
        self.v311 = connect(broker.port, unique_id("pub311"), version=4)
        self.acked: list[bytes] = []  # payloads acknowledged, in the order the broker took them
        self.refused_v311: tuple[int, bytes] | None = None  # (packet id, payload)
        self._n = 0

    def payload(self, who: str, size: int) -> bytes:
        self._n += 1
        head = f"{who}:{self._n}:".encode()
        return head + b"x" * (size - len(head))

    def fill(self, size: int, *, full_already: bool = False) -> None:
        """Both publishers send QoS 1 until each has been refused once."""
        v5_refused = False
        for _ in range(PUBLISH_LIMIT):
            if not v5_refused:
                payload = self.payload("v5", size)
                reason = self.v5.publish_acked("fill/v5", payload, qos=1)
                if reason == 0:
                    self.acked.append(payload)
                else:
                    assert reason == QUOTA_EXCEEDED, hex(reason)
                    v5_refused = True
            if self.refused_v311 is None:
                payload = self.payload("v311", size)
                packet_id = self.v311.next_id()
                if v311_publish(self.v311, "fill/v311", payload, packet_id=packet_id):
                    self.acked.append(payload)
                else:
                    self.refused_v311 = (packet_id, payload)
            if v5_refused and self.refused_v311 is not None:
                break
        else:
            pytest.fail(f"the store never reported full after {PUBLISH_LIMIT} messages")
        if full_already:
            assert self.acked == [], "accepted while the disk is full"
        else:
            assert self.acked, "refused before anything was stored"

    def assert_refusing_and_serving(self) -> None:
        """While full: QoS 1 and 2 refused, QoS 0 flows, the connections stay up."""
        assert self.v5.publish_acked("fill/v5", b"refused", qos=1) == QUOTA_EXCEEDED
        packet_id = self.v5.publish("fill/v5", b"refused too", qos=2)
        rec = self.v5.expect(PUBREC)  # 0x97 on PUBREC ends the flow, 4.3.3 (5.0)
        assert (rec.packet_id, rec.reason_code) == (packet_id, QUOTA_EXCEEDED)
        assert not v311_publish(self.v311, "fill/v311", b"refused", packet_id=self.v311.next_id())
        for i in range(20):
            self.talker.publish("live/t", b"qos0-%d" % i)
            self.v5.publish("live/v5", b"v5-qos0-%d" % i)
        got = [self.listener.expect_publish() for _ in range(40)]
        assert sorted(p.payload for p in got) == sorted(
            [b"qos0-%d" % i for i in range(20)] + [b"v5-qos0-%d" % i for i in range(20)])
        for client in (self.v5, self.v311, self.talker, self.listener):
            client.ping()

    def wait_accepting(self, broker: BrokerThread, timeout: float = 10.0) -> None:
        """Poll with v5 QoS 1 messages until one is accepted: the broker resumes by itself.
        Refused attempts are not queued; the accepted one is."""
        deadline = time.monotonic() + timeout
        while True:
            payload = self.payload("v5", 100)
            reason = self.v5.publish_acked("fill/v5", payload, qos=1)
            if reason == 0:
                self.acked.append(payload)
                break
            assert reason == QUOTA_EXCEEDED, hex(reason)
            assert time.monotonic() < deadline, (
                f"still refusing QoS 1 {timeout} s after space returned: "
                f"{broker.call(lambda: broker.app.store.full if broker.app else None)}")
            time.sleep(0.05)  # polling interval, bounded by the deadline
        # The 3.1.1 publisher sends its refused message again (DUP): accepted now.
        assert self.refused_v311 is not None
        packet_id, payload = self.refused_v311
        assert v311_publish(self.v311, "fill/v311", payload, packet_id=packet_id, dup=True)
        self.acked.append(payload)


def store_used(broker: BrokerThread) -> int:
    used: int = broker.call(lambda: broker.app.store.used_bytes if broker.app else 0)
    return used


def test_max_store_bytes_refuses_qos1_keeps_qos0_and_resumes_after_draining(
        tmp_path: Path, make_broker: MakeBroker) -> None:
    budget = 256 * 1024
    # drop-newest: the offline session's backlog does not give way to the store budget
    # (drop-oldest would: test_store_budget.py), so nothing can and QoS 1/2 is refused.
    broker = make_broker(config=storage_config(tmp_path, max_store_bytes=budget,
                                               mqtt={"queue_full_policy": "drop-newest"}))
    traffic = Traffic(broker)
    empty = store_used(broker)  # the schema's pages: the budget's fixed part
    traffic.fill(2048)
    # Refused only when really full, and after a fair share of 2 KiB messages: a row that
    # size (with its index entry) takes at most a 4 KiB page, so at least half the free
    # budget held messages.
    assert store_used(broker) >= budget
    assert len(traffic.acked) >= (budget - empty) // (2 * 2048)
    traffic.assert_refusing_and_serving()

    # The subscriber drains its queue: every acknowledged message, in order, nothing refused.
    slow = connect(broker.port, traffic.slow_id, version=5, **persistent_v5())
    assert slow.connack.session_present
    assert receive(slow, len(traffic.acked)) == traffic.acked
    slow.ping()
    slow.expect_nothing()

    # Room again, without any intervention; the resumed messages reach the subscriber.
    before = len(traffic.acked)
    traffic.wait_accepting(broker)
    assert receive(slow, len(traffic.acked) - before) == traffic.acked[before:]
    slow.ping()
    slow.expect_nothing()


# -- a real, small disk ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A DISK_MIB MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0700",
                             "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs (mount: {result.stderr.strip()})")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill_disk(filler: Path) -> None:
    """Append to `filler` until the disk says ENOSPC."""
    with open(filler, "ab", buffering=0) as out:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            chunk = b"\xa5" * size
            while True:
                try:
                    out.write(chunk)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
    assert free_bytes(filler.parent) < 4096


# The subscriber's inflight window against its backlog (about 20 messages of 64 KiB fit before
# the disk is reported full): smaller, it resumes and leaves while still reading its backlog;
# larger, the whole backlog is sent at once, so its cursor catches up while the messages are
# in flight. In that second case the session used to go live at once, copying the body of every
# message in flight into `messages` in one transaction (1.3 MB, more than the ballast file
# can cover together with the checkpoint that must follow): every later commit then failed on
# the full disk and its DISCONNECT was never answered (now it waits for acknowledgements
# until that copy is small: core/backlog.py, the seam). The default window (20) is on one side
# or the other depending on a few KiB of schema (the WAL frames of a migration).
WINDOWS = {"backlog-beyond-the-window": 5, "whole-backlog-in-flight": PUBLISH_LIMIT}


@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
def test_a_full_disk_refuses_qos1_keeps_serving_and_loses_nothing(
        tmp_path: Path, small_disk: Path, make_broker: MakeBroker, window: int) -> None:
    data_dir = small_disk / "data"
    filler = small_disk / "filler"
    config = storage_config(tmp_path, data_dir=data_dir,
                            mqtt={"max_inflight_messages": window})
    brokers: list[BrokerThread] = []
    try:
        broker = make_broker(config=config)
        brokers.append(broker)
        traffic = Traffic(broker)
        # Leave a little more than the reserve free: the broker's queue takes the rest.
        with open(filler, "wb") as out:
            os.posix_fallocate(out.fileno(), 0,
                               free_bytes(small_disk) - DISK_RESERVE_BYTES - 2 * 1024 * 1024)
        traffic.fill(64 * 1024)
        traffic.assert_refusing_and_serving()

        # Now the disk is completely full: the broker must still commit what drains it (the
        # subscriber's session and acknowledgements), helped by its ballast file.
        fill_disk(filler)
        traffic.assert_refusing_and_serving()
        slow = connect(broker.port, traffic.slow_id, version=5, **persistent_v5())
        assert slow.connack.session_present
        half = len(traffic.acked) // 2
        assert receive(slow, half) == traffic.acked[:half]
        # It leaves with more messages in flight (sent, not acknowledged): resent later.
        slow.send(disconnect_packet())
        assert slow.is_closed(5.0)
        slow.close()
        traffic.assert_refusing_and_serving()

        # Space returns: the broker accepts QoS 1 again by itself.
        filler.unlink()
        traffic.wait_accepting(broker)
        for client in (traffic.v5, traffic.v311, traffic.talker, traffic.listener):
            client.disconnect()

        # A restart opens the store as it is (no --recover needed) and the subscriber gets
        # the rest: every acknowledged message once, in order; none of the refused ones.
        broker.stop()
        assert not list(data_dir.glob("*.corrupt-*"))
        with contextlib.closing(sqlite3.connect(data_dir / "edge-broker.db")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        broker = make_broker(config=config)
        brokers.append(broker)
        slow = connect(broker.port, traffic.slow_id, version=5, **persistent_v5())
        assert slow.connack.session_present
        rest = traffic.acked[half:]
        assert receive(slow, len(rest)) == rest
        slow.ping()
        slow.expect_nothing()
    finally:
        for started in brokers:
            started.stop()  # before the tmpfs is unmounted


def test_a_disk_filled_by_its_own_queue_accepts_again_once_the_queue_is_taken(
        tmp_path: Path, small_disk: Path, make_broker: MakeBroker) -> None:
    """Nothing else on the disk: the broker's queue fills it, then the subscriber takes the
    queue. The log's rows are deleted by retention in steps of up to 2,000 rows: those
    deletions must fit in the reserve (a build of SQLite that zeroes freed pages, as
    Debian's does, wrote every deleted byte to the WAL first and never got out)."""
    config = storage_config(tmp_path, data_dir=small_disk / "data")
    broker = make_broker(config=config)
    try:
        traffic = Traffic(broker)
        traffic.fill(8 * 1024)
        traffic.assert_refusing_and_serving()
        slow = connect(broker.port, traffic.slow_id, version=5, **persistent_v5())
        assert receive(slow, len(traffic.acked)) == traffic.acked
        slow.ping()
        traffic.wait_accepting(broker, timeout=30.0)
    finally:
        broker.stop()  # before the tmpfs is unmounted


def _queue_for_offline_subscriber(broker: BrokerThread, count: int) -> tuple[str, list[bytes]]:
    """A 3.1.1 persistent session with `count` acknowledged QoS 1 messages queued."""
    slow_id = unique_id("slow")
    subscriber(broker.port, slow_id, ("q/#", 1), clean=False).disconnect()
    publisher = connect(broker.port, unique_id("pub"), version=5)
    payloads = [b"queued-%d" % i for i in range(count)]
    for payload in payloads:
        assert publisher.publish_acked("q/t", payload, qos=1) == 0
    publisher.disconnect()
    return slow_id, payloads


def test_the_broker_starts_on_a_full_disk_and_serves(
        tmp_path: Path, small_disk: Path, make_broker: MakeBroker) -> None:
    """Another program filled the disk and the broker restarts (systemd, a power cut): it
    must start (its ballast file makes the room SQLite needs to open the store), serve QoS 0
    and its queued messages, refuse new QoS 1, and resume by itself once space returns."""
    data_dir = small_disk / "data"
    filler = small_disk / "filler"
    config = storage_config(tmp_path, data_dir=data_dir)
    brokers: list[BrokerThread] = []
    try:
        broker = make_broker(config=config)
        brokers.append(broker)
        slow_id, queued = _queue_for_offline_subscriber(broker, 10)
        broker.stop()
        fill_disk(filler)

        broker = make_broker(config=config)
        brokers.append(broker)
        traffic = Traffic(broker)
        traffic.fill(100, full_already=True)
        traffic.assert_refusing_and_serving()
        slow = connect(broker.port, slow_id, clean=False)
        assert slow.connack.session_present
        assert receive(slow, len(queued)) == queued
        slow.ping()
        slow.expect_nothing()

        filler.unlink()
        traffic.wait_accepting(broker)
    finally:
        for started in brokers:
            started.stop()


@needs_console_script
def test_recover_does_not_move_a_sound_store_aside_because_the_disk_is_full(
        tmp_path: Path, small_disk: Path, make_broker: MakeBroker) -> None:
    """A store that cannot be opened because the disk is full (its ballast already used up)
    is not damaged: the broker says the disk is full and leaves the file alone, also with
    --recover (which would otherwise start empty, forgetting every session)."""
    data_dir = small_disk / "data"
    filler = small_disk / "filler"
    config = storage_config(tmp_path, data_dir=data_dir)
    broker = make_broker(config=config)
    try:
        slow_id, queued = _queue_for_offline_subscriber(broker, 3)
    finally:
        broker.stop()
    (data_dir / "edge-broker.db.ballast").unlink()  # used up earlier
    fill_disk(filler)
    db = data_dir / "edge-broker.db"
    before = db.read_bytes()

    for args in ((), ("--recover",)):
        refused = BrokerProcess(data_dir, *args, log_dir=tmp_path)
        assert refused.wait_exit() != 0, refused.stderr
        assert "disk is full" in refused.stderr and str(db) in refused.stderr, refused.stderr
        assert not list(data_dir.glob("*.corrupt-*")), refused.stderr
        assert db.read_bytes() == before

    filler.unlink()
    broker = BrokerProcess(data_dir, log_dir=tmp_path).wait_listening()
    try:
        slow = connect(broker.port, slow_id, clean=False)
        assert slow.connack.session_present
        assert receive(slow, len(queued)) == queued
    finally:
        assert broker.stop() == 0, broker.stderr
