"""`edge-broker replay --bridge NAME`: what a bridge sent, read back from the central log
(a real nats-server with JetStream, a real tansu), as an operator whose gateway lost its disk
runs it: the bridge's own configuration file, NDJSON out, the options of `replay --stream`.

The history is written by the bridges' own sinks (JetStreamSink, KafkaSink), so the headers
are the ones a gateway sends. The commands run in this process (`cli.main`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")

from edge_broker.bridge.base import BridgeMessage
from edge_broker.config import load_config
from tests.bridge.servers import NatsServer, Tansu
from tests.integration.brokerprocess import BrokerProcess, needs_console_script, run_in_process

STORE_ID = "5eed0000000000c3"
T0 = 1_765_000_000.0


def run(config: Path, *argv: str) -> tuple[int, str, str]:
    return run_in_process(*argv, "--config", str(config))


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def history() -> list[BridgeMessage]:
    """What the gateway sent: 5 readings, one odd topic with binary payload and v5 props."""
    out = [BridgeMessage(offset=o, topic=f"sensors/t{o % 2}", payload=f"r{o}".encode(), qos=1,
                         publish_time=T0 + o, client_id="dev1") for o in range(1, 6)]
    out.append(BridgeMessage(offset=6, topic="/room 1/v1.2", payload=b"\xff\x00", qos=2,
                             retain=True, publish_time=T0 + 6, client_id="dev2",
                             content_type="application/octet-stream",
                             user_properties=(("k", "v"), ("k", "w"))))
    out.append(BridgeMessage(offset=7, topic="alarms/fire", payload="é".encode(), qos=1,
                             publish_time=T0 + 7, payload_utf8=True))
    return out


def write_config(tmp_path: Path, bridge_toml: str) -> Path:
    config = tmp_path / "edge-broker.toml"
    config.write_text(f'[broker]\ndata_dir = "{tmp_path / "data"}"\ngateway_id = "gw7"\n\n'
                      f"{bridge_toml}")
    return config


def jetstream_toml(url: str) -> str:
    return (f'[[bridges]]\nname = "central"\nkind = "jetstream"\nservers = ["{url}"]\n'
            'uplink = ["#"]\nsubject_prefix = "site1.gw7"\njetstream_stream = "EDGE"\n'
            'stream_subjects = ["site1.>"]\n'
            "enabled = false\n")


def kafka_toml(bootstrap: str) -> str:
    return (f'[[bridges]]\nname = "lake"\nkind = "kafka"\nservers = ["{bootstrap}"]\n'
            'idempotence = false\nenabled = false\n'
            'topic_map = [{ filter = "alarms/#", topic = "edge.alarms" },\n'
            '             { filter = "#", topic = "edge.telemetry" }]\n')


async def send_jetstream(config: Path, extra: list[BridgeMessage] | None = None) -> None:
    from edge_broker.bridge.jetstream import JetStreamSink

    (bridge,) = load_config(config).bridges
    sink = JetStreamSink(bridge, gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    try:
        batch = history() + (extra or [])
        assert await sink.send(batch) == len(batch)
    finally:
        await sink.close()


async def send_other_gateway(url: str) -> None:
    """Another gateway's message in the same (shared) stream: not ours to replay."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish("site1.gw8.sensors.t0", b"not mine")
    finally:
        await nc.close()


def test_jetstream_history_back_as_ndjson(nats_server: NatsServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, jetstream_toml(nats_server.url))
    asyncio.run(send_jetstream(config))
    asyncio.run(send_other_gateway(nats_server.url))

    code, out, err = run(config, "replay", "--bridge", "central", "--from", "earliest")
    assert (code, err) == (0, "")
    rows = ndjson(out)
    assert [r["offset"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]  # stream sequences
    assert [r["topic"] for r in rows] == [m.topic for m in history()]
    assert rows[0] == {"offset": 1, "time": "2025-12-06T05:46:41.000Z", "topic": "sensors/t1",
                       "qos": 1, "retain": False, "payload": "r1", "payload_encoding": "utf-8",
                       "properties": {}, "message_id": f"gw7-{STORE_ID}-1"}
    odd = rows[5]
    assert (odd["topic"], odd["qos"], odd["retain"]) == ("/room 1/v1.2", 2, True)
    assert base64.b64decode(odd["payload"]) == b"\xff\x00"
    assert odd["payload_encoding"] == "base64"
    assert odd["properties"] == {"content_type": "application/octet-stream",
                                 "user_properties": [["k", "v"], ["k", "w"]]}
    assert rows[6]["properties"] == {"payload_format_indicator": 1}
    assert rows[6]["payload"] == "é"

    # --from a sequence, --topic, --limit: as replay --stream.
    code, out, _ = run(config, "replay", "--bridge", "central", "--from", "3",
                       "--topic", "sensors/+", "--limit", "2")
    assert code == 0
    assert [(r["offset"], r["topic"]) for r in ndjson(out)] == [(3, "sensors/t1"),
                                                               (4, "sensors/t0")]
    code, out, _ = run(config, "replay", "--bridge", "central", "--from", "latest")
    assert (code, out) == (0, "")
    # --since: the server's store time (everything was stored in the last hour).
    code, out, _ = run(config, "replay", "--bridge", "central", "--since", "1h",
                       "--topic", "alarms/#")
    assert [r["offset"] for r in ndjson(out)] == [7]
    future = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat().replace("+00:00", "Z")
    code, out, _ = run(config, "replay", "--bridge", "central", "--at", future)
    assert (code, out) == (0, "")


def test_replay_bridge_refusals(nats_server: NatsServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, jetstream_toml(nats_server.url)
                          + '\n[[bridges]]\nname = "cloud"\nkind = "mqtt"\n'
                            'servers = ["mqtt://127.0.0.1:1"]\ntopics = ["# out 1"]\n')
    code, _, err = run(config, "replay", "--bridge", "nope", "--from", "earliest")
    assert code == 1 and "no bridge 'nope'" in err and "central, cloud" in err
    code, _, err = run(config, "replay", "--bridge", "cloud", "--from", "earliest")
    assert code == 1 and "keeps no history" in err
    code, _, err = run(config, "replay", "--bridge", "central", "--from", "earliest")
    assert code == 1 and "stream 'EDGE' does not exist" in err  # nothing sent yet
    code, _, err = run(config, "replay", "--bridge", "central", "--stream", "x",
                       "--from", "1")
    assert code == 2 and "not allowed with" in err


def send_kafka(config: Path) -> None:
    from edge_broker.bridge.kafka import KafkaSink

    async def main() -> None:
        (bridge,) = load_config(config).bridges
        sink = KafkaSink(bridge, gateway_id="gw7", store_id=STORE_ID)
        await sink.start()
        try:
            assert await sink.send(history()) == 7
        finally:
            await sink.close()

    asyncio.run(main())


def test_kafka_history_back_as_ndjson(tansu: Tansu, tmp_path: Path) -> None:
    config = write_config(tmp_path, kafka_toml(tansu.bootstrap))
    send_kafka(config)

    code, out, err = run(config, "replay", "--bridge", "lake", "--from", "earliest")
    assert (code, err) == (0, "")
    rows = ndjson(out)
    assert len(rows) == 7
    # Partitions one after another (sorted by Kafka topic, then partition), each in offset
    # order; tansu spreads the keys (MQTT topics) over partitions.
    places = [(r["kafka_topic"], r["partition"], r["offset"]) for r in rows]
    assert places == sorted(places)
    assert {(r["kafka_topic"], r["topic"]) for r in rows} == {
        ("edge.alarms", "alarms/fire"), ("edge.telemetry", "sensors/t0"),
        ("edge.telemetry", "sensors/t1"), ("edge.telemetry", "/room 1/v1.2")}
    by_id = {r["message_id"]: r for r in rows}
    assert sorted(by_id) == sorted(f"gw7-{STORE_ID}-{o}" for o in range(1, 8))
    first = by_id[f"gw7-{STORE_ID}-1"]
    assert (first["topic"], first["time"], first["payload"]) == (
        "sensors/t1", "2025-12-06T05:46:41.000Z", "r1")
    odd = by_id[f"gw7-{STORE_ID}-6"]
    assert (odd["topic"], odd["qos"], odd["retain"], odd["payload_encoding"]) == (
        "/room 1/v1.2", 2, True, "base64")
    assert odd["properties"]["user_properties"] == [["k", "v"], ["k", "w"]]

    # --from N starts every partition at offset N; --topic and --limit as replay --stream.
    code, out, _ = run(config, "replay", "--bridge", "lake", "--from", "1",
                       "--topic", "sensors/#", "--limit", "2")
    expected = [r for r in rows if r["offset"] >= 1 and r["topic"].startswith("sensors/")]
    assert ndjson(out) == expected[:2] and len(expected) >= 2
    code, out, _ = run(config, "replay", "--bridge", "lake", "--since", "1h",
                       "--topic", "alarms/fire")
    assert [r["payload"] for r in ndjson(out)] == ["é"]
    future = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat().replace("+00:00", "Z")
    code, out, _ = run(config, "replay", "--bridge", "lake", "--at", future)
    assert (code, out) == (0, "")


@needs_console_script
def test_republish_into_the_running_broker(nats_server: NatsServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, jetstream_toml(nats_server.url))
    asyncio.run(send_jetstream(config))
    code, _, err = run(config, "replay", "--bridge", "central", "--from", "1",
                       "--republish", "restored")
    assert code == 2 and "needs the broker running" in err

    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening()
    try:
        got: list[tuple[str, bytes, list[tuple[str, str]]]] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch",
                             protocol=mqtt.MQTTv5)
        client.on_message = lambda c, u, m: got.append(
            (m.topic, m.payload, list(getattr(m.properties, "UserProperty", []))))
        done = []
        client.on_subscribe = lambda *a: done.append(True)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.subscribe("restored/#", 1)
            deadline = time.monotonic() + 10
            while not done and time.monotonic() < deadline:
                time.sleep(0.01)
            code, out, err = run(config, "replay", "--bridge", "central", "--from", "earliest",
                                 "--topic", "#", "--republish", "restored")
            assert (code, err) == (0, "")
            assert out == "republished 7 message(s) of bridge central under restored/\n"
            deadline = time.monotonic() + 10
            while len(got) < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            client.loop_stop()
            client.disconnect()
        assert [t for t, _, _ in got] == ["restored/" + m.topic for m in history()]
        assert got[5][1:] == (b"\xff\x00", [("k", "v"), ("k", "w")])
    finally:
        broker.stop()
