"""Issue 9, "Crash", "Uplink down since boot" and "Downlink", through the real broker (a
subprocess) configured with `[[bridges]]` and a real nats-server.

- Crash: 5 SIGKILLs of the gateway while it forwards: every message a device got a PUBACK
  for is upstream, in order per topic, and JetStream stores none twice (the resend after a
  kill carries the same Nats-Msg-Id, inside the stream's duplicate window).
- Uplink down since boot: the backlog stays within `max_backlog_bytes`, the oldest are
  dropped and counted, and the rest drains as soon as the server appears.
- Downlink: commands published centrally while the gateway is down reach the device (a
  persistent session) after the gateway comes back, and are published into the local broker
  exactly once (a stream on cmd/# counts the publishes), also across a SIGKILL after the
  delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

import nats

from edge_broker import cli
from tests.bridge.gateway import (
    Device,
    Gateway,
    jetstream_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import NatsServer
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

KILLS = 5
TOPICS = 4


def test_five_sigkills_while_forwarding(nats_server: NatsServer, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url], window="64"))
    acked: list[tuple[str, bytes]] = []
    n = 0
    for _ in range(KILLS):
        gateway.start()
        device = Device(gateway.port, client_id="dev-crash")
        before = stream_count(nats_server.url)
        stop = threading.Event()

        def publish_until_stopped(device: Device = device, stop: threading.Event = stop) -> None:
            nonlocal n
            while not stop.is_set() and n < 100_000:
                device.publish(f"sensors/d{n % TOPICS}/temp", f"{n}".encode())
                n += 1
                if n % 200 == 0:
                    stop.wait(0.01)  # let PUBACKs come back between bursts

        publisher = threading.Thread(target=publish_until_stopped)
        publisher.start()
        try:
            # Kill while the bridge is forwarding: some of this round already upstream.
            # (And 500 of this round's PUBACKs in: what the stream counts may be the
            # last round's backlog, and PUBACKs in flight at the kill are lost.)
            wait_until(lambda b=before, d=device: stream_count(nats_server.url) >= b + 500
                       and len(d.acked) >= 500, 30, "forwarding under way")
            gateway.kill()
        finally:
            stop.set()
            publisher.join(10)
            acked += device.acked
            device.close()
    gateway.start()
    try:
        rows_wanted = {payload for _, payload in acked}
        wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 60,
                   "the backlog after the last restart forwarded")
        rows = upstream(gateway.bridge_config("central"))
    finally:
        gateway.stop()
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)), "JetStream stored a message twice"
    payloads = [r["payload"].encode() for r in rows]
    assert len(payloads) == len(set(payloads))
    missing = rows_wanted - set(payloads)
    assert not missing, f"{len(missing)} acknowledged messages are not upstream"
    for topic in {t for t, _ in acked}:  # upstream in publish order, per topic
        numbers = [int(r["payload"]) for r in rows if r["topic"] == topic]
        assert numbers == sorted(numbers)
    assert len(acked) >= KILLS * 500


def test_uplink_down_since_boot_bounded_then_drains(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")  # its port is chosen; it is not started yet
    bound = 64 * 1024
    gateway = Gateway(tmp_path, jetstream_bridge([server.url],
                                                  max_backlog_bytes=str(bound))).start()
    try:
        device = Device(gateway.port)
        try:
            for n in range(3000):  # ~3,000 x 100+ bytes: several times the bound
                device.publish(f"sensors/d{n % TOPICS}/temp", f"{n:0100d}".encode())
            device.wait_acked(3000)
        finally:
            device.close()
        status = wait_until(lambda: (s := gateway.status("central"))["dropped"] > 0
                            and s, 20, "drops counted")
        assert not status["connected"]
        assert status["backlog_bytes"] <= bound
        dropped = status["dropped"]
        assert 0 < status["backlog_messages"] < 3000 - dropped + 1
        kept = status["backlog_messages"]
        server.start()
        try:
            wait_until(lambda: stream_count(server.url) >= kept, 60, "the backlog drained")
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 20,
                       "nothing left behind")
            rows = upstream(gateway.bridge_config("central"))
            # The newest are kept: the last message published is upstream, the first not.
            numbers = sorted(int(r["payload"]) for r in rows)
            assert numbers[-1] == 2999 and 0 not in numbers
            assert len(numbers) == kept and numbers == list(range(3000 - kept, 3000))
            assert gateway.status("central")["dropped"] == dropped == 3000 - kept
        finally:
            server.stop()
    finally:
        gateway.stop()
    assert "dropped" in gateway.log  # the drop is logged, not silent


def test_downlink_while_gateway_down_exactly_once(nats_server: NatsServer,
                                                  tmp_path: Path) -> None:
    # The stream records every message published into the local broker on cmd/#, once per
    # publish: what the downlink published, counted independently of any subscriber.
    stream = '\n[[streams]]\nname = "commands"\nfilter = "cmd/#"\n'
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url],
                                                  downlink='["site1.gw7.cmd.>"]') + stream)
    gateway.start()
    got: list[bytes] = []
    redelivered: list[bytes] = []  # DUP=1: the gateway's session resending to the device
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="valve1",
                         protocol=mqtt.MQTTv5)
    device.on_message = lambda c, u, m: (redelivered if m.dup else got).append(m.payload)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    subscribed: list[bool] = []
    device.on_subscribe = lambda *a: subscribed.append(True)
    device.connect("127.0.0.1", gateway.port, clean_start=False, properties=props)
    device.loop_start()
    try:
        device.subscribe("cmd/#", 1)
        wait_until(lambda: subscribed, 10, "SUBACK")
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        device.disconnect()
        device.loop_stop()
        gateway.stop()

        async def central_commands() -> None:
            nc = await nats.connect(nats_server.url)
            try:
                js = nc.jetstream()
                for k in range(20):
                    await js.publish(f"site1.gw7.cmd.valve{k % 2}", f"open {k}".encode())
            finally:
                await nc.close()

        asyncio.run(central_commands())
        gateway.start()
        device.connect("127.0.0.1", gateway.port, clean_start=False, properties=props)
        device.loop_start()
        wait_until(lambda: len(got) >= 20, 30, "the commands at the device")
        gateway.kill()  # a crash after delivery must not deliver them again
        gateway.start()  # on a new port: the device connects again
        device.loop_stop()
        device.connect("127.0.0.1", gateway.port, clean_start=False, properties=props)
        device.loop_start()
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        # A marker sent after the restart arrives after anything redelivered would have.
        asyncio.run(_publish(nats_server.url, "site1.gw7.cmd.valve0", b"marker"))
        wait_until(lambda: b"marker" in got, 30, "the marker")
        # Exactly once into the local broker: the stream holds each command once.
        code, out, err = _replay_stream(gateway.config)
        assert (code, err) == (0, "")
        published = [json.loads(line)["payload"].encode() for line in out.splitlines()]
    finally:
        device.disconnect()
        device.loop_stop()
        gateway.stop()
    expected = sorted([f"open {k}".encode() for k in range(20)] + [b"marker"])
    assert sorted(published) == expected
    # At the device: every command (QoS 1: one the device had not acknowledged when the
    # gateway was killed comes again, with DUP=1 if the broker had recorded sending it).
    assert sorted(set(got) | set(redelivered)) == expected


def _replay_stream(config: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["replay", "--stream", "commands", "--from", "earliest",
                         "--config", str(config)])
    return code, out.getvalue(), err.getvalue()


async def _publish(url: str, subject: str, payload: bytes) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, payload)
    finally:
        await nc.close()
