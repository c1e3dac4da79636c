"""The broker as paho-mqtt (an independent client, MQTT 3.1.1 and 5.0) sees it.

Every test speaks to a real broker on a free loopback port (the `broker` / `make_broker`
fixtures) through paho's threaded client. Waiting is done on queues filled by paho's callbacks,
with timeouts; "nothing else arrived" is checked with a marker message published after the
message under test (the broker delivers one session's messages in order), not by sleeping.
The only sleeps wait for the broker's clock (message expiry, will delay) to pass a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.conftest import BrokerThread

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
TIMEOUT = 5.0

both_versions = pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])

_marker_ids = itertools.count()


def props(packet_type: int, **values: Any) -> Properties:
    """paho Properties for `packet_type` with the given attributes (paho's names)."""
    properties = Properties(packet_type)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


class Paho:
    """A paho client whose callbacks feed queues; every wait has a timeout."""

    def __init__(self, broker: BrokerThread, protocol: int, client_id: str = "", *,
                 clean: bool = True, session_expiry: int | None = None) -> None:
        self.broker = broker
        self.protocol = protocol
        self.v5 = protocol == V5
        self.client_id = client_id
        self.clean = clean
        self.session_expiry = session_expiry
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            clean_session=None if self.v5 else clean, reconnect_on_failure=False)
        self.connacks: queue.Queue[tuple[bool, int, Any]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[int]]] = queue.Queue()
        self.unsubacks: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_disconnect = self._on_disconnect
        self._marker_topic: str | None = None

    # -- callbacks (paho's network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        self.connacks.put((bool(flags.session_present), int(reason_code.value), properties))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        self.subacks.put((mid, [int(code.value) for code in reason_codes]))

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                        properties: Any) -> None:
        self.unsubacks.put(mid)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self.disconnects.put((int(reason_code.value), properties))

    # -- actions --------------------------------------------------------------------------

    def will_set(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                 **properties: Any) -> Paho:
        will_properties = props(PacketTypes.WILLMESSAGE, **properties) if properties else None
        self.client.will_set(topic, payload, qos, retain, properties=will_properties)
        return self

    def connect(self, **connect_properties: Any) -> tuple[bool, int, Any]:
        """Connect, start paho's thread and return (session present, reason code, props)."""
        kwargs: dict[str, Any] = {}
        if self.v5:
            if self.session_expiry is not None:
                connect_properties.setdefault("SessionExpiryInterval", self.session_expiry)
            kwargs["clean_start"] = self.clean
            if connect_properties:
                kwargs["properties"] = props(PacketTypes.CONNECT, **connect_properties)
        self.client.connect(self.broker.host, self.broker.port, keepalive=60, **kwargs)
        self.client.loop_start()
        connack = self.connacks.get(timeout=TIMEOUT)
        assert connack[1] == 0, f"CONNACK refused: {connack}"
        return connack

    def subscribe(self, topic: str | list[tuple[str, Any]], qos: int | SubscribeOptions = 0,
                  **properties: Any) -> list[int]:
        """Subscribe and return the SUBACK's reason codes."""
        subscribe_properties = props(PacketTypes.SUBSCRIBE, **properties) if properties else None
        if isinstance(topic, list):
            rc, mid = self.client.subscribe(topic, properties=subscribe_properties)
        elif isinstance(qos, SubscribeOptions):
            rc, mid = self.client.subscribe(topic, options=qos, properties=subscribe_properties)
        else:
            rc, mid = self.client.subscribe(topic, qos, properties=subscribe_properties)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        got_mid, codes = self.subacks.get(timeout=TIMEOUT)
        assert got_mid == mid
        return codes

    def unsubscribe(self, topic: str) -> None:
        rc, mid = self.client.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert self.unsubacks.get(timeout=TIMEOUT) == mid

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, **properties: Any) -> None:
        """Publish and wait until it is acknowledged (QoS 1/2) or written (QoS 0)."""
        publish_properties = props(PacketTypes.PUBLISH, **properties) if properties else None
        info = self.client.publish(topic, payload, qos, retain, properties=publish_properties)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), f"publish to {topic!r} not acknowledged"

    def expect(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id or 'client'}: no message within "
                                 f"{timeout} s") from None

    def drain_until_marker(self, publisher: Paho) -> list[mqtt.MQTTMessage]:
        """Everything received before a marker that `publisher` sends now (QoS 1).

        The marker goes through the same broker session queue after whatever the test
        published before it, so once it arrives nothing earlier is still on its way."""
        if self._marker_topic is None:
            self._marker_topic = f"marker/{next(_marker_ids)}"
            self.subscribe(self._marker_topic, 1)
        publisher.publish(self._marker_topic, b"marker", qos=1)
        received = []
        while True:
            message = self.expect()
            if message.topic == self._marker_topic:
                return received
            received.append(message)

    def drop(self) -> None:
        """End the TCP connection without DISCONNECT, as a device losing power would."""
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        self.disconnects.get(timeout=TIMEOUT)  # paho noticed; its thread ends
        self.client.loop_stop()

    def disconnect(self, **properties: Any) -> None:
        disconnect_properties = (props(PacketTypes.DISCONNECT, **properties)
                                 if properties else None)
        if self.client.is_connected():
            self.client.disconnect(properties=disconnect_properties)
            self.disconnects.get(timeout=TIMEOUT)
        self.client.loop_stop()


@pytest.fixture
def clients(broker: BrokerThread) -> Iterator[Callable[..., Paho]]:
    """make(protocol, client_id="", clean=True, session_expiry=None) -> an unconnected Paho."""
    made: list[Paho] = []

    def make(protocol: int, client_id: str = "", **kwargs: Any) -> Paho:
        client = Paho(broker, protocol, client_id, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.client.disconnect()
        finally:
            client.client.loop_stop()


def connected(make: Callable[..., Paho], protocol: int, client_id: str, **kwargs: Any) -> Paho:
    client = make(protocol, client_id, **kwargs)
    client.connect()
    return client


def persistent(make: Callable[..., Paho], protocol: int, client_id: str) -> Paho:
    """A client whose session outlives its connection (3.1.1 clean session 0; 5.0 clean start
    0 with a Session Expiry Interval)."""
    return make(protocol, client_id, clean=False, session_expiry=300)


# --------------------------------------------------------------------------- connecting


@both_versions
def test_connect_and_clean_disconnect(clients: Callable[..., Paho], protocol: int) -> None:
    client = clients(protocol, "dev-1")
    session_present, reason, _ = client.connect()
    assert (session_present, reason) == (False, 0)
    assert client.client.is_connected()
    client.disconnect()
    assert not client.client.is_connected()


@both_versions
def test_session_present_on_reconnect_to_persistent_session(
        clients: Callable[..., Paho], protocol: int) -> None:
    first = persistent(clients, protocol, "sensor-7")
    assert first.connect()[0] is False  # a new session
    first.subscribe("cmd/sensor-7", 1)
    first.disconnect()

    again = persistent(clients, protocol, "sensor-7")
    assert again.connect()[0] is True  # the broker kept the session
    again.disconnect()

    # A clean connection discards it: no session present, and none kept afterwards.
    clean = clients(protocol, "sensor-7", clean=True)
    assert clean.connect()[0] is False
    clean.disconnect()
    after = persistent(clients, protocol, "sensor-7")
    assert after.connect()[0] is False


def test_v5_empty_client_id_gets_assigned_identifier(clients: Callable[..., Paho]) -> None:
    client = clients(V5, "")
    _, reason, properties = client.connect()
    assert reason == 0
    assigned = properties.AssignedClientIdentifier
    assert assigned.startswith("auto-") and len(assigned) > len("auto-")


@both_versions
def test_takeover_closes_the_older_connection(clients: Callable[..., Paho],
                                              protocol: int) -> None:
    old = connected(clients, protocol, "gateway-1")
    new = connected(clients, protocol, "gateway-1")
    reason, _ = old.disconnects.get(timeout=TIMEOUT)
    if protocol == V5:
        assert reason == 0x8E  # Session taken over
    else:
        assert reason != 0  # 3.1.1 has no DISCONNECT from the server: the socket closes
    assert new.client.is_connected()
    # The new connection works.
    new.subscribe("t/takeover", 1)
    new.publish("t/takeover", b"still here", qos=1)
    assert new.expect().payload == b"still here"


# --------------------------------------------------------------------------- publish/subscribe


@both_versions
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_round_trip_each_qos_with_single_level_wildcard(
        clients: Callable[..., Paho], protocol: int, qos: int) -> None:
    sub = connected(clients, protocol, "sub")
    pub = connected(clients, protocol, "pub")
    assert sub.subscribe("home/+/temp", qos) == [qos]
    pub.publish("home/kitchen/temp", b"21.5", qos=qos)
    pub.publish("home/kitchen/humidity", b"40", qos=qos)  # does not match
    pub.publish("home/kitchen/oven/temp", b"180", qos=qos)  # + is one level only
    pub.publish("home/hall/temp", b"19.0", qos=qos)
    received = sub.drain_until_marker(pub)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in received] == [
        ("home/kitchen/temp", b"21.5", qos, False),
        ("home/hall/temp", b"19.0", qos, False),
    ]


@both_versions
def test_multi_level_wildcard_matches_parent_and_descendants(
        clients: Callable[..., Paho], protocol: int) -> None:
    sub = connected(clients, protocol, "sub")
    pub = connected(clients, protocol, "pub")
    sub.subscribe("plant/#", 1)
    for topic in ["plant", "plant/a", "plant/a/b/c", "plants/a", "other/plant"]:
        pub.publish(topic, topic.encode(), qos=1)
    received = sub.drain_until_marker(pub)
    assert [m.topic for m in received] == ["plant", "plant/a", "plant/a/b/c"]


@both_versions
def test_delivery_qos_is_the_lower_of_publish_and_subscription(
        clients: Callable[..., Paho], protocol: int) -> None:
    sub = connected(clients, protocol, "sub")
    pub = connected(clients, protocol, "pub")
    sub.subscribe("q/sub1", 1)
    sub.subscribe("q/sub2", 2)
    pub.publish("q/sub1", b"a", qos=2)
    pub.publish("q/sub2", b"b", qos=1)
    received = sub.drain_until_marker(pub)
    assert [(m.topic, m.qos) for m in received] == [("q/sub1", 1), ("q/sub2", 1)]


@both_versions
def test_unsubscribe_stops_delivery(clients: Callable[..., Paho], protocol: int) -> None:
    sub = connected(clients, protocol, "sub")
    pub = connected(clients, protocol, "pub")
    sub.subscribe("news/#", 1)
    pub.publish("news/a", b"1", qos=1)
    assert sub.expect().payload == b"1"
    sub.unsubscribe("news/#")
    pub.publish("news/a", b"2", qos=1)
    assert sub.drain_until_marker(pub) == []


@both_versions
def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_qos(
        clients: Callable[..., Paho], protocol: int) -> None:
    sub = connected(clients, protocol, "sub")
    pub = connected(clients, protocol, "pub")
    sub.subscribe("dev/+/state", 0)
    sub.subscribe("dev/#", 1)
    pub.publish("dev/7/state", b"on", qos=1)
    received = sub.drain_until_marker(pub)
    assert [(m.topic, m.payload, m.qos) for m in received] == [("dev/7/state", b"on", 1)]


def test_v5_overlapping_subscriptions_carry_every_subscription_identifier(
        clients: Callable[..., Paho]) -> None:
    sub = connected(clients, V5, "sub")
    pub = connected(clients, V5, "pub")
    sub.subscribe("dev/+/state", 1, SubscriptionIdentifier=11)
    sub.subscribe("dev/#", 1, SubscriptionIdentifier=22)
    sub.subscribe("other/#", 1)  # no identifier
    pub.publish("dev/7/state", b"on", qos=1)
    pub.publish("other/x", b"plain", qos=1)
    received = sub.drain_until_marker(pub)
    assert [m.topic for m in received] == ["dev/7/state", "other/x"]
    assert sorted(received[0].properties.SubscriptionIdentifier) == [11, 22]
    assert not hasattr(received[1].properties, "SubscriptionIdentifier")


# --------------------------------------------------------------------------- retained


@both_versions
def test_retained_message_set_delivered_on_subscribe_and_cleared(
        clients: Callable[..., Paho], protocol: int) -> None:
    pub = connected(clients, protocol, "pub")
    pub.publish("status/door", b"open", qos=1, retain=True)
    pub.publish("status/window", b"closed", qos=1, retain=True)

    late = connected(clients, protocol, "late")
    late.subscribe("status/+", 1)
    retained = late.drain_until_marker(pub)
    assert sorted((m.topic, m.payload, m.retain) for m in retained) == [
        ("status/door", b"open", True), ("status/window", b"closed", True)]

    # A live subscriber gets a retained publish without the retain flag (3.3.1.3).
    pub.publish("status/door", b"closed", qos=1, retain=True)
    live = late.drain_until_marker(pub)
    assert [(m.payload, m.retain) for m in live] == [(b"closed", False)]

    # An empty retained payload clears the topic (and is forwarded to live subscribers).
    pub.publish("status/door", b"", qos=1, retain=True)
    assert [m.payload for m in late.drain_until_marker(pub)] == [b""]
    newcomer = connected(clients, protocol, "newcomer")
    newcomer.subscribe("status/+", 1)
    assert [(m.topic, m.payload) for m in newcomer.drain_until_marker(pub)] == [
        ("status/window", b"closed")]


def test_v5_retain_handling(clients: Callable[..., Paho]) -> None:
    pub = connected(clients, V5, "pub")
    pub.publish("cfg/rate", b"10", qos=1, retain=True)
    sub = connected(clients, V5, "sub")

    # 2: never send retained messages on subscribe.
    sub.subscribe("cfg/+", SubscribeOptions(qos=1, retainHandling=2))
    assert sub.drain_until_marker(pub) == []
    # 1: only when the subscription is new (it exists now with handling 2: replaced, not new).
    sub.subscribe("cfg/+", SubscribeOptions(qos=1, retainHandling=1))
    assert sub.drain_until_marker(pub) == []
    sub.subscribe("cfg/#", SubscribeOptions(qos=1, retainHandling=1))
    assert [m.payload for m in sub.drain_until_marker(pub)] == [b"10"]
    # 0: every time.
    sub.subscribe("cfg/#", SubscribeOptions(qos=1, retainHandling=0))
    assert [m.payload for m in sub.drain_until_marker(pub)] == [b"10"]


def test_v5_retain_as_published(clients: Callable[..., Paho]) -> None:
    sub = connected(clients, V5, "sub")
    pub = connected(clients, V5, "pub")
    sub.subscribe("rap/kept", SubscribeOptions(qos=1, retainAsPublished=True))
    sub.subscribe("rap/plain", SubscribeOptions(qos=1))
    pub.publish("rap/kept", b"1", qos=1, retain=True)
    pub.publish("rap/plain", b"2", qos=1, retain=True)
    received = sub.drain_until_marker(pub)
    assert [(m.topic, m.retain) for m in received] == [("rap/kept", True), ("rap/plain", False)]


# --------------------------------------------------------------------------- shared subscriptions


@both_versions
def test_shared_subscription_gives_each_message_to_one_member(
        clients: Callable[..., Paho], protocol: int) -> None:
    workers = [connected(clients, protocol, f"worker-{n}") for n in (1, 2)]
    for worker in workers:
        assert worker.subscribe("$share/g/jobs/+", 1) == [1]
    watcher = connected(clients, protocol, "watcher")  # an ordinary subscription
    watcher.subscribe("jobs/+", 1)
    pub = connected(clients, protocol, "pub")
    sent = [f"job-{n}".encode() for n in range(20)]
    for payload in sent:
        pub.publish("jobs/build", payload, qos=1)

    got: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + TIMEOUT
    while sum(map(len, got)) < len(sent):
        assert time.monotonic() < deadline, f"only {got} of {len(sent)} arrived"
        for index, worker in enumerate(workers):
            with contextlib.suppress(queue.Empty):
                got[index].append(worker.messages.get(timeout=0.05).payload)
    assert sorted(got[0] + got[1]) == sorted(sent)  # each exactly once
    assert got[0] and got[1], f"one member got everything: {got}"
    for index, worker in enumerate(workers):  # and nothing more
        assert worker.drain_until_marker(pub) == [], f"worker {index} got extra copies"
    assert [m.payload for m in watcher.drain_until_marker(pub)] == sent


# --------------------------------------------------------------------------- persistent sessions


@both_versions
def test_offline_qos1_messages_are_delivered_on_reconnect(
        clients: Callable[..., Paho], protocol: int) -> None:
    device = persistent(clients, protocol, "device-9")
    device.connect()
    device.subscribe("cmd/device-9/#", 1)
    device.disconnect()

    pub = connected(clients, protocol, "pub")
    for n in range(5):
        pub.publish(f"cmd/device-9/{n}", f"cmd {n}".encode(), qos=1)
    pub.publish("cmd/device-9/q0", b"qos0 is not queued", qos=0)
    pub.publish("cmd/device-9/q2", b"qos2 downgraded", qos=2)

    back = persistent(clients, protocol, "device-9")
    session_present, _, _ = back.connect()
    assert session_present
    received = back.drain_until_marker(pub)
    assert [(m.payload, m.qos) for m in received] == [
        *[(f"cmd {n}".encode(), 1) for n in range(5)], (b"qos2 downgraded", 1)]


def test_v5_session_expiry_zero_discards_session_at_disconnect(
        clients: Callable[..., Paho]) -> None:
    device = clients(V5, "short-lived", clean=False, session_expiry=0)
    device.connect()
    device.subscribe("x/#", 1)
    device.disconnect()
    pub = connected(clients, V5, "pub")
    pub.publish("x/1", b"lost", qos=1)
    again = clients(V5, "short-lived", clean=False, session_expiry=0)
    assert again.connect()[0] is False
    pub.publish("x/2", b"not subscribed any more", qos=1)
    assert again.drain_until_marker(pub) == []


def test_v5_disconnect_can_shorten_session_expiry(clients: Callable[..., Paho]) -> None:
    device = persistent(clients, V5, "dev")
    device.connect()
    device.subscribe("x/#", 1)
    device.disconnect(SessionExpiryInterval=0)  # end the session with this connection
    again = persistent(clients, V5, "dev")
    assert again.connect()[0] is False


# --------------------------------------------------------------------------- wills


@both_versions
def test_will_published_when_the_connection_drops(clients: Callable[..., Paho],
                                                  protocol: int) -> None:
    watcher = connected(clients, protocol, "watcher")
    watcher.subscribe("wills/#", 1)
    device = clients(protocol, "fragile").will_set("wills/fragile", b"offline", qos=1)
    device.connect()
    device.drop()
    will = watcher.expect()
    assert (will.topic, will.payload, will.qos) == ("wills/fragile", b"offline", 1)


@both_versions
def test_no_will_after_a_clean_disconnect(clients: Callable[..., Paho], protocol: int) -> None:
    watcher = connected(clients, protocol, "watcher")
    watcher.subscribe("wills/#", 1)
    device = clients(protocol, "polite").will_set("wills/polite", b"offline", qos=1)
    device.connect()
    device.disconnect()
    assert watcher.drain_until_marker(connected(clients, protocol, "pub")) == []


@both_versions
def test_retained_will_is_kept_for_later_subscribers(clients: Callable[..., Paho],
                                                     protocol: int) -> None:
    watcher = connected(clients, protocol, "watcher")
    watcher.subscribe("wills/#", 1)
    device = clients(protocol, "fragile").will_set("wills/fragile", b"offline", retain=True)
    device.connect()
    device.drop()
    watcher.expect()
    later = connected(clients, protocol, "later")
    later.subscribe("wills/#", 1)
    message = later.expect()
    assert (message.payload, message.retain) == (b"offline", True)


def test_v5_will_delay_interval_is_honoured(clients: Callable[..., Paho]) -> None:
    watcher = connected(clients, V5, "watcher")
    watcher.subscribe("wills/#", 1)
    device = persistent(clients, V5, "slow").will_set(
        "wills/slow", b"offline", qos=1, WillDelayInterval=1)
    device.connect()
    device.drop()
    dropped_at = time.monotonic()
    will = watcher.expect(timeout=TIMEOUT)
    waited = time.monotonic() - dropped_at
    assert will.payload == b"offline"
    assert 0.8 <= waited < 3.0, f"will after {waited:.2f} s, delay was 1 s"


def test_v5_reconnect_within_will_delay_cancels_the_will(clients: Callable[..., Paho]) -> None:
    watcher = connected(clients, V5, "watcher")
    watcher.subscribe("wills/#", 1)
    device = persistent(clients, V5, "flaky").will_set(
        "wills/flaky", b"offline", qos=1, WillDelayInterval=1)
    device.connect()
    device.drop()
    back = persistent(clients, V5, "flaky")
    assert back.connect()[0] is True
    # Wait out the delay on the broker's clock, then check that nothing was published.
    with pytest.raises(queue.Empty):
        watcher.messages.get(timeout=1.5)
    assert watcher.drain_until_marker(back) == []


def test_v5_will_goes_at_session_end_when_that_comes_before_the_delay(
        clients: Callable[..., Paho]) -> None:
    watcher = connected(clients, V5, "watcher")
    watcher.subscribe("wills/#", 1)
    device = clients(V5, "brief", clean=True, session_expiry=0).will_set(
        "wills/brief", b"offline", qos=1, WillDelayInterval=3600)
    device.connect()
    device.drop()
    assert watcher.expect(timeout=TIMEOUT).payload == b"offline"  # not an hour later


@both_versions
def test_will_of_a_taken_over_connection_is_published(clients: Callable[..., Paho],
                                                      protocol: int) -> None:
    watcher = connected(clients, protocol, "watcher")
    watcher.subscribe("wills/#", 1)
    old = clients(protocol, "twin").will_set("wills/twin", b"replaced", qos=1)
    old.connect()
    connected(clients, protocol, "twin")
    assert watcher.expect().payload == b"replaced"


def test_v5_will_properties_are_forwarded(clients: Callable[..., Paho]) -> None:
    watcher = connected(clients, V5, "watcher")
    watcher.subscribe("wills/#", 1)
    device = clients(V5, "rich").will_set(
        "wills/rich", b'{"state":"offline"}', qos=1, ContentType="application/json",
        PayloadFormatIndicator=1, UserProperty=[("site", "north")])
    device.connect()
    device.drop()
    will = watcher.expect()
    assert will.properties.ContentType == "application/json"
    assert will.properties.PayloadFormatIndicator == 1
    assert will.properties.UserProperty == [("site", "north")]


# --------------------------------------------------------------------------- MQTT 5 features


def test_v5_message_expiry(clients: Callable[..., Paho]) -> None:
    device = persistent(clients, V5, "device")
    device.connect()
    device.subscribe("exp/#", 1)
    device.disconnect()
    pub = connected(clients, V5, "pub")
    pub.publish("exp/short", b"stale soon", qos=1, MessageExpiryInterval=1)
    pub.publish("exp/long", b"fresh", qos=1, MessageExpiryInterval=3600)
    pub.publish("exp/none", b"forever", qos=1)
    time.sleep(1.5)  # let the short message's lifetime pass on the broker's clock
    back = persistent(clients, V5, "device")
    back.connect()
    received = back.drain_until_marker(pub)
    assert [m.payload for m in received] == [b"fresh", b"forever"]
    # The forwarded interval is what is left of the lifetime (3.3.2.3.3).
    remaining = received[0].properties.MessageExpiryInterval
    assert 3590 <= remaining < 3600
    assert not hasattr(received[1].properties, "MessageExpiryInterval")


def test_v5_user_properties_content_type_and_payload_format(
        clients: Callable[..., Paho]) -> None:
    sub = connected(clients, V5, "sub")
    pub = connected(clients, V5, "pub")
    sub.subscribe("props", 1)
    user = [("unit", "celsius"), ("sensor", "t1"), ("unit", "again")]  # order, duplicates kept
    pub.publish("props", '{"t": 21.5}', qos=1, UserProperty=user,
                ContentType="application/json", PayloadFormatIndicator=1)
    message = sub.expect()
    assert message.properties.UserProperty == user
    assert message.properties.ContentType == "application/json"
    assert message.properties.PayloadFormatIndicator == 1
    assert message.payload == b'{"t": 21.5}'


def test_v5_request_response_round_trip(clients: Callable[..., Paho]) -> None:
    requester = connected(clients, V5, "requester")
    responder = connected(clients, V5, "responder")
    responder.subscribe("svc/time/request", 1)
    requester.subscribe("reply/requester", 1)

    requester.publish("svc/time/request", b"what time?", qos=1,
                      ResponseTopic="reply/requester", CorrelationData=b"\x00req-42\xff")
    request = responder.expect()
    assert request.properties.ResponseTopic == "reply/requester"
    assert request.properties.CorrelationData == b"\x00req-42\xff"

    responder.publish(request.properties.ResponseTopic, b"noon", qos=1,
                      CorrelationData=request.properties.CorrelationData)
    response = requester.expect()
    assert (response.topic, response.payload) == ("reply/requester", b"noon")
    assert response.properties.CorrelationData == b"\x00req-42\xff"


def test_v5_no_local(clients: Callable[..., Paho]) -> None:
    chat = connected(clients, V5, "chat")
    other = connected(clients, V5, "other")
    chat.subscribe("room/1", SubscribeOptions(qos=1, noLocal=True))
    chat.publish("room/1", b"my own", qos=1)
    other.publish("room/1", b"from other", qos=1)
    assert [m.payload for m in chat.drain_until_marker(other)] == [b"from other"]


def test_v5_topic_alias_from_the_client(clients: Callable[..., Paho]) -> None:
    sub = connected(clients, V5, "sub")
    pub = connected(clients, V5, "pub")
    sub.subscribe("long/topic/name/for/a/sensor", 1)
    pub.publish("long/topic/name/for/a/sensor", b"first", qos=1, TopicAlias=1)
    pub.publish("", b"second", qos=1, TopicAlias=1)  # the alias stands for the topic
    received = sub.drain_until_marker(pub)
    assert [(m.topic, m.payload) for m in received] == [
        ("long/topic/name/for/a/sensor", b"first"), ("long/topic/name/for/a/sensor", b"second")]
    # The broker does not pass the publisher's alias on.
    assert all(not hasattr(m.properties, "TopicAlias") for m in received)


def test_v5_publish_to_no_subscribers_is_acknowledged_with_reason_0x10(
        clients: Callable[..., Paho]) -> None:
    pub = connected(clients, V5, "pub")
    acks: queue.Queue[int] = queue.Queue()
    pub.client.on_publish = lambda client, userdata, mid, reason, properties: acks.put(
        int(reason.value))
    pub.publish("nobody/listens", b"x", qos=1)
    assert acks.get(timeout=TIMEOUT) == 0x10  # No matching subscribers
