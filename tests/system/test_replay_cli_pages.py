"""`edge-broker replay` through the running broker: pages of any size come through the admin
socket, and a republish into the stream it reads (PREFIX/<topic> matches its filter) ends
after the messages there were when it started.

The broker is a subprocess (tests/integration/brokerprocess.py); messages are published with
paho-mqtt v5. `replay` runs in this process (`cli.main`), or as the console script where it
must be stopped should it not end.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_broker.server.streams import REPLAY_PAGE_MAX
from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_cli
from tests.system.test_streams_cli import CONFIG, ndjson, run

pytestmark = needs_console_script

def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1, each acknowledged: stored in the stream when this returns."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub",
                         protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, 1) for topic, payload in messages]
        for info in sent:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    config = tmp_path / "edge-broker.toml"
    data_dir = tmp_path / "data"
    config.write_text(CONFIG + f'\n[broker]\ndata_dir = "{data_dir}"\n')
    process = BrokerProcess(data_dir, "--config", str(config)).wait_listening()
    try:
        yield config, process
    finally:
        assert process.stop() == 0


def test_pages_over_64_kib_come_through_the_admin_socket(broker: Any) -> None:
    config, process = broker
    small = [(f"sensors/{n}", b"%d" % n + b"." * 150) for n in range(600)]
    big = b"\x01\xfe" * 40_000  # binary: 107 KB of base64, about 640 KB of JSON escapes
    text = "é".encode() * 35_000  # 70 KB of UTF-8, escaped by the broker's JSON
    publish(process.port, [*small, ("sensors/big", big), ("sensors/text", text)])
    code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "earliest",
                         "--limit", "400")
    assert code == 0, err
    assert [r["payload"] for r in ndjson(out)] == [p.decode() for _, p in small[:400]]
    code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "601",
                         "--limit", "1")
    assert code == 0, err
    (row,) = ndjson(out)
    assert (row["topic"], row["payload_encoding"]) == ("sensors/big", "base64")
    code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "earliest")
    assert code == 0, err
    rows = ndjson(out)
    assert [r["offset"] for r in rows] == list(range(1, 603))
    assert rows[-1]["payload"] == text.decode()


def test_a_republish_into_its_own_stream_ends(broker: Any) -> None:
    """sensors/again/<topic> matches sensors/#: each republished message lands in the stream
    being read; the command stops after those there were at its start (more than a page)."""
    config, process = broker
    count = REPLAY_PAGE_MAX + 200
    publish(process.port, [("sensors/bulk", b"%d" % n) for n in range(count)])
    try:
        result = run_cli("replay", "--stream", "telemetry", "--from", "earliest",
                         "--republish", "sensors/again", "--config", str(config), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("replay --republish into its own stream did not end within 60 s")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"republished {count} message(s) of stream telemetry under "
                             "sensors/again/\n")
    code, out, err = run(config, "streams", "show", "telemetry", "--json")
    assert code == 0, err
    assert json.loads(out)["stream"]["messages"] == 2 * count
    code, out, err = run(config, "replay", "--stream", "telemetry", "--from", "earliest",
                         "--topic", "sensors/again/#")
    assert code == 0, err
    rows = ndjson(out)
    assert [r["payload"] for r in rows] == [str(n) for n in range(count)]
    assert {r["topic"] for r in rows} == {"sensors/again/sensors/bulk"}
