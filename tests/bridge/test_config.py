"""[[bridges]] parsing: the deploy examples parse, and bad input gets an error naming file,
table and key."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_broker.bridge.config import known_keys, parse_bridges, require_extras
from edge_broker.bridge.topic_map import KafkaRoute, TopicLine
from edge_broker.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FILE = "/etc/edge-broker.toml"


def deploy(kind: str) -> dict[str, Any]:
    return tomllib.loads((REPO / "deploy" / f"bridge-{kind}.toml").read_text())


def parse(*tables: dict[str, Any]) -> Any:
    return parse_bridges(list(tables), file=FILE, gateway_id="gw7")


JS = {"name": "central", "kind": "jetstream", "servers": ["nats://127.0.0.1:4222"],
      "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE"}


@pytest.mark.parametrize("kind", ["jetstream", "kafka", "mqtt"])
def test_deploy_example_parses_and_shows_every_key(kind: str) -> None:
    text = (REPO / "deploy" / f"bridge-{kind}.toml").read_text()
    (bridge,) = parse_bridges(deploy(kind)["bridges"], file=FILE, gateway_id="gw7")
    assert bridge.kind == kind
    # Every key of this kind is written in the example (set or as "# key = default").
    for key in known_keys()[kind]:
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key


def test_jetstream_defaults() -> None:
    (bridge,) = parse(JS)
    assert bridge.jetstream is not None
    assert bridge.jetstream.stream_subjects == ("site1.gw7.>",)
    assert bridge.jetstream.downlink_durable == "gw7-central"
    assert bridge.downlink_identity == "bridge-central"
    assert bridge.tls.enabled is False and bridge.window == 256


def test_kafka_routes_and_default_uplink() -> None:
    (bridge,) = parse({"name": "k", "kind": "kafka", "servers": ["127.0.0.1:9092"],
                       "topic_map": [{"filter": "a/#", "topic": "ta"},
                                     {"filter": "#", "topic": "rest"}]})
    assert bridge.kafka is not None
    assert bridge.kafka.topic_map == (KafkaRoute("a/#", "ta"), KafkaRoute("#", "rest"))
    assert bridge.uplink == ("a/#", "#")
    assert bridge.kafka.idempotence is True and bridge.kafka.key == "topic"


def test_mqtt_topic_lines_give_uplink_and_downlink() -> None:
    (bridge,) = parse({"name": "up", "kind": "mqtt", "servers": ["mqtt://127.0.0.1:1883"],
                       "topics": ['s/# out 1 "" r/', "c/# in 2 l/ r/", "x both"]})
    assert bridge.mqtt is not None
    assert bridge.mqtt.topics[1] == TopicLine("c/#", "in", 2, "l/", "r/")
    assert bridge.uplink == ("s/#", "x")
    assert bridge.downlink == ("r/c/#", "x")
    assert bridge.mqtt.client_id == "gw7-up"
    assert (bridge.mqtt.round_robin, bridge.mqtt.primary_retry_s) == (False, 5)  # mosquitto's


@pytest.mark.parametrize(("table", "key", "words"), [
    ({**JS, "subject_prefix": "a.*"}, "subject_prefix", "without wildcards"),
    ({**JS, "stream_replicas": 7}, "stream_replicas", "from 1 to 5"),
    ({**JS, "downlink": ["other.cmd.>"]}, "downlink", "not under subject_prefix"),
    ({**JS, "servers": ["http://x:1"]}, "servers", "nats://host:port"),
    ({**JS, "topic_map": []}, "topic_map", 'belongs to "kafka" bridges'),
    ({**JS, "subjet_prefix": "x"}, "subjet_prefix", "did you mean subject_prefix"),
    ({**JS, "username": "u"}, "password", "go together"),
    ({**JS, "token": "t", "creds_file": "/c"}, "token", "choose one way"),
    ({**JS, "backoff_max": "1s", "backoff_initial": "5s"}, "backoff_max", "at least"),
    ({**JS, "tls": False, "tls_ca_file": "/ca"}, "tls", "asks for TLS"),
    ({k: v for k, v in JS.items() if k != "jetstream_stream"}, "jetstream_stream", "missing"),
    ({"name": "m", "kind": "mqtt", "servers": ["mqtt://h:1"], "topics": ["a/# sideways"]},
     "topics", "direction"),
    ({"name": "m", "kind": "mqtt", "servers": ["mqtt://h:1"], "topics": ["a"],
      "uplink": ["a"]}, "uplink", "topic lines"),
    ({"name": "m", "kind": "mqtt", "servers": ["mqtt://h:1"], "topics": ["a"],
      "round_robin": "yes"}, "round_robin", "true or false"),
    ({"name": "m", "kind": "mqtt", "servers": ["mqtt://h:1"], "topics": ["a"],
      "primary_retry": "0s"}, "primary_retry", "at least 1 second"),
    ({"name": "k", "kind": "kafka", "servers": ["h:1"],
      "topic_map": [{"filter": "a/#", "topic": "bad topic"}]}, "topic_map", "Kafka topic"),
    ({"name": "k", "kind": "kafka", "servers": ["h:1"], "topic_map": [{"filter": "#",
      "topic": "t"}], "sasl_mechanism": "PLAIN"}, "sasl_mechanism", "username"),
])
def test_errors_name_file_table_and_key(table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(table)
    message = str(info.value)
    assert message.startswith(f'{FILE}: [[bridges]] #1 "{table["name"]}" {key}: '), message
    assert words in message
    assert info.value.key == key and info.value.file == FILE


def test_second_table_and_duplicate_names_are_numbered() -> None:
    with pytest.raises(ConfigError, match=r'\[\[bridges\]\] #2 "central" name: .*#1'):
        parse(JS, JS)
    with pytest.raises(ConfigError, match=r"\[\[bridges\]\] #2 kind: expected one of"):
        parse(JS, {"name": "x y", "kind": "amqp", "servers": []})


def test_bridges_written_as_a_single_table_is_explained() -> None:
    with pytest.raises(ConfigError, match="two brackets"):
        parse_bridges(JS, file=FILE, gateway_id="gw7")


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    bridges = parse(JS, {"name": "k", "kind": "kafka", "servers": ["h:1"],
                         "topic_map": [{"filter": "#", "topic": "t"}]})
    monkeypatch.setitem(sys.modules, "nats", None)  # makes `import nats` fail
    with pytest.raises(ConfigError) as info:
        require_extras(bridges, file=FILE)
    assert "install it with: pip install nats-py" in str(info.value)
    assert '[[bridges]] #1 "central" kind' in str(info.value)
    monkeypatch.setitem(sys.modules, "aiokafka", None)
    monkeypatch.delitem(sys.modules, "nats")
    with pytest.raises(ConfigError, match=r"install it with: pip install aiokafka$"):
        require_extras(bridges, file=FILE)


@pytest.mark.parametrize("key", ["creds_file", "nkey_seed_file"])
def test_nats_credentials_without_nkeys_name_the_package(
        monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    # Before, check-config said OK and the bridge retried "No module named 'nkeys'" forever.
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    bridges = parse({**JS, key: "/etc/edge-broker/nats/gw7"})
    monkeypatch.setitem(sys.modules, "nkeys", None)
    with pytest.raises(ConfigError) as info:
        require_extras(bridges, file=FILE)
    assert str(info.value).startswith(f'{FILE}: [[bridges]] #1 "central" {key}: ')
    assert str(info.value).endswith("install it with: pip install nkeys")
    require_extras(parse(JS), file=FILE)  # a password or no credentials: not needed


def test_parsing_imports_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    monkeypatch.setitem(sys.modules, "aiokafka", None)
    parse(JS)  # no error: only require_extras imports
    require_extras(parse({**JS, "enabled": False}), file=FILE)  # disabled: not imported
