"""An `mqtt` bridge through the real broker (a subprocess) to a real mosquitto: what a message
carries across, and at which QoS.

- MQTT 5 properties cross the bridge unaltered both ways (payload format, content type,
  response topic, correlation data, user properties; the Message Expiry Interval as the time
  left): a request goes up with its response topic and correlation data, the response comes
  back down with them [MQTT-3.3.2-4] [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-20] (5.0).
  Before: only the user properties went down; response topic, correlation data and expiry
  did not go up.
- A message whose expiry passed while the upstream was down is not sent when it comes back,
  and is counted in the bridge's `expired`; one still valid goes with the interval left
  [MQTT-3.3.2-5] [MQTT-3.3.2-6] (5.0). Before: sent, without an expiry.
- A message that two "out" lines send goes at the highest of their QoS (as overlapping
  subscriptions deliver, [MQTT-3.3.5-1] (3.1.1)) to the first line's remote topic. Before:
  the first line's QoS.

Waiting is polling with a deadline (tests/bridge/gateway.py `wait_until`) or for messages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.bridge.gateway import Gateway, ThreadedProxy, wait_until
from tests.bridge.servers import HOST, Mosquitto
from tests.bridge.test_mqtt_upstream import Remote
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script


def mqtt_bridge(address: str, topics: list[str], version: str = "5") -> str:
    lines = ", ".join(f"'{line}'" for line in topics)
    return ('[[bridges]]\nname = "cloud"\nkind = "mqtt"\n'
            f'servers = ["mqtt://{address}"]\nmqtt_version = "{version}"\n'
            f"topics = [{lines}]\n"
            'backoff_initial = "1s"\nbackoff_max = "1s"\n')


def publish(client: mqtt.Client, topic: str, payload: bytes, qos: int = 1,
            properties: Properties | None = None) -> None:
    info = client.publish(topic, payload, qos, properties=properties)
    if qos:
        info.wait_for_publish(10)
        assert info.is_published()


def request_properties(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def present(message: mqtt.MQTTMessage) -> dict[str, Any]:
    props = message.properties
    names = ("PayloadFormatIndicator", "ContentType", "ResponseTopic", "CorrelationData",
             "UserProperty", "MessageExpiryInterval")
    return {name: getattr(props, name) for name in names if hasattr(props, name)}




def test_properties_cross_the_bridge_both_ways_for_a_request_and_its_response(
        tmp_path: Path, mosquitto: Mosquitto, started: list[Any]) -> None:
    gateway = Gateway(tmp_path, mqtt_bridge(f"{HOST}:{mosquitto.port}",
                                            ['req/# out 1 "" site1/', 'rsp/# in 1'])).start()
    started.append(gateway)
    responder = Remote(mosquitto.port, "responder")  # the cloud side answering requests
    started.append(responder)
    responder.subscribe("site1/req/#", 1)
    device = Remote(gateway.port, "dev1")
    started.append(device)
    device.subscribe("rsp/#", 1)
    wait_until(lambda: gateway.status("cloud")["connected"], 20, "bridge connected")

    publish(device.client, "req/temp", b"{}", properties=request_properties(
        PayloadFormatIndicator=1, ContentType="application/json", ResponseTopic="rsp/dev1",
        CorrelationData=b"\x00corr-1", UserProperty=[("k", "v"), ("k", "v2")],
        MessageExpiryInterval=3600))
    (request,) = responder.wait_for(1)
    seen = present(request)
    assert request.topic == "site1/req/temp"
    assert 3590 <= seen.pop("MessageExpiryInterval") <= 3600
    assert seen == {"PayloadFormatIndicator": 1, "ContentType": "application/json",
                    "ResponseTopic": "rsp/dev1", "CorrelationData": b"\x00corr-1",
                    "UserProperty": [("k", "v"), ("k", "v2")]}

    # The answer goes to the response topic as received, with the correlation data.
    responder.client.publish(seen["ResponseTopic"], b"21.5", 1, properties=request_properties(
        PayloadFormatIndicator=1, ContentType="text/plain",
        CorrelationData=seen["CorrelationData"], ResponseTopic="site1/req/ack",
        UserProperty=[("unit", "C")], MessageExpiryInterval=600)).wait_for_publish(10)
    (response,) = device.wait_for(1)
    got = present(response)
    assert (response.topic, response.payload) == ("rsp/dev1", b"21.5")
    assert 590 <= got.pop("MessageExpiryInterval") <= 600
    assert got == {"PayloadFormatIndicator": 1, "ContentType": "text/plain",
                   "ResponseTopic": "site1/req/ack", "CorrelationData": b"\x00corr-1",
                   "UserProperty": [("unit", "C")]}


def test_a_message_that_expired_during_an_outage_is_not_sent_and_is_counted(
        tmp_path: Path, mosquitto: Mosquitto, started: list[Any]) -> None:
    proxy = ThreadedProxy(HOST, mosquitto.port)
    started.append(proxy)
    gateway = Gateway(tmp_path, mqtt_bridge(proxy.address, ['e/# out 1 "" site1/'])).start()
    started.append(gateway)
    cloud = Remote(mosquitto.port, "cloud")
    started.append(cloud)
    cloud.subscribe("site1/e/#", 1)
    wait_until(lambda: gateway.status("cloud")["connected"], 20, "bridge connected")

    proxy.refuse()  # the upstream is down: the link drops, reconnecting fails
    proxy.cut()
    wait_until(lambda: not gateway.status("cloud")["connected"], 20, "bridge disconnected")
    device = Remote(gateway.port, "dev1")
    started.append(device)
    publish(device.client, "e/x", b"short-lived",
            properties=request_properties(MessageExpiryInterval=1))
    expired_at = time.time() + 1  # the broker took it before its PUBACK: expires before this
    publish(device.client, "e/x", b"long-lived",
            properties=request_properties(MessageExpiryInterval=600))
    publish(device.client, "e/x", b"no expiry")
    # The outage outlasts the first message's expiry (the clock is what is waited for).
    wait_until(lambda: time.time() > expired_at + 0.5, 10, "the expiry passed")
    assert not gateway.status("cloud")["connected"]
    proxy.forward()

    got = cloud.wait_for(2, 30)  # in order on one connection: the last one comes last
    assert [m.payload for m in got] == [b"long-lived", b"no expiry"]
    interval = got[0].properties.MessageExpiryInterval  # the time left [MQTT-3.3.2-6]
    assert 580 <= interval < 600
    assert not hasattr(got[1].properties, "MessageExpiryInterval")
    def counted() -> dict[str, Any] | None:
        # The figures move once the window's acknowledgements are in (right after the above).
        status = gateway.status("cloud")
        return status if status["expired"] + status["forwarded"] >= 3 else None

    status = wait_until(counted, 10, "the window counted")
    assert (status["expired"], status["forwarded"]) == (1, 2)


def test_overlapping_out_lines_send_at_their_highest_qos_to_the_first_lines_topic(
        tmp_path: Path, mosquitto: Mosquitto, started: list[Any]) -> None:
    lines = ['m/# out 0 "" a/', 'm/x out 2 "" b/', 'n/x out 2 "" c/', 'n/# out 0 "" d/']
    gateway = Gateway(tmp_path, mqtt_bridge(f"{HOST}:{mosquitto.port}", lines)).start()
    started.append(gateway)
    cloud = Remote(mosquitto.port, "cloud")
    started.append(cloud)
    for prefix in "abcd":
        cloud.subscribe(f"{prefix}/#", 2)
    wait_until(lambda: gateway.status("cloud")["connected"], 20, "bridge connected")
    device = Remote(gateway.port, "dev1")
    started.append(device)
    publish(device.client, "m/x", b"m/x at 2", 2)  # lines 1 (QoS 0) and 2 (QoS 2)
    publish(device.client, "m/x", b"m/x at 1", 1)  # its own QoS is lower: 1
    publish(device.client, "m/y", b"m/y at 2", 2)  # line 1 only: 0
    publish(device.client, "n/x", b"n/x at 2", 2)  # lines 3 (QoS 2) and 4 (QoS 0)
    got = cloud.wait_for(4)
    wait_until(lambda: gateway.status("cloud")["forwarded"] == 4, 10, "4 forwarded")
    assert sorted((m.payload, m.topic, m.qos) for m in cloud.received) == [
        (b"m/x at 1", "a/m/x", 1), (b"m/x at 2", "a/m/x", 2), (b"m/y at 2", "a/m/y", 0),
        (b"n/x at 2", "c/n/x", 2)]
    assert len(got) == 4


def test_sys_values_go_up_on_a_sys_topic_line(tmp_path: Path, mosquitto: Mosquitto,
                                              started: list[Any]) -> None:
    # `topic $SYS/broker/# out` is how mosquitto users watch their gateways from the
    # centre. Before, the line was accepted and nothing was ever sent ($SYS values did not
    # reach the log a bridge reads).
    gateway = Gateway(tmp_path, mqtt_bridge(f"{HOST}:{mosquitto.port}",
                                            ['$SYS/broker/uptime out 0 "" site1/gw7/']))
    text = gateway.config.read_text()
    gateway.config.write_text(text.replace('gateway_id = "gw7"\n',
                                           'gateway_id = "gw7"\nsys_interval = 1\n'))
    cloud = Remote(mosquitto.port, "cloud")
    started.append(cloud)
    cloud.subscribe("site1/gw7/$SYS/#", 0)
    gateway.start()
    started.append(gateway)
    (first, *_) = cloud.wait_for(1)
    assert first.topic == "site1/gw7/$SYS/broker/uptime"
    assert first.payload.endswith(b" seconds")
