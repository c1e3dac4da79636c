"""Message ids, headers and backoff."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from edge_broker.bridge.base import (
    Backoff,
    BridgeMessage,
    decode_text,
    decode_user_properties,
    encode_text,
    load_class,
    message_id,
    new_store_id,
    parse_message_id,
)


def test_message_id_round_trips_with_dashes_in_the_gateway_id() -> None:
    store = new_store_id()
    mid = message_id("gw-7.site", store, 42)
    assert mid == f"gw-7.site-{store}-42"
    assert parse_message_id(mid) == ("gw-7.site", store, 42)


def test_rebuilt_store_gets_a_new_id_so_offsets_never_collide() -> None:
    first, second = new_store_id(), new_store_id()
    assert first != second
    assert message_id("gw", first, 1) != message_id("gw", second, 1)
    with pytest.raises(ValueError):
        message_id("gw", "a-b", 1)
    with pytest.raises(ValueError):
        message_id("gw", first, 0)


def test_headers_carry_the_documented_names_and_survive_any_text() -> None:
    msg = BridgeMessage(offset=5, topic=" room 1/temp\u00e9rature\n", payload=b"x", qos=1,
                        retain=True, publish_time=1_765_000_000.25, client_id="dev 1",
                        content_type="application/json", payload_utf8=True,
                        user_properties=(("a", "1"), ("a", " 2\r\n"), ("\u00e9", "")))
    headers = msg.headers("gw-s-5")
    assert list(headers.items())[:6] == [
        ("edge-message-id", "gw-s-5"), ("mqtt-topic", "%20room%201/temp%C3%A9rature%0A"),
        ("mqtt-qos", "1"), ("mqtt-retain", "1"), ("mqtt-client-id", "dev%201"),
        ("mqtt-publish-time", "2025-12-06T05:46:40.250Z")]
    assert headers["mqtt-content-type"] == "application/json"
    assert headers["mqtt-payload-format"] == "1"
    # One line, no surrounding whitespace: what NATS headers can carry.
    for value in headers.values():
        assert value == value.strip() and value.isprintable() and value.isascii()
    assert decode_text(headers["mqtt-topic"]) == msg.topic
    assert decode_user_properties(headers["mqtt-user-properties"]) == msg.user_properties
    assert encode_text("sensors/t1") == "sensors/t1"


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff(initial=1.0, cap=10.0, rand=lambda: 0.999999)
    ceilings = [round(backoff.next_delay(), 3) for _ in range(7)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    values = itertools.cycle([0.0, 0.5])
    jittered = Backoff(initial=2.0, cap=100.0, rand=lambda: next(values))
    assert [jittered.next_delay() for _ in range(4)] == [0.0, 2.0, 0.0, 8.0]
    jittered.reset()
    assert jittered.ceiling() == 2.0
    for _ in range(200):  # no overflow after many failures
        jittered.next_delay()
    assert jittered.ceiling() == 100.0
    with pytest.raises(ValueError):
        Backoff(initial=5, cap=1)



def test_base_install_imports_neither_nats_nor_aiokafka() -> None:
    """Everything but jetstream.py / kafka.py loads without the extras."""
    code = ("import sys; import edge_broker.bridge.config, edge_broker.bridge.base, "
            "edge_broker.bridge.forward, edge_broker.bridge.topic_map, "
            "edge_broker.bridge.mqtt_upstream; "
            "print(sorted(m for m in ('nats', 'aiokafka') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_registry_loads_each_kind_on_demand() -> None:
    assert load_class("mqtt").__name__ == "MqttUpstream"
    assert load_class("jetstream", downlink=True).__name__ == "JetStreamDownlink"
    assert load_class("kafka").__name__ == "KafkaSink"
