"""The broker as amqtt's MQTTClient (an independent asyncio client, MQTT 3.1.1 only) sees it.

amqtt runs in the test's event loop; the broker runs in its own thread (conftest), so both
make progress. "Nothing else arrived" is checked with a marker message published after the
message under test, not by sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from amqtt.client import MQTTClient
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.session import ApplicationMessage

from tests.conftest import BrokerThread

TIMEOUT = 5.0
_markers = itertools.count()

MakeClient = Callable[..., Awaitable[MQTTClient]]


@pytest.fixture(autouse=True)
def _quiet_amqtt(caplog: pytest.LogCaptureFixture) -> None:
    # amqtt logs every (expected) disconnection as a warning.
    caplog.set_level(logging.ERROR, logger="amqtt")


@pytest.fixture
async def amqtt_client(broker: BrokerThread) -> AsyncIterator[MakeClient]:
    """make(client_id, clean=True, will=None) -> a connected amqtt MQTTClient."""
    made: list[MQTTClient] = []

    async def make(client_id: str, *, clean: bool = True,
                   will: dict[str, Any] | None = None) -> MQTTClient:
        config: dict[str, Any] = {"auto_reconnect": False, "keep_alive": 30}
        if will is not None:
            config["will"] = will
        client = MQTTClient(client_id=client_id, config=config)
        made.append(client)
        code = await asyncio.wait_for(
            client.connect(f"mqtt://{broker.host}:{broker.port}/", cleansession=clean), TIMEOUT)
        assert code == 0
        return client

    yield make
    for client in made:
        if client.session is not None and client.session.transitions.is_connected():
            await asyncio.wait_for(client.disconnect(), TIMEOUT)


async def receive(client: MQTTClient) -> ApplicationMessage:
    message = await client.deliver_message(timeout_duration=TIMEOUT)
    assert message is not None
    return message


async def drain_until_marker(sub: MQTTClient, pub: MQTTClient) -> list[ApplicationMessage]:
    """What `sub` receives before a marker `pub` publishes now (QoS 1, after the test's own
    publishes, so the broker delivers it after them)."""
    marker = f"marker/{next(_markers)}"
    assert await sub.subscribe([(marker, QOS_1)]) == [QOS_1]
    await pub.publish(marker, b"marker", qos=QOS_1)
    received = []
    while True:
        message = await receive(sub)
        if message.topic == marker:
            return received
        received.append(message)


@pytest.mark.parametrize("qos", [QOS_0, QOS_1, QOS_2])
async def test_round_trip_each_qos(amqtt_client: MakeClient, qos: int) -> None:
    sub = await amqtt_client("sub")
    pub = await amqtt_client("pub")
    assert await sub.subscribe([("room/+/temp", qos)]) == [qos]
    await pub.publish("room/1/temp", b"21.5", qos=qos)
    message = await receive(sub)
    assert (message.topic, bytes(message.data), message.qos, message.retain) == (
        "room/1/temp", b"21.5", qos, False)


async def test_qos2_is_delivered_exactly_once(amqtt_client: MakeClient) -> None:
    sub = await amqtt_client("sub")
    pub = await amqtt_client("pub")
    await sub.subscribe([("orders/#", QOS_2)])
    for n in range(10):
        await pub.publish(f"orders/{n}", f"order {n}".encode(), qos=QOS_2)
    received = await drain_until_marker(sub, pub)
    assert [bytes(m.data) for m in received] == [f"order {n}".encode() for n in range(10)]
    assert {m.qos for m in received} == {QOS_2}


async def test_wildcards(amqtt_client: MakeClient) -> None:
    sub = await amqtt_client("sub")
    pub = await amqtt_client("pub")
    assert await sub.subscribe([("a/+/c", QOS_1), ("x/#", QOS_1)]) == [QOS_1, QOS_1]
    for topic in ["a/b/c", "a/b/c/d", "a/c", "x", "x/y/z", "xx/y"]:
        await pub.publish(topic, topic.encode(), qos=QOS_1)
    received = await drain_until_marker(sub, pub)
    assert [m.topic for m in received] == ["a/b/c", "x", "x/y/z"]


async def test_retained_message_set_received_and_cleared(amqtt_client: MakeClient) -> None:
    pub = await amqtt_client("pub")
    await pub.publish("status/pump", b"running", qos=QOS_1, retain=True)
    late = await amqtt_client("late")
    await late.subscribe([("status/#", QOS_1)])
    message = await receive(late)
    assert (message.topic, bytes(message.data), message.retain) == (
        "status/pump", b"running", True)

    await pub.publish("status/pump", b"", qos=QOS_1, retain=True)  # clears it
    assert [bytes(m.data) for m in await drain_until_marker(late, pub)] == [b""]
    newcomer = await amqtt_client("newcomer")
    await newcomer.subscribe([("status/#", QOS_1)])
    assert await drain_until_marker(newcomer, pub) == []


async def test_persistent_session_receives_offline_messages(amqtt_client: MakeClient) -> None:
    device = await amqtt_client("device-3", clean=False)
    await device.subscribe([("cmd/device-3", QOS_1)])
    await device.disconnect()

    pub = await amqtt_client("pub")
    for n in range(3):
        await pub.publish("cmd/device-3", f"cmd {n}".encode(), qos=QOS_1)

    back = await amqtt_client("device-3", clean=False)
    received = await drain_until_marker(back, pub)
    assert [(bytes(m.data), m.qos) for m in received] == [
        (f"cmd {n}".encode(), QOS_1) for n in range(3)]


async def test_clean_session_discards_subscriptions(amqtt_client: MakeClient) -> None:
    device = await amqtt_client("device-4", clean=False)
    await device.subscribe([("cmd/device-4", QOS_1)])
    await device.disconnect()
    back = await amqtt_client("device-4", clean=True)
    pub = await amqtt_client("pub")
    await pub.publish("cmd/device-4", b"nobody", qos=QOS_1)
    assert await drain_until_marker(back, pub) == []


async def test_will_on_abrupt_disconnect(amqtt_client: MakeClient) -> None:
    watcher = await amqtt_client("watcher")
    await watcher.subscribe([("wills/#", QOS_1)])
    device = await amqtt_client(
        "device-5", will={"topic": "wills/device-5", "message": "lost", "qos": QOS_1,
                          "retain": False})
    # Drop the TCP connection without DISCONNECT, as a device losing power would.
    assert device._handler is not None and device._handler.writer is not None
    device._handler.writer._writer.transport.abort()  # type: ignore[attr-defined]
    message = await receive(watcher)
    assert (message.topic, bytes(message.data), message.qos) == ("wills/device-5", b"lost", 1)


async def test_no_will_after_disconnect(amqtt_client: MakeClient) -> None:
    watcher = await amqtt_client("watcher")
    await watcher.subscribe([("wills/#", QOS_1)])
    device = await amqtt_client(
        "device-6", will={"topic": "wills/device-6", "message": "lost", "qos": QOS_1,
                          "retain": False})
    await device.disconnect()
    assert await drain_until_marker(watcher, watcher) == []


async def test_unsubscribe(amqtt_client: MakeClient) -> None:
    sub = await amqtt_client("sub")
    pub = await amqtt_client("pub")
    await sub.subscribe([("feed", QOS_1)])
    await pub.publish("feed", b"1", qos=QOS_1)
    assert bytes((await receive(sub)).data) == b"1"
    await sub.unsubscribe(["feed"])
    await pub.publish("feed", b"2", qos=QOS_1)
    assert await drain_until_marker(sub, pub) == []
