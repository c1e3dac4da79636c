"""Issue 9, "Downlink" over an MQTT upstream, through the real broker (a subprocess with an
`mqtt` bridge) and a real mosquitto as the upstream, reached through a TCP proxy.

MQTT 5 and 3.1.1 (clean session 0; mosquitto's bridge marker). The downlink line is
written without a QoS (`cmd/# in`): a downlink line's default QoS is 2,
so the upstream queues the commands for the gateway's session while it is away and each
one is published into the local broker exactly once. A stream on `cmd/#` in the gateway
records every local publish on those topics, so "exactly once into the local broker" is
counted independently of any subscriber.

- Commands published upstream at QoS 2 while the gateway is stopped arrive after it comes
  back, once each.
- A SIGKILL between the local commit and the remote PUBREC (the proxy drops what the
  gateway sends, so the upstream never gets the PUBRECs): after the restart the upstream
  resends the commands with DUP, the gateway recognises the identifiers it stored with them
  and does not publish them again.
- The upstream link dropping while the bridge has nothing to send up: the bridge connects
  again by itself and the downlink goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_broker import cli
from tests.bridge.gateway import Gateway, ThreadedProxy, wait_until
from tests.bridge.servers import HOST, Mosquitto
from tests.bridge.test_mqtt_upstream import Remote
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

STREAM = '\n[[streams]]\nname = "commands"\nfilter = "cmd/#"\n'


def mqtt_bridge(address: str, version: str = "5") -> str:
    return ('[[bridges]]\nname = "cloud"\nkind = "mqtt"\n'
            f'servers = ["mqtt://{address}"]\nmqtt_version = "{version}"\n'
            "topics = ['sensors/# out 1', 'cmd/# in']\n"  # no QoS: a downlink line's is 2
            'backoff_initial = "1s"\nbackoff_max = "1s"\n')


class Valve:
    """A device with a persistent session subscribed to cmd/# at QoS 1 (paho, MQTT 5)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="valve1",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.props = Properties(PacketTypes.CONNECT)
        self.props.SessionExpiryInterval = 3600

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append(message.payload)

    def connect(self, port: int, subscribe: bool = False) -> None:
        self.client.connect(HOST, port, clean_start=False, properties=self.props)
        self.client.loop_start()
        if subscribe:
            done = threading.Event()
            self.client.on_subscribe = lambda *args: done.set()
            self.client.subscribe("cmd/#", 1)
            assert done.wait(10), "SUBACK"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def has(self, payload: bytes) -> bool:
        with self._lock:
            return payload in self.got


def local_commands(config: Path) -> list[bytes]:
    """Every payload published into the gateway on cmd/#, once per publish (the stream)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["replay", "--stream", "commands", "--from", "earliest",
                         "--config", str(config)])
    assert (code, err.getvalue()) == (0, "")
    return [json.loads(line)["payload"].encode() for line in out.getvalue().splitlines()]


@contextlib.contextmanager
def setup(tmp_path: Path, mosquitto: Mosquitto, version: str = "5"
          ) -> Iterator[tuple[Gateway, ThreadedProxy, Remote, Valve]]:
    proxy = ThreadedProxy(HOST, mosquitto.port)
    gateway = Gateway(tmp_path, mqtt_bridge(proxy.address, version) + STREAM).start()
    cloud = Remote(mosquitto.port, "cloud")
    valve = Valve()
    try:
        valve.connect(gateway.port, subscribe=True)
        # Connected: the gateway's session (and its QoS 2 subscription) exists upstream.
        wait_until(lambda: gateway.status("cloud")["connected"], 20, "bridge connected")
        yield gateway, proxy, cloud, valve
    finally:
        valve.disconnect()
        cloud.close()
        gateway.stop()
        proxy.close()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_commands_sent_while_the_gateway_is_away_arrive_once_across_a_sigkill(
        tmp_path: Path, mosquitto: Mosquitto, version: str) -> None:
    with setup(tmp_path, mosquitto, version) as (gateway, proxy, cloud, valve):
        # 1. Gateway stopped; 20 commands published upstream at QoS 2 meanwhile.
        valve.disconnect()
        gateway.stop()
        first = [f"open {k}".encode() for k in range(20)]
        for k, payload in enumerate(first):
            cloud.publish(f"cmd/valve{k % 2}", payload, qos=2)
        gateway.start()
        valve.connect(gateway.port)
        wait_until(lambda: all(valve.has(p) for p in first), 30, "the commands at the valve")
        assert sorted(local_commands(gateway.config)) == sorted(first)

        # 2. Killed after the local commit, before the upstream got the PUBRECs.
        proxy.drop_to_target()  # what the gateway sends upstream is lost from now on
        second = [f"close {k}".encode() for k in range(20)]
        for k, payload in enumerate(second):
            cloud.publish(f"cmd/valve{k % 2}", payload, qos=2)
        wait_until(lambda: gateway.status("cloud")["downlink_published"] == 40, 30,
                   "the second commands committed locally")
        gateway.kill()
        valve.disconnect()
        gateway.start()  # on a new port; the upstream resends the 20 with DUP
        valve.connect(gateway.port)
        wait_until(lambda: gateway.status("cloud")["downlink_duplicates"] == 20, 30,
                   "the resent commands recognised")
        # A marker sent after the restart arrives after any redelivery would have.
        cloud.publish("cmd/valve0", b"marker", qos=2)
        wait_until(lambda: valve.has(b"marker"), 30, "the marker")
        published = local_commands(gateway.config)
        status = gateway.status("cloud")
    # Exactly once into the local broker: the stream holds each command once.
    assert sorted(published) == sorted([*first, *second, b"marker"])
    assert status["downlink_published"] == 1  # since this start: the marker only


def test_the_downlink_comes_back_after_the_upstream_link_drops_while_idle(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    with setup(tmp_path, mosquitto) as (gateway, proxy, cloud, valve):
        cloud.publish("cmd/valve0", b"before", qos=2)
        wait_until(lambda: valve.has(b"before"), 30, "a command before the drop")
        connections = proxy.proxy.connections_accepted
        proxy.cut()  # nothing to send up: only the downlink notices
        wait_until(lambda: proxy.proxy.connections_accepted > connections, 30,
                   "the bridge connecting again")
        cloud.publish("cmd/valve0", b"after", qos=2)
        wait_until(lambda: valve.has(b"after"), 30, "a command after the drop")
        assert local_commands(gateway.config) == [b"before", b"after"]
