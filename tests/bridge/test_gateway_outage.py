"""Issue 9, "Outage": the uplink is down for 30 s while devices publish 10,000 QoS 1 messages;
all arrive upstream, in order per topic, and JetStream stores no duplicate.

The real broker (a subprocess) with a `[[bridges]]` table, real nats-server / tansu. The uplink
goes down two ways: the server is stopped (JetStream only: tansu's memory storage forgets
everything when it stops), and a TCP proxy between the bridge and the server blackholes the
traffic (connections stay open, nothing comes back: the bridge must notice by its ack timeout).
The 30 s are the issue's; each test takes about 40 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from tests.bridge.gateway import (
    Device,
    Gateway,
    ThreadedProxy,
    assert_in_order_once,
    jetstream_bridge,
    kafka_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import HOST, NatsServer, Tansu
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

MESSAGES = 10_000
TOPICS = 10
OUTAGE_S = 30.0


def publish_during_outage(gateway: Gateway, outage_started: float) -> list[tuple[str, bytes]]:
    """10,000 QoS 1 messages over 10 topics, all acknowledged, then the rest of the 30 s."""
    device = Device(gateway.port)
    sent = []
    try:
        for n in range(MESSAGES):
            topic = f"sensors/d{n % TOPICS}/temp"
            payload = f"{n}".encode()
            device.publish(topic, payload)
            sent.append((topic, payload))
        device.wait_acked(MESSAGES)
    finally:
        device.close()
    assert sorted(device.acked) == sorted(sent)
    left = OUTAGE_S - (time.monotonic() - outage_started)
    assert left > 0, "publishing took longer than the outage"
    # The outage lasts its 30 s (polled, not slept: the gateway must stay up meanwhile).
    wait_until(lambda: time.monotonic() - outage_started >= OUTAGE_S or None, OUTAGE_S + 5,
               "the end of the outage")
    assert gateway.broker is not None and gateway.broker.process.poll() is None
    return sent


def test_jetstream_server_stopped_30s(nats_server: NatsServer, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url])).start()
    try:
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        nats_server.stop()
        outage = time.monotonic()
        sent = publish_during_outage(gateway, outage)
        status = gateway.status("central")
        assert not status["connected"]
        assert status["backlog_messages"] == MESSAGES
        nats_server.start()  # same port, same JetStream directory
        wait_until(lambda: stream_count(nats_server.url) >= MESSAGES, 60,
                   "the backlog upstream")
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 20,
                   "the backlog drained")
        rows = upstream(gateway.bridge_config("central"))
        assert len(rows) == MESSAGES  # JetStream: 0 duplicates stored
        assert_in_order_once(rows, sent, duplicates_allowed=False)
    finally:
        gateway.stop()


def test_jetstream_blackholed_30s(nats_server: NatsServer, tmp_path: Path) -> None:
    proxy = ThreadedProxy(HOST, nats_server.port)
    gateway = Gateway(tmp_path, jetstream_bridge([f"nats://{proxy.address}"])).start()
    try:
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        proxy.blackhole()
        outage = time.monotonic()
        sent = publish_during_outage(gateway, outage)
        proxy.forward()
        proxy.cut()  # the blackholed connections end; the bridge makes a new one
        wait_until(lambda: stream_count(nats_server.url) >= MESSAGES, 90,
                   "the backlog upstream")
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 20,
                   "the backlog drained")
        rows = upstream(gateway.bridge_config("central"))
        assert len(rows) == MESSAGES
        assert_in_order_once(rows, sent, duplicates_allowed=False)
    finally:
        gateway.stop()
        proxy.close()


def test_kafka_blackholed_30s(tmp_path: Path) -> None:
    pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")
    tansu = Tansu(tmp_path / "tansu")
    proxy = ThreadedProxy(HOST, tansu.port)
    tansu.advertised_port = proxy.port  # Kafka clients reconnect to the advertised address
    tansu.start()
    gateway = Gateway(tmp_path, kafka_bridge([proxy.address])).start()
    try:
        wait_until(lambda: gateway.status("lake")["connected"], 30, "bridge connected")
        proxy.blackhole()
        outage = time.monotonic()
        sent = publish_during_outage(gateway, outage)
        proxy.forward()
        proxy.cut()
        wait_until(lambda: gateway.status("lake")["backlog_messages"] == 0, 90,
                   "the backlog forwarded")
        rows = upstream(gateway.bridge_config("lake"))
        # Kafka may store a resend again (idempotence is off for tansu): consumers drop it
        # by edge-message-id; after that, every message once, in order per topic.
        assert_in_order_once(rows, sent, duplicates_allowed=True)
    finally:
        gateway.stop()
        proxy.close()
        tansu.stop()
