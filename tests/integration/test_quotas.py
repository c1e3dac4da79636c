"""Publish quotas ([quotas], Kafka-style throttling) and connection limits, on a real broker.

A client over its quota is slowed by the broker not reading its socket: it is never
disconnected and loses nothing, and other clients keep their latency. The rate a subscriber
sees is the measure (the bound is the configured quota, not a speed of this machine).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_broker.config import QuotasConfig, UserQuota
from tests.conftest import BrokerThread
from tests.integration.authsetup import auth_broker_factory
from tests.integration.rawclient import RawClient, connect, unique_id

QUOTA = 20.0  # messages per second for everybody but bob
SENT = 220  # 11 s of quota, sent at 10x the quota


@pytest.fixture
def make_auth_broker(make_broker: Callable[..., BrokerThread],
                     tmp_path: Path) -> Callable[..., BrokerThread]:
    return auth_broker_factory(make_broker, tmp_path)


def quotas(**values: Any) -> QuotasConfig:
    return QuotasConfig(users=(UserQuota("bob", publish_msgs_per_s=0),), **values)


class Recorder:
    """A paho subscriber recording (arrival time, topic, payload)."""

    def __init__(self, broker: BrokerThread, user: str, password: str, topic: str) -> None:
        self.arrivals: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique_id(user),
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(user, password)
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect(broker.host, broker.port, keepalive=60)
        self.client.loop_start()
        assert connected.wait(10)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(topic, 1)
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        self.arrivals.put((time.monotonic(), message.topic, message.payload))

    def _on_disconnect(self, *args: object) -> None:
        self.disconnected.set()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_client_at_10x_its_quota_is_held_to_it_without_loss_or_disconnect(
        make_auth_broker: Callable[..., BrokerThread]) -> None:
    broker = make_auth_broker(quotas=quotas(publish_msgs_per_s=QUOTA))
    recorder = Recorder(broker, "ops", "ops pw ü", "load/#")
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fast",
                            protocol=mqtt.MQTTv5)
    publisher.username_pw_set("alice", "alice-pw")
    publisher.max_inflight_messages_set(SENT)
    publisher.max_queued_messages_set(0)
    dropped = threading.Event()
    publisher.on_disconnect = lambda *args: dropped.set()
    publisher.connect(broker.host, broker.port, keepalive=30)
    publisher.loop_start()
    control = connect(broker.port, "control", username="bob", password=b"bob-pw")
    assert control.subscribe(("echo", 0)) == (0,)
    try:
        # 10x the quota: one message every 1/(10 * QUOTA) s, paced by the clock.
        started = time.monotonic()
        infos = []
        for index in range(SENT):
            infos.append(publisher.publish("load/x", str(index).encode(), qos=1))
            wait = started + (index + 1) / (10 * QUOTA) - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the load generator, not synchronising
        # While the publisher is held back, an unthrottled client keeps its latency.
        worst = 0.0
        while recorder.arrivals.qsize() < SENT * 0.8:
            began = time.monotonic()
            control.publish_acked("echo", b"ping", qos=1)
            assert control.expect_publish().topic == "echo"
            worst = max(worst, time.monotonic() - began)
        assert worst < 1.0, f"a round trip took {worst:.2f} s"
        arrivals = [recorder.arrivals.get(timeout=30) for _ in range(SENT)]
        for info in infos:
            info.wait_for_publish(timeout=30)
        assert all(info.is_published() for info in infos)
    finally:
        publisher.loop_stop()
        recorder.stop()
    assert not dropped.is_set(), "the throttled client was disconnected"
    assert [int(payload) for _, _, payload in arrivals] == list(range(SENT))  # nothing lost
    first = arrivals[0][0]
    in_window = sum(1 for when, _, _ in arrivals if when - first < 10.0)
    assert abs(in_window - 10 * QUOTA) <= 0.1 * 10 * QUOTA, in_window
    throttled = broker.call(lambda: broker.app.metrics.throttled_s)
    assert throttled > 5.0


def test_a_bytes_quota_holds_the_byte_rate(make_auth_broker: Callable[..., BrokerThread]) -> None:
    broker = make_auth_broker(quotas=quotas(publish_bytes_per_s=4000))
    watcher = connect(broker.port, "watch", username="ops", password="ops pw ü".encode())
    assert watcher.subscribe(("bulk", 0)) == (0,)
    sender = connect(broker.port, "bulk", username="alice", password=b"alice-pw")
    started = time.monotonic()
    for _ in range(10):
        sender.publish("bulk", b"b" * 996)  # 1,000 bytes with the topic: 10,000 in all
    for _ in range(10):
        assert len(watcher.expect_publish(timeout=20).payload) == 996
    # 10,000 bytes at 4,000 bytes/s: at least 2 s (the first 400 bytes of credit aside).
    assert time.monotonic() - started >= 2.0
    sender.ping()


def test_a_throttled_client_keeps_its_connection_beyond_its_keep_alive(
        make_auth_broker: Callable[..., BrokerThread]) -> None:
    # Each message costs 6 s of a 300 bytes/s quota, keep alive 2 s (the broker allows 3 s):
    # the pauses are capped at half the keep alive and the keep-alive timer is suspended
    # while the client is held, so it is neither timed out nor left without a PINGRESP.
    broker = make_auth_broker(quotas=quotas(publish_bytes_per_s=300))
    watcher = connect(broker.port, "watch", username="ops", password="ops pw ü".encode())
    assert watcher.subscribe(("slow", 0)) == (0,)
    sender = connect(broker.port, "slow", version=5, keepalive=2, username="alice",
                     password=b"alice-pw")
    for _ in range(3):
        sender.publish("slow", b"s" * 1796)
    for _ in range(3):
        watcher.expect_publish(timeout=20)
    sender.ping()  # still connected


def test_connection_limits_per_address_refuse_and_count(
        make_auth_broker: Callable[..., BrokerThread]) -> None:
    broker = make_auth_broker(quotas=quotas(max_connections_per_address=3))
    open_ = [connect(broker.port, unique_id(), username="bob", password=b"bob-pw")
             for _ in range(3)]
    extra = RawClient(broker.port, 4)
    extra.expect_closed()
    assert broker.call(lambda: broker.app.metrics.connections_refused) == 1
    open_[0].disconnect()
    # Room again once one has gone (the broker counts it when the socket closes).
    deadline = time.monotonic() + 10
    while True:
        client = RawClient(broker.port, 4)
        if not client.is_closed(0.2):
            break
        assert time.monotonic() < deadline, "never accepted again"
    for other in open_[1:]:
        other.ping()
