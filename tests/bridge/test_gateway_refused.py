"""One message the remote side can never take does not stop a bridge: through the real broker
(a subprocess) with real nats-server, tansu and mosquitto, the message is skipped, counted in
`refused` (not `forwarded`, not a failure), a warning names it, and every other message
arrives, in order, without waiting for it.

Before: the uplink sent it again and again (nats-server closed the connection for a control
line over 4,096 bytes, a message over its max_payload with its headers, the stream refused
one over its max_msg_size in every PubAck, aiokafka refused a record over max_request_size),
the cursor stuck and everything after it held; an MQTT remote's Maximum Packet Size and
unrouted Kafka messages counted as forwarded.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

import nats
from nats.js import api

from tests.bridge.gateway import (
    Device,
    Gateway,
    jetstream_bridge,
    kafka_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import Mosquitto, NatsServer, Tansu
from tests.bridge.test_bridges_status_cli import run
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

DEADLINE_S = 30.0  # a healthy drain of these few messages takes well under a second
LONG_TOPIC = "sensors/" + "L" * 5000  # a valid MQTT topic; its subject is too long for NATS


def publish(gateway: Gateway, messages: list[tuple[str, bytes]]) -> None:
    device = Device(gateway.port)
    try:
        for topic, payload in messages:
            device.publish(topic, payload)
        device.wait_acked(len(messages))
    finally:
        device.close()
    assert not device.refused


def around(odd: tuple[str, bytes], count: int = 10) -> list[tuple[str, bytes]]:
    """`count` ordinary messages, `odd` in their middle."""
    before = [("sensors/a", b"%d" % n) for n in range(count // 2)]
    after = [("sensors/a", b"%d" % n) for n in range(count // 2, count)]
    return [*before, odd, *after]


def skipped_one(gateway: Gateway, name: str, forwarded: int) -> dict[str, Any]:
    """Wait until the bridge passed everything, one message refused; its status."""
    def done() -> dict[str, Any] | None:
        status = gateway.status(name)
        return status if (status["backlog_messages"] == 0 and status["refused"] >= 1
                          and status["forwarded"] >= forwarded) else None

    try:
        status: dict[str, Any] = wait_until(done, DEADLINE_S,
                                            "the bridge past the refused message")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {gateway.status(name)}\n{gateway.log[-3000:]}") from None
    assert status["refused"] == 1 and status["forwarded"] == forwarded
    assert status["failures"] == 0 and status["last_error"] is None
    return status


def assert_payloads_upstream(gateway: Gateway, name: str, expected: list[bytes]) -> None:
    rows = upstream(gateway.bridge_config(name))
    assert [r["topic"] for r in rows] == ["sensors/a"] * len(expected)
    assert [r["payload"].encode() for r in rows] == expected


async def add_stream(url: str, **config: Any) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(api.StreamConfig(
            name="EDGE", subjects=["site1.gw7.>"], duplicate_window=120.0, **config))
    finally:
        await nc.close()


@pytest.mark.parametrize("separate", [False, True], ids=["in_process", "separate_process"])
def test_a_topic_too_long_for_a_nats_subject_is_skipped(
        nats_server: NatsServer, tmp_path: Path, separate: bool) -> None:
    extra = {"separate_process": "true"} if separate else {}
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url], **extra)).start()
    try:
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        messages = around((LONG_TOPIC, b"long"))
        publish(gateway, messages)
        status = skipped_one(gateway, "central", 10)
        assert status["cursor"] >= 11 and status["connected"]
        assert_payloads_upstream(gateway, "central", [b"%d" % n for n in range(10)])
        log = gateway.log
        assert "cannot take the message at log offset 6, topic 'sensors/LLL" in log
        assert "control line exceeds maximum" in log and "skipped (counted in refused)" in log
        assert (nats_server.log.read_text(errors="replace").count("Maximum Control Line")
                == 0)  # never sent: the connection was never closed for it
        code, out, _ = run("bridges", "status", "--config", str(gateway.config))
        assert code == 0 and ("  skipped     1 refused (the remote side can never take them: "
                              "too large, topic too long; logged)") in out.splitlines()
        code, out, _ = run("bridges", "status", "--json", "--config", str(gateway.config))
        (reported,) = json.loads(out)["bridges"]
        assert (reported["refused"], reported["unrouted"], reported["forwarded"]) == (1, 0, 10)
    finally:
        gateway.stop()


@pytest.mark.parametrize("batched", [False, True], ids=["one_ack_each", "batched"])
def test_a_message_over_the_streams_max_msg_size_is_skipped(
        nats_server: NatsServer, tmp_path: Path, batched: bool) -> None:
    # An existing stream (shared by gateways: the bridge never modifies it) refusing
    # messages over 500 bytes with their headers: PubAck error 10054.
    asyncio.run(add_stream(nats_server.url, max_msg_size=500,
                           **({"allow_batched": True} if batched else {})))
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url])).start()
    try:
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        publish(gateway, around(("sensors/a", b"x" * 1000)))
        skipped_one(gateway, "central", 10)
        assert stream_count(nats_server.url) == 10
        assert_payloads_upstream(gateway, "central", [b"%d" % n for n in range(10)])
        assert "exceeds maximum allowed" in gateway.log
    finally:
        gateway.stop()


def test_a_message_over_the_servers_max_payload_with_its_headers_is_skipped(
        tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 2048\n")
    server = NatsServer(tmp_path / "nats", extra_args=("-c", str(conf)))
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", jetstream_bridge([server.url]))
    try:
        server.start()
        gateway.start()
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        # The payload alone fits max_payload; with the bridge's headers it does not.
        publish(gateway, around(("sensors/a", b"y" * 1950)))
        skipped_one(gateway, "central", 10)
        assert_payloads_upstream(gateway, "central", [b"%d" % n for n in range(10)])
        assert "the server's max_payload is 2,048" in gateway.log
        assert server.log.read_text(errors="replace").count("Maximum Payload") == 0
    finally:
        gateway.stop()
        server.stop()


def test_kafka_a_record_over_max_request_size_is_skipped_and_unrouted_are_counted(
        tansu: Tansu, tmp_path: Path) -> None:
    pytest.importorskip("aiokafka", reason="pip install 'edge-broker[kafka]'")
    gateway = Gateway(tmp_path, kafka_bridge([tansu.bootstrap],
                                              uplink='["sensors/#", "misc/#"]'))
    text = gateway.config.read_text()  # devices may publish up to 4 MiB here
    gateway.config.write_text(text.replace("[[bridges]]",
                                           "[mqtt]\nmax_packet_size = 4194304\n\n[[bridges]]"))
    gateway.start()
    try:
        wait_until(lambda: gateway.status("lake")["connected"], 30, "bridge connected")
        messages = around(("sensors/a", b"z" * (1100 * 1024)))
        messages.insert(3, ("misc/x", b"no route"))  # uplink takes it, topic_map does not
        publish(gateway, messages)
        status = skipped_one(gateway, "lake", 10)
        assert status["unrouted"] == 1
        assert_payloads_upstream(gateway, "lake", [b"%d" % n for n in range(10)])
        log = gateway.log
        assert "over the producer's max_request_size of 1,048,576" in log
        assert "no topic_map entry sends topic 'misc/x' (log offset 4)" in log
        assert log.count("'misc/x'") == 1  # once per topic
    finally:
        gateway.stop()


def test_mqtt_a_message_over_the_remotes_maximum_packet_size_counts_as_refused(
        tmp_path: Path, started: list[Any]) -> None:
    from tests.bridge.test_gateway_mqtt_properties import mqtt_bridge
    from tests.bridge.test_mqtt_upstream import Remote

    remote = Mosquitto(tmp_path / "mosquitto", extra_config="max_packet_size 300\n")
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", mqtt_bridge(f"127.0.0.1:{remote.port}",
                                                   ['sensors/# out 1 "" site1/']))
    try:
        remote.start()
        cloud = Remote(remote.port)
        started.append(cloud)
        cloud.subscribe("site1/#", 1)
        gateway.start()
        wait_until(lambda: gateway.status("cloud")["connected"], 20, "bridge connected")
        publish(gateway, around(("sensors/a", b"w" * 1000)))
        got = cloud.wait_for(10)
        skipped_one(gateway, "cloud", 10)
        assert [m.payload for m in got] == [b"%d" % n for n in range(10)]
        assert "is larger than" in gateway.log and "counted in refused" in gateway.log
    finally:
        gateway.stop()
        remote.stop()
