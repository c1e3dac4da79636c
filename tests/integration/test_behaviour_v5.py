"""Black-box, hand-built bytes: MQTT 5 features (message expiry, topic aliases, Receive
Maximum, properties passed through, no local, server DISCONNECT reason codes, Maximum Packet
Size), and $SYS.

Spec references name their version: [MQTT-x.y.z-n] (5.0) unless marked (3.1.1).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import (
    DISCONNECT,
    PUBACK,
    PUBLISH,
    PUBREC,
    RawWill,
    connect,
    props,
    sub_options,
    subscriber,
    unique_id,
)

both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


# -- message expiry ---------------------------------------------------------------------


def test_message_expiry_counts_down_while_queued(broker: BrokerThread) -> None:
    client_id = unique_id()
    session = props(session_expiry_interval=60)
    sub = subscriber(broker.port, client_id, ("me/#", 1), version=5, clean=False,
                     properties=session)
    sub.disconnect()
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("me/short", b"1 s", qos=1,
                            properties=props(message_expiry_interval=1))
    publisher.publish_acked("me/long", b"10 s", qos=1,
                            properties=props(message_expiry_interval=10))
    publisher.publish_acked("mr/short", b"1 s", qos=1, retain=True,
                            properties=props(message_expiry_interval=1))
    publisher.publish_acked("mr/long", b"10 s", qos=1, retain=True,
                            properties=props(message_expiry_interval=10))
    publisher.expect_nothing(1.5)  # the broker's clock must pass the 1 s expiry
    sub = connect(broker.port, client_id, version=5, clean=False, properties=session)
    # [MQTT-3.3.2-5]: an expired message is not delivered; [MQTT-3.3.2-6]: the interval
    # sent is the received one minus the time the message waited in the server.
    message = sub.expect_publish()
    assert (message.topic, message.payload) == ("me/long", b"10 s")
    assert 1 <= message.properties.message_expiry_interval < 10
    sub.ack(PUBACK, message.packet_id)
    sub.expect_nothing()
    # Retained messages expire too; the rest carry the remaining interval.
    late = subscriber(broker.port, unique_id(), "mr/#", version=5)
    message = late.expect_publish()
    assert (message.topic, message.retain) == ("mr/long", True)
    assert 1 <= message.properties.message_expiry_interval < 10
    late.expect_nothing()


# -- topic aliases ----------------------------------------------------------------------


def test_topic_alias_from_client(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id(), "ta/#", version=5)
    publisher = connect(broker.port, unique_id(), version=5)
    assert publisher.connack is not None
    maximum = publisher.connack.properties.topic_alias_maximum
    assert maximum == broker.config.mqtt.topic_alias_maximum
    # 3.3.2.3.4: topic + alias sets the mapping, an empty topic + alias uses it.
    publisher.publish("ta/long/topic", b"first", properties=props(topic_alias=1))
    publisher.publish("", b"second", properties=props(topic_alias=1))
    publisher.publish("ta/other", b"third", properties=props(topic_alias=1))  # remapped
    publisher.publish("", b"fourth", properties=props(topic_alias=1))
    got = [(m.topic, m.payload) for m in (sub.expect_publish() for _ in range(4))]
    assert got == [("ta/long/topic", b"first"), ("ta/long/topic", b"second"),
                   ("ta/other", b"third"), ("ta/other", b"fourth")]
    # An alias above the server's Topic Alias Maximum: DISCONNECT 0x94 (3.3.2.3.4).
    publisher.publish("ta/x", b"", properties=props(topic_alias=maximum + 1))
    assert publisher.expect(DISCONNECT).reason_code == 0x94
    publisher.expect_closed()


def test_topic_alias_to_client(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id(), "tb/t", version=5,
                     properties=props(topic_alias_maximum=5))
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish("tb/t", b"1")
    publisher.publish("tb/t", b"2")
    first = sub.expect_publish()
    assert (first.topic, first.payload) == ("tb/t", b"1")
    alias = first.properties.topic_alias
    assert alias is not None and 1 <= alias <= 5  # [MQTT-3.3.2-10]: within its maximum
    # The second one carries only the alias: an empty topic name.
    assert sub.expect_raw(PUBLISH) == b"\x30\x07\x00\x00\x03\x23" + alias.to_bytes(2, "big") + b"2"


def test_topic_alias_to_client_at_qos_1(broker: BrokerThread) -> None:
    # QoS 1 deliveries to a client that allows topic aliases leave the server's QoS 1 hot
    # path (no aliases there) and are still aliased and acknowledged.
    sub = subscriber(broker.port, unique_id(), ("tq/t", 1), version=5,
                     properties=props(topic_alias_maximum=5))
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("tq/t", b"1", qos=1)
    publisher.publish_acked("tq/t", b"2", qos=1)
    first = sub.expect_publish()
    assert (first.topic, first.payload, first.qos) == ("tq/t", b"1", 1)
    alias = first.properties.topic_alias
    assert alias is not None and 1 <= alias <= 5  # [MQTT-3.3.2-10]: within its maximum
    sub.ack(PUBACK, first.packet_id)
    second = sub.expect_publish()
    # Only the alias: an empty topic name.
    assert (second.topic, second.payload, second.properties.topic_alias) == ("", b"2", alias)
    sub.ack(PUBACK, second.packet_id)
    sub.expect_nothing()


def test_no_topic_alias_to_client_that_did_not_allow_them(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id(), "tc/t", version=5)  # Topic Alias Maximum 0
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish("tc/t", b"1")
    publisher.publish("tc/t", b"2")
    for payload in (b"1", b"2"):
        message = sub.expect_publish()
        # [MQTT-3.3.2-10]: no alias to a client whose Topic Alias Maximum is 0.
        assert (message.topic, message.payload, message.properties.topic_alias) == (
            "tc/t", payload, None)


# -- Receive Maximum --------------------------------------------------------------------


def test_receive_maximum_of_the_server(make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(receive_maximum=2)
    client = connect(broker.port, unique_id(), version=5)
    assert client.connack is not None
    assert client.connack.properties.receive_maximum == 2  # 3.2.2.3.3
    # QoS 2 PUBLISHes stay unacknowledged until PUBCOMP; we never send PUBREL.
    for packet_id in (1, 2):
        client.publish("rm/t", b"x", qos=2, packet_id=packet_id)
        assert client.expect(PUBREC).packet_id == packet_id
    client.publish("rm/t", b"x", qos=2, packet_id=1, dup=True)  # a resend is no new one
    assert client.expect(PUBREC).packet_id == 1
    client.publish("rm/t", b"x", qos=2, packet_id=3)
    # 3.2.2.3.3: more than Receive Maximum unacknowledged -> DISCONNECT 0x93.
    assert client.expect(DISCONNECT).reason_code == 0x93
    client.expect_closed()


def test_server_respects_client_receive_maximum(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id(), ("rc/t", 1), version=5,
                     properties=props(receive_maximum=1))
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("rc/t", b"1", qos=1)
    publisher.publish_acked("rc/t", b"2", qos=1)
    first = sub.expect_publish()
    assert first.payload == b"1"
    sub.expect_nothing()  # 3.1.2.11.3: no second QoS 1 PUBLISH before the PUBACK
    sub.ack(PUBACK, first.packet_id)
    second = sub.expect_publish()
    assert second.payload == b"2"
    sub.ack(PUBACK, second.packet_id)


# -- properties passed through ----------------------------------------------------------


def test_request_response_properties_pass_through(broker: BrokerThread) -> None:
    responder = subscriber(broker.port, unique_id(), "req/t", version=5)
    requester = subscriber(broker.port, unique_id(), "resp/abc", version=5)
    correlation = b"\x00\x01\xffcorr"
    requester.publish("req/t", b"question", properties=props(
        response_topic="resp/abc", correlation_data=correlation))
    request = responder.expect_publish()
    # [MQTT-3.3.2-15] / [MQTT-3.3.2-16]: unaltered.
    assert request.properties.response_topic == "resp/abc"
    assert request.properties.correlation_data == correlation
    responder.publish(request.properties.response_topic, b"answer",
                      properties=props(correlation_data=request.properties.correlation_data))
    answer = requester.expect_publish()
    assert (answer.payload, answer.properties.correlation_data) == (b"answer", correlation)


def test_user_properties_payload_format_and_content_type_pass_through(
        broker: BrokerThread) -> None:
    sub5 = subscriber(broker.port, unique_id(), "up/t", version=5)
    sub311 = subscriber(broker.port, unique_id(), "up/t", version=4)
    publisher = connect(broker.port, unique_id(), version=5)
    user = [("k", "1"), ("a", "2"), ("k", "3"), ("ü", "")]
    publisher.publish("up/t", b'{"x": 1}', properties=props(
        payload_format_indicator=1, content_type="application/json", user_properties=user))
    message = sub5.expect_publish()
    # [MQTT-3.3.2-4], [MQTT-3.3.2-20], [MQTT-3.3.2-17] / [MQTT-3.3.2-18]: unchanged, in order.
    assert message.properties.payload_format_indicator == 1
    assert message.properties.content_type == "application/json"
    assert message.properties.user_properties == tuple(user)
    assert message.payload == b'{"x": 1}'
    # A 3.1.1 subscriber gets the message without properties.
    assert sub311.expect_publish().payload == b'{"x": 1}'


def test_no_local(broker: BrokerThread) -> None:
    client = subscriber(broker.port, unique_id(), ("nl/t", sub_options(no_local=True)),
                        version=5)
    other = connect(broker.port, unique_id(), version=5)
    client.publish("nl/t", b"own")  # [MQTT-3.8.3-3]: not sent back to its publisher
    other.publish("nl/t", b"other's")
    assert client.expect_publish().payload == b"other's"
    client.expect_nothing()


# -- server DISCONNECT reason codes -----------------------------------------------------


@both_versions
def test_publish_above_maximum_qos(make_broker: Callable[..., BrokerThread],
                                   version: int) -> None:
    broker = make_broker(max_qos=1)
    client = connect(broker.port, unique_id(), version=version)
    assert client.subscribe(("mq/t", 2)) == (1,)  # granted at most the maximum
    if version == 5:
        assert client.connack is not None and client.connack.properties.maximum_qos == 1
    assert client.publish_acked("mq/t", b"ok", qos=1) == 0
    assert client.expect_publish().payload == b"ok"
    client.publish("mq/t", b"too much", qos=2, packet_id=9)
    if version == 5:
        # 3.2.2.3.4: DISCONNECT 0x9B (QoS not supported).
        assert client.expect(DISCONNECT).reason_code == 0x9B
    client.expect_closed()


@both_versions
def test_retain_not_available(make_broker: Callable[..., BrokerThread], version: int) -> None:
    broker = make_broker(retain_available=False)
    client = connect(broker.port, unique_id(), version=version)
    if version == 5:
        assert client.connack is not None
        assert client.connack.properties.retain_available == 0  # 3.2.2.3.5
    client.publish("rn/t", b"not kept", retain=True)
    if version == 5:
        assert client.expect(DISCONNECT).reason_code == 0x9A  # 3.2.2.3.5
    client.expect_closed()


@pytest.mark.parametrize(("settings", "will", "code"), [
    ({"max_qos": 1}, RawWill("w/t", b"gone", 2), 0x9B),
    ({"retain_available": False}, RawWill("w/t", b"gone", 0, retain=True), 0x9A),
], ids=["qos-above-max_qos", "retain-not-available"])
def test_a_will_the_server_cannot_publish_as_asked_is_refused(
        make_broker: Callable[..., BrokerThread], settings: dict[str, object], will: RawWill,
        code: int) -> None:
    """[MQTT-3.2.2-12], [MQTT-3.2.2-13]: CONNACK 0x9B / 0x9A and the connection closed, not
    accepted with the will quietly published otherwise; the connection already open under
    the same client id is not taken over, and goes on."""
    broker = make_broker(**settings)
    client_id = unique_id()
    bystander = connect(broker.port, client_id, version=5)
    assert bystander.subscribe(("w/ok", 1)) == (1,)
    refused = connect(broker.port, client_id, version=5, will=will, expect_success=False)
    assert refused.connack is not None and refused.connack.reason_code == code
    refused.expect_closed()
    fitting = will._replace(qos=min(will.qos, 1), retain=False)
    connect(broker.port, unique_id(), version=5, will=fitting).disconnect()
    assert bystander.publish_acked("w/ok", b"still served", qos=1) == 0
    assert bystander.expect_publish().payload == b"still served"


def test_client_maximum_packet_size(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id(), ("mp/t", 1), version=5,
                     properties=props(maximum_packet_size=64))
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("mp/t", b"x" * 100, qos=1)
    publisher.publish_acked("mp/t", b"small", qos=1)
    # [MQTT-3.1.2-24] / [MQTT-3.1.2-25]: too large for the client: not sent (discarded as
    # if delivered); the next one is.
    message = sub.expect_publish()
    assert message.payload == b"small"
    sub.ack(PUBACK, message.packet_id)
    sub.expect_nothing()


def test_qos1_too_large_for_the_client_frees_its_receive_maximum(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id(), ("mr/t", 1), version=5,
                     properties=props(maximum_packet_size=64, receive_maximum=1))
    publisher = connect(broker.port, unique_id(), version=5)
    publisher.publish_acked("mr/t", b"x" * 100, qos=1)
    publisher.publish_acked("mr/t", b"small", qos=1)
    # [MQTT-3.1.2-25]: discarded as if delivered, so it does not hold the client's only
    # slot (3.3.4 Receive Maximum): the next message goes.
    message = sub.expect_publish()
    assert message.payload == b"small"
    sub.ack(PUBACK, message.packet_id)
    sub.expect_nothing()


# -- $SYS -------------------------------------------------------------------------------


@pytest.fixture
def sys_broker(make_broker: Callable[..., BrokerThread], tmp_path: Path) -> BrokerThread:
    config = broker_config(tmp_path)
    config = dataclasses.replace(config,
                                 broker=dataclasses.replace(config.broker, sys_interval_s=1))
    return make_broker(config=config)


def test_sys_topics(sys_broker: BrokerThread) -> None:
    sub = subscriber(sys_broker.port, unique_id(), "$SYS/broker/#")
    wanted = {"version", "uptime", "clients/connected", "messages/received", "messages/sent",
              "bytes/received", "bytes/sent", "publish/messages/expired",
              "publish/messages/refused", "clients/protocol_errors"}
    values: dict[str, str] = {}
    deadline = time.monotonic() + 3.0
    # The retained values come at once; clients/connected is published again (now counting
    # this subscriber) within the 1 s interval.
    while not (wanted <= values.keys() and values.get("clients/connected") == "1"):
        message = sub.expect_publish(timeout=max(0.01, deadline - time.monotonic()))
        values[message.topic.removeprefix("$SYS/broker/")] = message.payload.decode()
    assert values["version"].startswith("edge-broker")
    assert re.fullmatch(r"\d+ seconds", values["uptime"])
    for key in ("messages/received", "messages/sent", "bytes/received", "bytes/sent",
                "publish/messages/refused", "clients/protocol_errors"):
        assert int(values[key]) >= 0, key


def test_sys_has_mosquitto_s_load_heap_and_shared_subscription_topics(
        sys_broker: BrokerThread) -> None:
    # What dashboards made for mosquitto read: load/<source>/<1min|5min|15min> (moving
    # averages per minute), heap/current and heap/maximum, shared_subscriptions/count.
    shared = subscriber(sys_broker.port, unique_id(), "$share/g/sys-test/#")
    sub = subscriber(sys_broker.port, unique_id(), "$SYS/broker/#")
    publisher = connect(sys_broker.port, unique_id(), version=5)
    for _ in range(50):
        publisher.publish_acked("sys-test/t", b"x", qos=1)
    values: dict[str, str] = {}
    deadline = time.monotonic() + 5.0
    # Published again at the 1 s interval: wait for the load figures counting the publishes
    # (sockets/15min comes last of them).
    while (float(values.get("load/publish/received/1min", "0")) <= 0
           or float(values.get("load/sockets/15min", "0")) <= 0):
        message = sub.expect_publish(timeout=max(0.01, deadline - time.monotonic()))
        values[message.topic.removeprefix("$SYS/broker/")] = message.payload.decode()
    for source in ("messages/received", "messages/sent", "bytes/received", "bytes/sent",
                   "publish/received", "publish/sent", "publish/dropped", "connections",
                   "sockets"):
        for window in ("1min", "5min", "15min"):
            assert re.fullmatch(r"\d+\.\d\d", values[f"load/{source}/{window}"]), source
    assert float(values["load/connections/1min"]) > 0
    assert int(values["heap/current"]) > 1_000_000
    assert int(values["heap/maximum"]) >= int(values["heap/current"]) // 2
    assert values["shared_subscriptions/count"] == "1"
    assert shared.expect_publish().topic == "sys-test/t"


@both_versions
def test_clients_cannot_publish_to_sys(sys_broker: BrokerThread, version: int) -> None:
    sub = subscriber(sys_broker.port, unique_id(), "$SYS/#")
    client = connect(sys_broker.port, unique_id(), version=version)
    reason = client.publish_acked("$SYS/x", b"forged", qos=1)
    assert reason == (0x87 if version == 5 else 0)  # v5: Not authorized
    client.publish("$SYS/broker/version", b"forged too")
    client.ping()
    # Only broker-made $SYS updates arrive; read through the retained ones and a bit more.
    deadline = time.monotonic() + 0.5
    while (message := sub.read(max(0.0, deadline - time.monotonic()))) is not None:
        assert b"forged" not in message.payload, message
