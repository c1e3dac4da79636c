"""`edge-broker check-config` lists the configured bridges like the other sections: name,
kind, servers, and what goes up and comes down (uplink filters and where they go, downlink
sources and where they land); a disabled bridge is marked, a password is never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_broker import cli

CONFIG = """
[broker]
gateway_id = "gw7"

[[bridges]]
name = "central"
kind = "jetstream"
servers = ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
uplink = ["sensors/#", "alarms/#"]
subject_prefix = "site1.gw7"
jetstream_stream = "EDGE"
stream_replicas = 3
downlink = ["site1.gw7.cmd.>"]
max_backlog_bytes = 1048576

[[bridges]]
name = "lake"
kind = "kafka"
servers = ["10.0.0.5:9092"]
topic_map = [{ filter = "alarms/#", topic = "edge.alarms" },
             { filter = "#", topic = "edge.telemetry" }]
downlink = ["edge.cmd.gw7"]
sasl_mechanism = "SCRAM-SHA-512"
username = "gw7"
password = "s3cret-kafka"

[[bridges]]
name = "cloud"
kind = "mqtt"
servers = ["mqtts://broker.example.com:8883"]
topics = ['sensors/# out 1 "" site1/gw7/', 'cmd/# in']
username = "gw7"
password = "s3cret-mqtt"

[[bridges]]
name = "old"
kind = "mqtt"
enabled = false
servers = ["mqtt://10.0.0.9"]
topics = ["sensors/#"]
"""


def test_check_config_lists_the_bridges(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")
    path = tmp_path / "edge-broker.toml"
    path.write_text(CONFIG)
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}: OK"
    bridges = lines[lines.index("bridges (gateway_id gw7):"):]
    assert bridges[1:] == [
        "  central: jetstream, servers nats://10.0.0.5:4222, nats://10.0.0.6:4222, "
        "max_backlog_bytes 1048576 bytes",
        "    uplink: sensors/#, alarms/# -> site1.gw7.<topic> in stream EDGE (replicas 3 "
        "when created)",
        "    downlink: site1.gw7.cmd.> (stream EDGE, durable gw7-central) -> <topic>",
        "  lake: kafka, servers 10.0.0.5:9092, max_backlog_bytes unlimited",
        "    uplink: alarms/#, # -> topic_map [alarms/# -> edge.alarms, # -> edge.telemetry], "
        "key topic",
        "    downlink: edge.cmd.gw7 (group edge-broker-gw7-lake) -> mqtt-topic header or "
        "cmd/<kafka topic>",
        "  cloud: mqtt 5, servers mqtts://broker.example.com:8883, TLS, "
        "max_backlog_bytes unlimited",
        "    uplink: sensors/# -> site1/gw7/sensors/# (QoS 1)",
        # A downlink line written without a QoS is subscribed at QoS 2.
        "    downlink: cmd/# -> cmd/# (QoS 2)",
        "  old: mqtt, disabled (enabled = false)",
    ]
    assert "s3cret" not in out


def test_check_config_without_bridges_says_none(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "edge-broker.toml"
    path.write_text('[storage]\npersistence = "sqlite"\n')
    assert cli.main(["check-config", str(path)]) == 0
    assert "bridges: none" in capsys.readouterr().out.splitlines()
