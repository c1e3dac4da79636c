"""A downlink task cancelled while it waits for the local commit of a command.

It happens for an MQTT bridge: when its connection is replaced (the forwarder connects
again after a loss), the task reading the old connection's downlink is cancelled, possibly
while a command it published is being committed. The commit goes on (it is the store's),
so the command and its packet identifier are stored; the bridge must remember that too,
else the upstream's resend of the command (DUP, no PUBREC came) is published a second time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_broker.bridge.base import DownlinkMessage
from edge_broker.server.app import BrokerApp
from tests.bridge.test_broker_downlink import TABLE, config_with, park_session, queued


class Source:
    source = "mqtt:gw7-central"

    def __init__(self) -> None:
        self.acked: list[int] = []

    async def ack(self, message: DownlinkMessage) -> None:
        self.acked.append(message.position)


def command(packet_id: int, payload: bytes) -> DownlinkMessage:
    return DownlinkMessage(topic="cmd/valve1", payload=payload, source="mqtt:gw7-central",
                           position=packet_id, qos=2)


async def test_a_command_committed_by_a_cancelled_task_is_not_published_again(
        tmp_path: Path) -> None:
    app = BrokerApp(config_with(tmp_path, TABLE))
    await app.start()
    try:
        park_session(app)
        await app.commit()
        bridge = app.bridges.bridges["central"]
        source = Source()
        take = asyncio.ensure_future(bridge._take(source, command(7, b"open")))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # it runs up to the wait for its commit
        assert not take.done()
        take.cancel()  # the connection was replaced
        await asyncio.gather(take, return_exceptions=True)
        await app.commit()  # whatever was under way is durable now
        # The upstream resends the command (no PUBREC came), then sends a new one.
        await bridge._take(source, command(7, b"open"))  # type: ignore[arg-type]
        await bridge._take(source, command(8, b"close"))  # type: ignore[arg-type]
        assert queued(app) == [b"open", b"close"]
        assert bridge.status.downlink_duplicates == 1
        assert source.acked == [7, 8]
    finally:
        await app.stop()
