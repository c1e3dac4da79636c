"""JetStreamSink and JetStreamDownlink against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

import nats
from nats.js import api

from edge_broker.bridge.base import BridgeMessage, Resend, decode_text, parse_message_id
from edge_broker.bridge.config import BridgeConfig, parse_bridges
from edge_broker.bridge.jetstream import JetStreamSink, filter_covers
from edge_broker.bridge.jetstream_downlink import JetStreamDownlink
from edge_broker.errors import BridgeError
from tests.bridge.proxy import TcpProxy
from tests.bridge.servers import NatsServer

STORE_ID = "5eed0000000000a1"


def bridge_config(server_url: str, **extra: Any) -> BridgeConfig:
    table = {"name": "central", "kind": "jetstream", "servers": [server_url],
             "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE",
             "stream_storage": "file", "duplicate_window": "2min", **extra}
    (config,) = parse_bridges([table], file="test.toml", gateway_id="gw7")
    return config


def messages(first: int, count: int, topic: str = "sensors/t1") -> list[BridgeMessage]:
    return [BridgeMessage(offset=o, topic=topic, payload=f"m{o}".encode(), qos=1,
                          publish_time=1_765_000_000.0 + o, client_id="dev1")
            for o in range(first, first + count)]


async def stored(url: str, stream: str = "EDGE") -> list[Any]:
    """Every message stored in the stream, in stream order (read by sequence)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        return [await js.get_msg(stream, seq)
                for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await nc.close()


def offsets(msgs: list[Any]) -> list[int]:
    return [parse_message_id(m.headers["Nats-Msg-Id"])[2] for m in msgs]


async def test_window_is_published_with_headers_and_resends_are_deduplicated(
        nats_server: NatsServer) -> None:
    sink = JetStreamSink(bridge_config(nats_server.url), gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    try:
        assert sink.created_stream and sink.batched
        odd = BridgeMessage(offset=201, topic="/odd topic/v1.2", payload=b"\x00\xff", qos=2,
                            retain=True, user_properties=(("k", "v"), ("k", "w")))
        batch = [*messages(1, 200), odd]
        assert await sink.send(batch) == 201
        # A resend of the same entries (crash before the cursor moved) is dropped by id.
        assert await sink.send(batch[150:]) == 51
    finally:
        await sink.close()
    msgs = await stored(nats_server.url)
    assert offsets(msgs) == list(range(1, 202))
    last = msgs[-1]
    assert last.subject == "site1.gw7.~.odd~20topic.v1~2E2"
    assert last.data == b"\x00\xff"
    assert decode_text(last.headers["mqtt-topic"]) == "/odd topic/v1.2"
    assert last.headers["Nats-Msg-Id"] == f"gw7-{STORE_ID}-201"
    assert (last.headers["mqtt-qos"], last.headers["mqtt-retain"]) == ("2", "1")
    assert last.headers["mqtt-user-properties"] == '[["k","v"],["k","w"]]'
    assert msgs[0].headers["mqtt-publish-time"] == "2025-12-06T05:46:41.000Z"
    # The id once, as Nats-Msg-Id (no edge-message-id on JetStream: docs/bridges.md).
    assert msgs[0].headers == {
        "Nats-Msg-Id": f"gw7-{STORE_ID}-1", "mqtt-topic": "sensors/t1", "mqtt-qos": "1",
        "mqtt-client-id": "dev1", "mqtt-publish-time": "2025-12-06T05:46:41.000Z"}
    assert "edge-message-id" not in last.headers


async def test_stream_created_with_configured_settings(nats_server: NatsServer) -> None:
    config = bridge_config(nats_server.url, stream_retention="limits", stream_storage="memory",
                           stream_max_age="1d", stream_max_bytes=1 << 20,
                           stream_subjects=["site1.>"])
    sink = JetStreamSink(config, gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    await sink.close()
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info("EDGE")
    finally:
        await nc.close()
    assert info.config.subjects == ["site1.>"]
    assert info.config.storage == api.StorageType.MEMORY
    assert info.config.max_age == 86400
    assert info.config.max_bytes == 1 << 20
    assert info.config.duplicate_window == 120
    assert info.config.num_replicas == 1


async def test_existing_stream_is_checked_and_never_modified(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="EDGE", subjects=["other.>"], max_msgs=7)
    try:
        sink = JetStreamSink(bridge_config(nats_server.url), gateway_id="gw7",
                             store_id=STORE_ID)
        with pytest.raises(BridgeError, match=r"captures \['other.>'\], not site1.gw7.>"):
            await sink.start()
        await sink.close()
        await js.delete_stream("EDGE")
        await js.add_stream(name="EDGE", subjects=["site1.*.>"], max_msgs=7)
        sink = JetStreamSink(bridge_config(nats_server.url), gateway_id="gw7",
                             store_id=STORE_ID)
        await sink.start()
        assert not sink.created_stream
        assert await sink.send(messages(1, 3)) == 3
        await sink.close()
        info = await js.stream_info("EDGE")
        assert info.config.subjects == ["site1.*.>"] and info.config.max_msgs == 7
    finally:
        await nc.close()


def test_filter_coverage() -> None:
    assert filter_covers("site1.gw7.>", "site1.gw7")
    assert filter_covers("site1.>", "site1.gw7")
    assert filter_covers("*.gw7.>", "site1.gw7")
    assert filter_covers(">", "site1.gw7")
    assert not filter_covers("site1.gw7.*", "site1.gw7")
    assert not filter_covers("site1.gw7.x.>", "site1.gw7")
    assert not filter_covers("site2.>", "site1.gw7")


async def test_server_restart_loses_nothing_and_stores_no_duplicate(
        nats_server: NatsServer) -> None:
    """The uplink's server goes away mid-stream and comes back on the same port and store:
    what was not acknowledged is resent, the server drops what it already had."""
    sink = JetStreamSink(bridge_config(nats_server.url), gateway_id="gw7", store_id=STORE_ID,
                         ack_timeout=2.0)
    await sink.start()
    try:
        cursor = 1
        assert await sink.send(messages(cursor, 100)) == 100
        cursor += 100
        nats_server.stop()
        with pytest.raises(BridgeError):
            await sink.send(messages(cursor, 100))  # nothing acknowledged while down
        nats_server.start()
        deadline = asyncio.get_running_loop().time() + 60
        while cursor <= 1000:  # the bridge loop: resend from the cursor until acknowledged
            assert asyncio.get_running_loop().time() < deadline, f"stuck at {cursor}"
            try:
                cursor += await sink.send(messages(cursor, min(100, 1001 - cursor)))
            except BridgeError:
                await asyncio.sleep(0.05)  # nats-py is reconnecting (its own backoff)
    finally:
        await sink.close()
    msgs = await stored(nats_server.url)
    assert offsets(msgs) == list(range(1, 1001))


async def test_blackholed_link_times_out_and_a_new_connection_delivers(
        nats_server: NatsServer) -> None:
    proxy = await TcpProxy("127.0.0.1", nats_server.port).start()
    url = f"nats://{proxy.address}"
    sink = JetStreamSink(bridge_config(url), gateway_id="gw7", store_id=STORE_ID,
                         ack_timeout=1.0)
    try:
        await sink.start()
        assert await sink.send(messages(1, 50)) == 50
        proxy.blackhole()
        with pytest.raises(BridgeError, match="no ack"):
            await sink.send(messages(51, 50))
        await sink.close()  # the bridge drops the stalled connection and reconnects
        proxy.cut()
        proxy.forward()
        await sink.start()
        assert await sink.send(messages(51, 50)) == 50
    finally:
        await sink.close()
        await proxy.close()
    msgs = await stored(nats_server.url)
    assert offsets(msgs) == list(range(1, 101))
    assert sink.duplicates == 0


def test_ack_timeout_comes_from_the_bridge_config() -> None:
    def sink(**extra: Any) -> JetStreamSink:
        return JetStreamSink(bridge_config("nats://127.0.0.1:4222", **extra),
                             gateway_id="gw7", store_id=STORE_ID)

    assert sink().ack_timeout == 3.0
    assert sink(ack_timeout="1s").ack_timeout == 1.0


async def test_a_lost_connection_ends_the_window_in_flight_at_once(
        nats_server: NatsServer) -> None:
    """A PubAck goes to the connection that published: once nats-py reports that connection
    lost, the window in flight ends (Resend, nothing acknowledged) instead of waiting for
    `ack_timeout`, and the same sink sends it again after nats-py reconnected."""
    proxy = await TcpProxy("127.0.0.1", nats_server.port).start()
    sink = JetStreamSink(bridge_config(f"nats://{proxy.address}"), gateway_id="gw7",
                         store_id=STORE_ID, ack_timeout=3600.0)
    try:
        await sink.start()
        assert await sink.send(messages(1, 50)) == 50
        proxy.blackhole()
        acks = await sink.submit(messages(51, 50))  # written; no ack can come back
        proxy.cut()  # the connection is lost
        proxy.forward()
        with pytest.raises(Resend):
            await asyncio.wait_for(acks, 60)  # long before the ack timeout (an hour)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:  # nats-py reconnects by itself
            try:
                assert await sink.send(messages(51, 50)) == 50
                break
            except BridgeError:
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
    finally:
        await sink.close()
        await proxy.close()
    msgs = await stored(nats_server.url)
    assert offsets(msgs) == list(range(1, 101))


async def test_downlink_durable_consumer_acks_after_local_commit(
        nats_server: NatsServer) -> None:
    config = bridge_config(nats_server.url, downlink=["site1.gw7.cmd.>"])
    sink = JetStreamSink(config, gateway_id="gw7", store_id=STORE_ID)
    await sink.start()  # creates the stream, which captures the cmd subjects too
    await sink.close()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    for i in range(3):  # commands published centrally while the gateway is away
        await js.publish(f"site1.gw7.cmd.valve{i}", f"open{i}".encode(),
                         headers={"mqtt-qos": "2"})
    await js.publish("site1.gw7.sensors.x", b"not a command")

    async def take(source: JetStreamDownlink, count: int) -> list[Any]:
        out = []
        async for message in source.messages():
            out.append(message)
            if len(out) == count:
                return out
        return out

    first = JetStreamDownlink(config, fetch_timeout=0.5, ack_wait=1.0)
    await first.start()
    got = await asyncio.wait_for(take(first, 2), 10)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("cmd/valve0", b"open0", 2), ("cmd/valve1", b"open1", 2)]
    await first.ack(got[0])  # committed locally and acknowledged
    # got[1] was committed locally, then the gateway crashed before its remote ack.
    await first.close()

    again = JetStreamDownlink(config, fetch_timeout=0.5, ack_wait=1.0)
    await again.start()
    redelivered = await asyncio.wait_for(take(again, 2), 20)
    # The unacknowledged one comes back with the same position (the local store sees it
    # already has it and only acks), then the next command.
    assert [(m.topic, m.position) for m in redelivered] == [
        ("cmd/valve1", got[1].position), ("cmd/valve2", got[1].position + 1)]
    for message in redelivered:
        await again.ack(message)
    await again.close()
    info = await js.consumer_info("EDGE", config.jetstream.downlink_durable)  # type: ignore
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await nc.close()


async def test_downlink_with_several_subjects(nats_server: NatsServer) -> None:
    config = bridge_config(nats_server.url, downlink=["site1.gw7.cmd.>", "site1.gw7.cfg.*"])
    sink = JetStreamSink(config, gateway_id="gw7", store_id=STORE_ID)
    await sink.start()
    await sink.close()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    for subject in ("site1.gw7.cmd.a.b", "site1.gw7.sensors.x", "site1.gw7.cfg.rate",
                    "site1.gw7.cfg.x.y"):
        await js.publish(subject, b"p")
    await nc.close()
    source = JetStreamDownlink(config, fetch_timeout=0.5)
    await source.start()
    got = []
    try:
        async def take() -> None:
            async for message in source.messages():
                got.append(message.topic)
                await source.ack(message)
                if len(got) == 2:
                    return
        await asyncio.wait_for(take(), 10)
    finally:
        await source.close()
    assert got == ["cmd/a/b", "cfg/rate"]
