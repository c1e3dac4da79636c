"""`edge-broker streams list|show|delete` and `edge-broker replay` (NDJSON), as an operator
runs them: through the running broker's admin socket, and from the store file once it stopped.

The broker is a subprocess (tests/integration/brokerprocess.py) configured with a stream;
messages are published with paho-mqtt v5. The commands run in this process (`cli.main`).
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_in_process

pytestmark = needs_console_script

CONFIG = """
[storage]
durability = "os"

[[streams]]
name = "telemetry"
filter = "sensors/#"
"""


def run(config: Path, *argv: str) -> tuple[int, str, str]:
    return run_in_process(*argv, "--config", str(config))


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def publish(port: int) -> datetime:
    """Four messages to the stream and one elsewhere; returns a time between the 2nd and 3rd."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = "text/plain"
        properties.UserProperty = [("site", "north")]
        client.publish("sensors/a", b"hello", 1, properties=properties).wait_for_publish(5)
        client.publish("sensors/b", b"\xff\x00binary", 0, retain=True).wait_for_publish(5)
        client.publish("sensors/b", b"flush", 1).wait_for_publish(5)  # acked: all stored
        boundary = datetime.now(UTC)
        client.publish("elsewhere", b"not recorded", 1).wait_for_publish(5)
        client.publish("sensors/a", b"later", 2).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return boundary


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "edge-broker.toml"
    data_dir = tmp_path / "data"
    config.write_text(CONFIG + f'\n[broker]\ndata_dir = "{data_dir}"\n')
    return config, data_dir


def check_replay(config: Path, boundary: datetime) -> None:
    code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "1")
    assert code == 0, err
    rows = ndjson(out)
    assert [r["offset"] for r in rows] == [1, 2, 3, 4]
    first, second = rows[0], rows[1]
    assert first["topic"] == "sensors/a" and first["payload"] == "hello"
    assert first["payload_encoding"] == "utf-8" and first["qos"] == 1
    assert first["retain"] is False
    assert first["properties"] == {"content_type": "text/plain",
                                   "user_properties": [["site", "north"]]}
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-12-06T02:10:00.123Z")
    assert second["payload_encoding"] == "base64" and second["retain"] is True
    assert base64.b64decode(second["payload"]) == b"\xff\x00binary"
    assert second["properties"] == {}
    code, out, _ = run(config, "replay", "--stream", "telemetry", "--at",
                       boundary.isoformat().replace("+00:00", "Z"))
    assert [r["payload"] for r in ndjson(out)] == ["later"]
    code, out, _ = run(config, "replay", "--stream", "telemetry", "--since", "1h",
                       "--topic", "sensors/b", "--limit", "1")
    assert [r["offset"] for r in ndjson(out)] == [2]
    code, _, err = run(config, "replay", "--stream", "nope", "--from", "1")
    assert code == 1 and "nope" in err


def check_list(config: Path, messages: int) -> None:
    code, out, err = run(config, "streams", "list", "--json")
    assert code == 0, err
    (stream,) = json.loads(out)["streams"]
    assert stream["name"] == "telemetry" and stream["messages"] == messages
    if messages:
        assert (stream["first_offset"], stream["last_offset"]) == (1, 4)
        assert stream["oldest_at"] is not None
    code, out, _ = run(config, "streams", "show", "telemetry")
    assert code == 0 and out.splitlines()[0].split() == ["STREAM", "FIRST", "LAST", "MESSAGES",
                                                         "BYTES", "OLDEST"]


def test_streams_and_replay_from_the_running_broker_and_from_the_file(
        setup: tuple[Path, Path]) -> None:
    config, data_dir = setup
    broker = BrokerProcess(data_dir, "--config", str(config)).wait_listening()
    try:
        boundary = publish(broker.port)
        check_list(config, 4)
        check_replay(config, boundary)
    finally:
        assert broker.stop() == 0
    check_list(config, 4)  # from the file now
    check_replay(config, boundary)


def test_delete_asks_unless_yes(setup: tuple[Path, Path]) -> None:
    config, data_dir = setup
    broker = BrokerProcess(data_dir, "--config", str(config)).wait_listening()
    try:
        publish(broker.port)
        code, _, err = run(config, "streams", "delete", "telemetry")  # stdin: no terminal
        assert code == 1 and "--yes" in err
        check_list(config, 4)
        code, out, err = run(config, "streams", "delete", "telemetry", "--yes")
        assert code == 0, err
        check_list(config, 0)
        code, out, _ = run(config, "replay", "--stream", "telemetry", "--from", "earliest")
        assert code == 0 and out == ""
    finally:
        assert broker.stop() == 0


def test_republish_under_a_prefix_through_the_running_broker(setup: tuple[Path, Path]) -> None:
    config, data_dir = setup
    broker = BrokerProcess(data_dir, "--config", str(config)).wait_listening()
    try:
        publish(broker.port)
        received: list[tuple[str, bytes, Any]] = []
        got_all = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch",
                             protocol=mqtt.MQTTv5)

        def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
            received.append((message.topic, message.payload,
                             getattr(message.properties, "ContentType", None)))
            if len(received) == 2:
                got_all.set()

        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.subscribe("again/#", 1)
            assert subscribed.wait(5)
            code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "1",
                                 "--topic", "sensors/a", "--republish", "again")
            assert code == 0, err
            assert "republished 2 message(s)" in out
            assert got_all.wait(5)
        finally:
            client.disconnect()
            client.loop_stop()
        assert received == [("again/sensors/a", b"hello", "text/plain"),
                            ("again/sensors/a", b"later", None)]
    finally:
        assert broker.stop() == 0
    code, _, err = run(config, "replay", "--stream", "telemetry", "--from", "1",
                       "--republish", "again")
    assert code == 2 and "running" in err
