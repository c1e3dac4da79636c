"""MqttUpstream (our Connection in the client role) against a real mosquitto."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_broker.bridge.base import BridgeMessage, DownlinkMessage
from edge_broker.bridge.config import BridgeConfig, parse_bridges
from edge_broker.bridge.mqtt_upstream import MqttUpstream
from edge_broker.errors import BridgeError
from tests.bridge.proxy import TcpProxy
from tests.bridge.servers import Mosquitto, free_port

STATE = "edge-broker/gw7/bridges/up/state"


def bridge_config(*servers: str, topics: list[str] | None = None, **extra: Any) -> BridgeConfig:
    table = {"name": "up", "kind": "mqtt", "servers": list(servers),
             "topics": topics or ['sensors/# out 1 "" site1/gw7/',
                                  'cmd/# in 2 "" site1/gw7/'], **extra}
    (config,) = parse_bridges([table], file="test.toml", gateway_id="gw7")
    return config


class Remote:
    """A paho client on the upstream broker, standing for the cloud side."""

    def __init__(self, port: int, client_id: str = "cloud") -> None:
        self.received: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append(message)
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic_filter, qos)
        assert done.wait(10)

    def publish(self, topic: str, payload: bytes, qos: int = 2) -> None:
        self.client.publish(topic, payload, qos).wait_for_publish(10)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"got {len(self.received)} of {count} messages"
                self._cond.wait(left)
            return list(self.received)

    async def until(self, count: int, timeout: float = 20.0) -> list[mqtt.MQTTMessage]:
        """`wait_for` without blocking the event loop (the bridge runs in it)."""
        return await asyncio.to_thread(self.wait_for, count, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def messages(first: int, count: int, topic: str = "sensors/t1", qos: int = 1
             ) -> list[BridgeMessage]:
    return [BridgeMessage(offset=o, topic=topic, payload=f"m{o}".encode(), qos=qos,
                          user_properties=(("offset", str(o)),))
            for o in range(first, first + count)]


async def send_all(upstream: MqttUpstream, batch: list[BridgeMessage]) -> None:
    cursor = 0
    while cursor < len(batch):
        cursor += await upstream.send(batch[cursor:])


async def test_uplink_window_maps_topics_and_keeps_order(mosquitto: Mosquitto) -> None:
    remote = Remote(mosquitto.port)
    remote.subscribe("site1/#", qos=1)
    upstream = MqttUpstream(bridge_config(f"mqtt://127.0.0.1:{mosquitto.port}"))
    await upstream.start()
    try:
        batch = [*messages(1, 500), BridgeMessage(offset=501, topic="other/x", payload=b"")]
        await send_all(upstream, batch)
        assert upstream.unmapped == 1
        got = await remote.until(500)
    finally:
        await upstream.close()
        remote.close()
    assert [m.payload for m in got] == [f"m{o}".encode() for o in range(1, 501)]
    assert {m.topic for m in got} == {"site1/gw7/sensors/t1"}
    assert got[0].properties.UserProperty == [("offset", "1")]  # v5 properties go up too


async def test_state_topic_is_retained_and_the_will_reports_a_lost_link(
        mosquitto: Mosquitto) -> None:
    upstream = MqttUpstream(bridge_config(f"mqtt://127.0.0.1:{mosquitto.port}"))
    await upstream.start()
    remote = Remote(mosquitto.port)
    try:
        remote.subscribe(STATE)
        (up,) = await remote.until(1)
        assert (up.payload, up.retain) == (b"1", True)
        upstream.abort()  # no DISCONNECT: the broker publishes the will
        states = await remote.until(2)
        assert states[1].payload == b"0"
    finally:
        remote.close()


async def test_downlink_queued_while_away_arrives_once_after_reconnect(
        mosquitto: Mosquitto) -> None:
    released: list[int] = []
    config = bridge_config(f"mqtt://127.0.0.1:{mosquitto.port}")
    upstream = MqttUpstream(config, on_release=released.append)
    await upstream.start()  # subscribes at QoS 2; the session outlives the connection
    await upstream.close()
    remote = Remote(mosquitto.port)
    for i in range(3):
        remote.publish(f"site1/gw7/cmd/valve{i}", f"open{i}".encode(), qos=2)
    remote.close()

    upstream = MqttUpstream(config, on_release=released.append)
    await upstream.start()
    assert upstream.session_present
    got: list[DownlinkMessage] = []

    async def take() -> None:
        async for message in upstream.messages():
            got.append(message)
            await upstream.ack(message)  # after the local commit
            if len(got) == 3:
                return

    try:
        await asyncio.wait_for(take(), 20)
        # PUBREL released each QoS 2 identifier: the exchange is complete.
        deadline = time.monotonic() + 10
        while len(released) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await upstream.close()
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        (f"cmd/valve{i}", f"open{i}".encode(), 2) for i in range(3)]
    assert sorted(released) == sorted(m.position for m in got)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_both_direction_line_does_not_loop(mosquitto: Mosquitto, version: str) -> None:
    """v5: No Local on the downlink subscription; 3.1.1: mosquitto's bridge marker."""
    config = bridge_config(f"mqtt://127.0.0.1:{mosquitto.port}", mqtt_version=version,
                           topics=['cfg/# both 1 "" site1/gw7/'])
    upstream = MqttUpstream(config)
    await upstream.start()
    remote = Remote(mosquitto.port)
    try:
        await send_all(upstream, messages(1, 5, topic="cfg/a"))
        remote.publish("site1/gw7/cfg/b", b"from the cloud", qos=1)
        message = await asyncio.wait_for(upstream.messages().__anext__(), 10)
        assert (message.topic, message.payload) == ("cfg/b", b"from the cloud")
        assert upstream._downlink.empty()  # our own five did not come back
    finally:
        await upstream.close()
        remote.close()


async def test_servers_are_tried_in_turn(mosquitto: Mosquitto) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    upstream = MqttUpstream(bridge_config(dead, f"mqtt://127.0.0.1:{mosquitto.port}"))
    await upstream.start()
    assert upstream.connected
    await upstream.close()
    with pytest.raises(BridgeError, match="no upstream accepted"):
        await MqttUpstream(bridge_config(dead)).start()


async def test_blackholed_link_resumes_the_session_and_loses_nothing(
        mosquitto: Mosquitto) -> None:
    proxy = await TcpProxy("127.0.0.1", mosquitto.port).start()
    remote = Remote(mosquitto.port)
    remote.subscribe("site1/#", qos=2)
    upstream = MqttUpstream(bridge_config(f"mqtt://{proxy.address}",
                                          topics=['sensors/# out 2 "" site1/gw7/']),
                            ack_timeout=1.0)
    try:
        await upstream.start()
        await send_all(upstream, messages(1, 100, qos=2))
        proxy.blackhole()
        with pytest.raises(BridgeError, match="no acknowledgement"):
            await upstream.send(messages(101, 100, qos=2))
        upstream.abort()  # the bridge gives up on the stalled connection
        proxy.cut()
        proxy.forward()
        await upstream.start()  # resumes the session, resends in-flight with DUP
        await send_all(upstream, messages(101, 200, qos=2))
        got = await remote.until(300)
    finally:
        await upstream.close()
        await proxy.close()
        remote.close()
    # QoS 2 end to end: every message exactly once, in order.
    assert [m.payload for m in got][:300] == [f"m{o}".encode() for o in range(1, 301)]


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_a_second_edge_broker_as_upstream(broker: Any, version: str) -> None:
    """Our own broker upstream. On 3.1.1 it refuses mosquitto's bridge marker
    (try_private), and the bridge connects again without it."""
    config = bridge_config(f"mqtt://127.0.0.1:{broker.port}", mqtt_version=version,
                           topics=['sensors/# out 1 "" site1/gw7/',
                                   'cmd/# in 2 "" site1/gw7/'])
    upstream = MqttUpstream(config)
    await upstream.start()
    remote = Remote(broker.port)
    try:
        remote.subscribe("site1/gw7/sensors/#", qos=1)
        await send_all(upstream, messages(1, 200))
        got = await remote.until(200)
        assert [m.payload for m in got] == [f"m{o}".encode() for o in range(1, 201)]
        remote.publish("site1/gw7/cmd/reboot", b"now", qos=2)
        message = await asyncio.wait_for(upstream.messages().__anext__(), 10)
        assert (message.topic, message.payload, message.qos) == ("cmd/reboot", b"now", 2)
        await upstream.ack(message)
    finally:
        await upstream.close()
        remote.close()


async def test_remote_limits_are_respected(tmp_path: Any) -> None:
    """Maximum QoS 1 and Maximum Packet Size 300 from the remote's CONNACK (5.0): a QoS 2
    message goes at QoS 1, one too large is counted and skipped, not an endless retry."""
    server = Mosquitto(tmp_path / "mosquitto", extra_config="max_qos 1\nmax_packet_size 300\n")
    server.start()
    remote = Remote(server.port)
    try:
        remote.subscribe("site1/#", qos=2)
        upstream = MqttUpstream(bridge_config(f"mqtt://127.0.0.1:{server.port}",
                                              topics=['sensors/# out 2 "" site1/gw7/']))
        await upstream.start()
        batch = [BridgeMessage(offset=1, topic="sensors/a", payload=b"small", qos=2),
                 BridgeMessage(offset=2, topic="sensors/a", payload=b"x" * 1000, qos=2),
                 BridgeMessage(offset=3, topic="sensors/a", payload=b"after", qos=1)]
        assert await upstream.send(batch) == 3
        assert upstream.oversize == 1
        got = await remote.until(2)
        await upstream.close()
    finally:
        remote.close()
        server.stop()
    assert [(m.payload, m.qos) for m in got] == [(b"small", 1), (b"after", 1)]


async def test_keep_alive_drops_a_silent_link(mosquitto: Mosquitto) -> None:
    """Nothing to send and the link blackholed: PINGREQ gets no answer, and after 1.5 x the
    keep alive the bridge drops the connection, so its owner reconnects."""
    proxy = await TcpProxy("127.0.0.1", mosquitto.port).start()
    upstream = MqttUpstream(bridge_config(f"mqtt://{proxy.address}", keepalive=1))
    try:
        await upstream.start()
        proxy.blackhole()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while upstream.connected:
            assert loop.time() < deadline, "still connected"
            await asyncio.sleep(0.05)
        assert "no packet from the upstream" in (upstream.last_error or "")
    finally:
        upstream.abort()
        await proxy.close()


async def test_messages_in_flight_from_the_last_connection_do_not_block_the_next(
        tmp_path: Any) -> None:
    """The remote's Receive Maximum (2 here) is taken by the messages the previous connection
    object left in flight (handed over, `resume_from`, and resent), whose rows the cursor
    has passed since (a backlog bound dropped them): a window of new messages waits for
    their acks instead of returning 0, which dropped the link before they came, again on
    every reconnect."""
    server = Mosquitto(tmp_path / "mosquitto", extra_config="max_inflight_messages 2\n")
    server.start()
    proxy = await TcpProxy("127.0.0.1", server.port).start()
    config = bridge_config(f"mqtt://{proxy.address}", topics=['sensors/# out 1 "" site1/'])
    first = MqttUpstream(config, ack_timeout=1.0)
    second = MqttUpstream(config, ack_timeout=5.0)
    try:
        await first.start()
        proxy.hold_replies()  # the remote takes them; its PUBACKs stay in the proxy
        with pytest.raises(BridgeError, match="no acknowledgement"):
            await first.send(messages(1, 2))
        first.abort()
        proxy.cut()
        proxy.forward()
        second.resume_from(first)
        await second.start()  # resends 1 and 2
        assert await second.send(messages(3, 2)) >= 1
    finally:
        await second.close()
        await proxy.close()
        server.stop()
