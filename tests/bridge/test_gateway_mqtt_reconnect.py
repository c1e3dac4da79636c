"""An `mqtt` bridge through the real broker (a subprocess) across reconnects: its local state
topic follows the link at once (last test), and it keeps its in-flight QoS 2 messages
across a reconnect: they go again with their packet identifiers and DUP [MQTT-4.4.0-1], so
an upstream that resumed the session does not deliver them twice.

The upstream is a second edge-broker (in-process), which delivers a QoS 2 message when its
PUBLISH arrives and keeps the identifier until PUBREL (4.3.3, method A): a resend under a new
identifier is a new message to it. Before the fix, each reconnect of the broker's bridge
started a new connection object with nothing in flight, which resent the message under the
next free identifier of its own (1 here: the message in flight had 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bridge.gateway import Gateway, ThreadedProxy, wait_until
from tests.bridge.servers import HOST, Mosquitto
from tests.bridge.test_gateway_mqtt_properties import mqtt_bridge, publish
from tests.bridge.test_mqtt_upstream import Remote
from tests.conftest import BrokerThread
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script




@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_a_qos2_message_in_flight_is_not_doubled_by_a_reconnect(
        tmp_path: Path, broker: BrokerThread, started: list[Any], version: str) -> None:
    proxy = ThreadedProxy(HOST, broker.port)
    started.append(proxy)
    (tmp_path / "gateway").mkdir()  # the upstream broker has tmp_path/data
    gateway = Gateway(tmp_path / "gateway", mqtt_bridge(proxy.address, ['q/# out 2 "" site1/'],
                                            version)).start()
    started.append(gateway)
    cloud = Remote(broker.port, "cloud")
    started.append(cloud)
    cloud.subscribe("site1/q/#", 2)
    wait_until(lambda: gateway.status("cloud")["connected"], 20, "bridge connected")
    device = Remote(gateway.port, "dev1")
    started.append(device)
    for payload in (b"first", b"second"):  # identifiers 1 and 2 are used and done
        publish(device.client, "q/x", payload, 2)
    cloud.wait_for(2)
    wait_until(lambda: gateway.status("cloud")["forwarded"] == 2, 30, "2 forwarded")

    proxy.hold_replies()  # the upstream gets the PUBLISH; its PUBREC stays in the proxy
    publish(device.client, "q/x", b"once", 2)
    cloud.wait_for(3)  # delivered upstream on arrival
    proxy.cut()  # the link drops with the message in flight
    proxy.forward()
    wait_until(lambda: gateway.status("cloud")["forwarded"] == 3, 30, "sent again, completed")
    publish(device.client, "q/x", b"after", 2)  # behind anything the resend delivered
    cloud.wait_for(4)
    assert [m.payload for m in cloud.received] == [b"first", b"second", b"once", b"after"]


def test_the_local_state_topic_follows_the_link_at_once(
        tmp_path: Path, mosquitto: Mosquitto, started: list[Any]) -> None:
    # `local_state_topic` is published when the link comes and goes, as mosquitto's bridge
    # publishes its state: not only with the $SYS values (an hour apart here), between
    # which an outage would not show.
    proxy = ThreadedProxy(HOST, mosquitto.port)
    started.append(proxy)
    gateway = Gateway(tmp_path, mqtt_bridge(proxy.address, ['s/# out 1']))
    text = gateway.config.read_text()
    gateway.config.write_text(text.replace('gateway_id = "gw7"\n',
                                           'gateway_id = "gw7"\nsys_interval = 3600\n'))
    gateway.start()
    started.append(gateway)
    watcher = Remote(gateway.port, "watcher")
    started.append(watcher)
    watcher.subscribe("$SYS/broker/bridges/cloud/state", 1)

    def state_is(value: bytes) -> bool:
        return bool(watcher.received) and watcher.received[-1].payload == value

    wait_until(lambda: state_is(b"1"), 5, "state 1 once connected")
    proxy.refuse()  # the upstream goes away
    proxy.cut()
    wait_until(lambda: state_is(b"0"), 5, "state 0 once the link is lost")
    proxy.forward()
    wait_until(lambda: state_is(b"1"), 5, "state 1 once connected again")
