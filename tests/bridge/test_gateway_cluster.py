"""Issue 9, "Scale out", through the real broker: a 3-node JetStream cluster (three
nats-server processes routed to each other, an R3 stream), the gateway (a subprocess with a
`[[bridges]]` table listing all three servers) and a device publishing QoS 1 without pause.
While the bridge forwards, the node that leads the stream (asked through the JetStream API:
stream info's cluster leader) is SIGKILLed.

What must hold: every message the device got a PUBACK for is upstream, in order per topic;
the stream stores none twice (a resend after the leader loss carries the same Nats-Msg-Id);
forwarding goes on to the new leader (the messages published after the kill arrive, and
the stream has another leader).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

import nats

from tests.bridge.gateway import Device, Gateway, jetstream_bridge, upstream, wait_until
from tests.bridge.servers import NatsServer, nats_cluster, running
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

TOPICS = 4


def stream_state(nodes: list[NatsServer]) -> tuple[str, int] | None:
    """(leader's server name, messages) of the stream EDGE, asked of the running nodes; None
    while there is no answer (no stream yet, or no leader elected)."""
    urls = [node.url for node in nodes if node.running]

    async def ask() -> tuple[str, int] | None:
        nc = await nats.connect(urls, allow_reconnect=False, connect_timeout=2)
        try:
            info = await nc.jetstream(timeout=2).stream_info("EDGE")
        except Exception:
            return None
        finally:
            await nc.close()
        leader = info.cluster.leader if info.cluster is not None else None
        return (leader, int(info.state.messages)) if leader else None

    try:
        return asyncio.run(ask())
    except Exception:
        return None


def test_stream_leader_killed_while_the_gateway_forwards(tmp_path: Path) -> None:
    nodes = nats_cluster(tmp_path / "cluster", 3)
    (tmp_path / "gateway").mkdir()
    with running(*nodes):
        gateway = Gateway(tmp_path / "gateway", jetstream_bridge(
            [node.url for node in nodes], stream_replicas="3", window="64")).start()
        try:
            # The bridge creates the R3 stream once the cluster has elected its meta leader.
            wait_until(lambda: gateway.status("central")["connected"], 60, "bridge connected")
            device = Device(gateway.port, client_id="dev-cluster")
            stop = threading.Event()
            published = 0
            errors: list[BaseException] = []

            def publish_until_stopped() -> None:
                # The device holds back while 50,000 PUBACKs are outstanding (Device).
                nonlocal published
                try:
                    while not stop.is_set() and published < 200_000:
                        device.publish(f"sensors/d{published % TOPICS}/temp",
                                       f"{published}".encode())
                        published += 1
                        if published % 200 == 0:
                            stop.wait(0.01)  # let PUBACKs come back between bursts
                except BaseException as exc:  # reported below, with the diagnostics
                    errors.append(exc)

            def explained(exc: AssertionError) -> AssertionError:
                """`exc` with what the device and the gateway were doing, for the next
                person. Seen once in CI before the device held back (Device): 140,600
                published, 67,577 acknowledged when publishing stopped, so paho had refused
                (unnoticed) the publishes whose packet id still awaited its PUBACK."""
                return AssertionError(
                    f"{exc}; {published} published; {acked_at_stop} acknowledged when "
                    f"publishing stopped (None: not stopped then); now "
                    f"{len(device.acked)} acknowledged, {device.outstanding} without PUBACK; "
                    f"publishing failed: {errors!r}; "
                    f"device connected: {device.client.is_connected()}; bridge status: "
                    f"{gateway.status('central')}; gateway log (tail):\n{gateway.log[-4000:]}")

            acked_at_stop: int | None = None

            publisher = threading.Thread(target=publish_until_stopped)
            publisher.start()
            try:
                leader_name, _ = wait_until(
                    lambda: (s := stream_state(nodes)) is not None and s[1] >= 1000 and s,
                    60, "forwarding under way to the R3 stream")
                leader = next(n for n in nodes if n.server_name == leader_name)
                held = stream_state(nodes)
                leader.kill()  # SIGKILL the stream leader while the bridge forwards
                killed = time.monotonic()
                at_kill = published
                # Forwarding goes on: a new leader, and messages published after the kill
                # reach the stream.
                new_leader, _ = wait_until(
                    lambda: (s := stream_state(nodes)) is not None and s[0] != leader_name
                    and s, 60, "a new stream leader")
                # Reported, not asserted (timing): how long forwarding stopped, as the time
                # until the stream holds 1,000 more than it did just before the kill.
                before = held[1] if held is not None else 0
                wait_until(lambda: (s := stream_state(nodes)) is not None
                           and s[1] >= before + 1000, 60, "forwarding resumed")
                print(f"forwarding paused {time.monotonic() - killed:.1f} s after the leader "
                      f"was killed (the stream grew by 1,000 from {before})")
                try:
                    wait_until(lambda: published >= at_kill + 2000, 60,
                               "the device publishing after the kill")
                except AssertionError as exc:
                    raise explained(exc) from exc
            finally:
                stop.set()
                publisher.join(20)
            acked_at_stop = len(device.acked)
            print(f"{published} published, {acked_at_stop} acknowledged when publishing "
                  f"stopped")
            try:
                assert not publisher.is_alive(), "the device still publishing 20 s after stop"
                assert not errors, "the device's publishing failed"
                device.wait_acked(published, 60)
            except AssertionError as exc:
                raise explained(exc) from exc
            acked = list(device.acked)
            device.close()
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 120,
                       "the backlog forwarded to the new leader")
            status = gateway.status("central")
            assert status["connected"] and status["dropped"] == 0
            rows = upstream(gateway.bridge_config("central"))
            final = stream_state(nodes)
        finally:
            gateway.stop()
    assert new_leader != leader_name and final is not None and final[0] != leader_name
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} stored twice"
    assert final[1] == len(rows)
    payloads = [int(r["payload"]) for r in rows]
    assert len(payloads) == len(set(payloads))
    missing = {int(p) for _, p in acked} - set(payloads)
    assert not missing, f"{len(missing)} acknowledged messages are not upstream"
    after_kill = [p for p in payloads if p >= at_kill]
    assert len(after_kill) >= 2000, "nothing published after the kill went upstream"
    for topic in {t for t, _ in acked}:  # upstream in publish order, per topic
        numbers = [int(r["payload"]) for r in rows if r["topic"] == topic]
        assert numbers == sorted(numbers)
