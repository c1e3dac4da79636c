"""`edge-broker replay` keeps a message's Message Expiry Interval: in the NDJSON properties (as
published), and `--republish` sends a message on with the interval left, and not at all once
it expired [MQTT-3.3.2-5] [MQTT-3.3.2-6] (5.0). Before, the interval was missing from both:
the log keeps it as the time the message expires, outside its properties."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.system.test_streams_cli import CONFIG, ndjson, run

pytestmark = needs_console_script


def expiring(seconds: int) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.MessageExpiryInterval = seconds
    return properties


def test_replay_and_republish_keep_the_message_expiry(tmp_path: Path) -> None:
    config, data_dir = tmp_path / "edge-broker.toml", tmp_path / "data"
    config.write_text(CONFIG + f'\n[broker]\ndata_dir = "{data_dir}"\n')
    broker = BrokerProcess(data_dir, "--config", str(config)).wait_listening()
    try:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub",
                             protocol=mqtt.MQTTv5)
        received: list[mqtt.MQTTMessage] = []
        got = threading.Event()
        subscribed = threading.Event()
        client.on_message = lambda c, u, m: (received.append(m), got.set())
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.subscribe("again/#", 1)
            assert subscribed.wait(5)
            client.publish("sensors/a", b"soon gone", 1,
                           properties=expiring(1)).wait_for_publish(5)
            published = time.time()
            client.publish("sensors/a", b"an hour", 1,
                           properties=expiring(3600)).wait_for_publish(5)
            code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "1")
            assert code == 0, err
            assert [r["properties"].get("message_expiry_interval") for r in ndjson(out)] == [
                1, 3600]
            while time.time() < published + 1.5:  # not synchronisation: the first expires
                time.sleep(0.05)
            code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "1",
                                 "--republish", "again")
            assert code == 0, err
            assert got.wait(5)
        finally:
            client.disconnect()
            client.loop_stop()
        message: Any = received[0]
        assert [m.payload for m in received] == [b"an hour"]
        assert 3590 <= message.properties.MessageExpiryInterval <= 3600
    finally:
        assert broker.stop() == 0
