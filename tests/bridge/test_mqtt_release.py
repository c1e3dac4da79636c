"""MQTT downlink at QoS 2: the bridge answers PUBREL with PUBCOMP only once the packet
identifier it stored with the command is durably forgotten.

Why it matters: after PUBCOMP the upstream may reuse the identifier for a new command. Had
the gateway sent PUBCOMP first and crashed before forgetting the identifier, it would find
the identifier still stored after the restart and take the new command for a resend of the
old one: acknowledged and never published (lost). Sent after the forget, a crash in between
leaves the PUBREL unanswered and the upstream sends it again [MQTT-4.4.0-1] (5.0).

The upstream here is a scripted MQTT server on our own sans-IO Connection (server role), so
the test sees exactly which packets arrive and in which order. And the default QoS of a
downlink topic line is 2.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from edge_broker.bridge.base import BridgeMessage
from edge_broker.bridge.mqtt_upstream import MqttUpstream
from edge_broker.bridge.topic_map import parse_topic_line
from edge_broker.mqtt.connection import Connection
from edge_broker.mqtt.packets import (
    ConnAck,
    Connect,
    Packet,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
)
from edge_broker.mqtt.types import Role
from edge_broker.server.app import BrokerApp
from tests.bridge.test_broker_downlink import config_with
from tests.bridge.test_mqtt_upstream import bridge_config


class ScriptedRemote:
    """One connection at a time; what the bridge sends is queued in `received`."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[Packet] = asyncio.Queue()
        self.conn = Connection(Role.SERVER)
        self.writer: asyncio.StreamWriter | None = None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> ScriptedRemote:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while data := await reader.read(65536):
                for packet in self.conn.receive_packets(data):
                    if isinstance(packet, Connect):
                        self.send(ConnAck())
                    elif isinstance(packet, Subscribe):
                        self.send(SubAck(packet.packet_id, (2,) * len(packet.subscriptions)))
                    else:
                        self.received.put_nowait(packet)

    def send(self, packet: Packet) -> None:
        assert self.writer is not None
        self.writer.write(self.conn.send(packet))

    async def next(self) -> Packet:
        return await asyncio.wait_for(self.received.get(), 10)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self._server is not None:
            self._server.close()


async def test_pubcomp_waits_until_the_identifier_is_forgotten() -> None:
    remote = await ScriptedRemote().start()
    forgotten: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    released: list[int] = []

    def on_release(packet_id: int) -> asyncio.Future[None]:
        released.append(packet_id)
        return forgotten  # the store has not committed the forget yet

    upstream = MqttUpstream(bridge_config(f"mqtt://127.0.0.1:{remote.port}",
                                          notification_topic=""), on_release=on_release)
    try:
        await upstream.start()
        remote.send(Publish("site1/gw7/cmd/valve1", b"open", 2, packet_id=7))
        command = await asyncio.wait_for(upstream.messages().__anext__(), 10)
        assert (command.topic, command.qos, command.position) == ("cmd/valve1", 2, 7)
        await upstream.ack(command)  # after the local commit: PUBREC
        assert await remote.next() == PubRec(7)
        remote.send(PubRel(7))
        # Something the bridge sends after PUBREL was handled: no PUBCOMP before it.
        while not released:
            await asyncio.sleep(0.01)  # polling interval; the deadline is remote.next's
        sent = asyncio.ensure_future(upstream.send([BridgeMessage(1, "sensors/t", b"x", 0)]))
        after = await remote.next()
        assert isinstance(after, Publish) and after.topic == "site1/gw7/sensors/t", after
        await sent
        forgotten.set_result(None)  # durable now: PUBCOMP
        assert await remote.next() == PubComp(7)
    finally:
        upstream.abort()
        await remote.close()


async def test_the_broker_completes_the_release_after_the_forget_committed(
        tmp_path: Path) -> None:
    """Inside the broker: the future the bridge hands back for a PUBREL is done only once
    the stored identifier is gone from the file."""
    table = {"name": "central", "kind": "mqtt", "servers": ["mqtt://127.0.0.1:9"],
             "topics": ['cmd/# in 2 "" gw7/'], "backoff_initial": "1min",
             "backoff_max": "1min"}
    app = BrokerApp(config_with(tmp_path, table))
    await app.start()
    try:
        bridge = app.bridges.bridges["central"]
        manager = bridge.manager
        key = ("central", "mqtt:gw7-central#7")
        from edge_broker.bridge.base import DownlinkMessage

        class Source:
            source = "mqtt:gw7-central"

            async def ack(self, message: DownlinkMessage) -> None:
                return None

        await bridge._take(Source(), DownlinkMessage(  # type: ignore[arg-type]
            topic="cmd/valve1", payload=b"open", source="mqtt:gw7-central", position=7,
            qos=2))
        assert manager.positions[key] == 0
        assert await stored_positions(manager) == {key}
        released = bridge._mqtt_released(Source(), 7)
        assert released is not None and not released.done()
        await asyncio.wait_for(released, 10)
        assert key not in manager.positions
        assert await stored_positions(manager) == set()
    finally:
        await app.stop()


async def stored_positions(manager: object) -> set[tuple[str, str]]:
    side = manager.side  # type: ignore[attr-defined]
    return set(await side.positions())


def test_a_downlink_line_without_qos_is_qos_2() -> None:
    assert parse_topic_line("cmd/# in").qos == 2
    assert parse_topic_line("config/# both").qos == 2
    assert parse_topic_line("sensors/# out").qos == 0  # uplink: mosquitto's default
    assert parse_topic_line("sensors/#").qos == 0
    assert parse_topic_line("cmd/# in 1").qos == 1
