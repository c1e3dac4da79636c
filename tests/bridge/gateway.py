"""Helpers for the bridged-gateway tests: the real broker (a subprocess) configured with
`[[bridges]]`, devices publishing with paho-mqtt, and what arrived upstream read back.

- `Gateway`: writes the configuration and runs `edge-broker` on it (BrokerProcess), restarts
  it on the same data directory, SIGKILLs it, and asks its admin socket for the `bridges`
  status.
- `Device`: a paho-mqtt v5 client that publishes QoS 1 and records what was acknowledged.
- `ThreadedProxy`: tests/bridge/proxy.TcpProxy in a thread of its own (the tests block).
  `drop_to_target()` returns once the proxy's loop switched (the test acts right after).
- `upstream_jetstream` / `upstream_kafka`: every message the bridge stored upstream, read
  with the same code `edge-broker replay --bridge` uses.

Waiting is polling with a deadline (`wait_until`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge_broker.config import load_config
from edge_broker.server import admin
from tests.bridge.proxy import TcpProxy
from tests.integration.brokerprocess import BrokerProcess

POLL_S = 0.05


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something true; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(POLL_S)  # polling interval, bounded by the deadline


def jetstream_bridge(servers: list[str], **extra: str) -> str:
    lines = ['[[bridges]]', 'name = "central"', 'kind = "jetstream"',
             f"servers = {servers!r}".replace("'", '"'), 'uplink = ["sensors/#"]',
             'subject_prefix = "site1.gw7"', 'jetstream_stream = "EDGE"',
             'backoff_initial = "1s"', 'backoff_max = "1s"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def separate_jetstream_bridge(url: str, **extra: str) -> str:
    """`jetstream_bridge` with its uplink in a process of its own (`separate_process`)."""
    return jetstream_bridge([url], separate_process="true", **extra)


def kafka_bridge(servers: list[str], **extra: str) -> str:
    lines = ['[[bridges]]', 'name = "lake"', 'kind = "kafka"',
             f"servers = {servers!r}".replace("'", '"'),
             'topic_map = [{ filter = "sensors/#", topic = "edge.telemetry" }]',
             "idempotence = false", 'backoff_initial = "1s"', 'backoff_max = "1s"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


class Gateway:
    """edge-broker with bridges, on a data directory kept across restarts and kills."""

    def __init__(self, root: Path, bridges: str, *, durability: str = "os") -> None:
        self.root = root
        self.data_dir = root / "data"
        self.config = root / "edge-broker.toml"
        self.config.write_text(f'[broker]\ndata_dir = "{self.data_dir}"\ngateway_id = "gw7"\n'
                               f'\n[storage]\ndurability = "{durability}"\n\n{bridges}')
        self.broker: BrokerProcess | None = None

    @property
    def port(self) -> int:
        assert self.broker is not None
        return self.broker.port

    def bridge_config(self, name: str) -> Any:
        return next(b for b in load_config(self.config).bridges if b.name == name)

    def start(self) -> Gateway:
        self.broker = BrokerProcess(self.data_dir, "--config", str(self.config),
                                    log_dir=self.root).wait_listening(20)
        return self

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop(20)

    def kill(self) -> None:
        if self.broker is not None:
            self.broker.kill()

    @property
    def log(self) -> str:
        return self.broker.stderr if self.broker is not None else ""

    def status(self, name: str) -> dict[str, Any]:
        reply = asyncio.run(admin.admin_request(self.data_dir, {"command": "bridges"}))
        found = [b for b in reply["bridges"] if b["name"] == name]
        assert found, reply
        result: dict[str, Any] = found[0]
        return result


class Device:
    """A device publishing QoS 1 (paho-mqtt, MQTT 5); `acked` holds the payloads whose
    PUBACK arrived with success, `refused` those whose PUBACK carried an error reason code
    (0x97 Quota exceeded from a full store, say).

    `publish` holds back while MAX_OUTSTANDING publishes wait for their PUBACK (`held_back`
    is set meanwhile), as a device with a bounded buffer does. Without that bound a device
    that outran the broker's PUBACKs by more than 65,535 messages lost messages it counted
    as sent: paho numbers them with the 16-bit packet identifier and refuses (rc
    MQTT_ERR_QUEUE_SIZE, nothing sent) a publish whose identifier still awaits its PUBACK;
    the PUBACKs then stop for good short of the count (test_gateway_device.py). A refusal
    by paho fails the publish loudly.
    """

    MAX_OUTSTANDING = 50_000  # well below paho's 65,535 packet identifiers

    def __init__(self, port: int, client_id: str = "dev1") -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.acked: list[tuple[str, bytes]] = []
        self.refused: list[tuple[str, bytes]] = []
        self.held_back = threading.Event()
        self._pending: dict[int, tuple[str, bytes]] = {}
        self._early: dict[int, bool] = {}  # mid: refused, for a PUBACK before publish() ends
        self._lock = threading.Condition()
        self._closed = False
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @property
    def outstanding(self) -> int:
        """Publishes still waiting for their PUBACK."""
        with self._lock:
            return len(self._pending)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any = None,
                    *rest: Any) -> None:
        refused = reason is not None and reason.is_failure
        with self._lock:
            sent = self._pending.pop(mid, None)
            if sent is None:
                self._early[mid] = refused  # PUBACK before publish() recorded the mid
            else:
                (self.refused if refused else self.acked).append(sent)
                self._lock.notify_all()

    def publish(self, topic: str, payload: bytes, timeout: float = 60.0) -> None:
        with self._lock:
            if len(self._pending) >= self.MAX_OUTSTANDING:
                self.held_back.set()
                try:
                    room = self._lock.wait_for(
                        lambda: len(self._pending) < self.MAX_OUTSTANDING or self._closed,
                        timeout)
                finally:
                    self.held_back.clear()
                if self._closed:
                    raise AssertionError("the device was closed while publish() waited")
                if not room:
                    raise AssertionError(f"{len(self._pending)} publishes still without "
                                         f"PUBACK after {timeout} s ({len(self.acked)} acked)")
        # Not under self._lock: paho calls on_publish from its thread holding its own lock.
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: kept,
            raise AssertionError(  # sent once connected again
                f"paho refused publish {info.mid}: {mqtt.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._early:
                refused = self._early.pop(info.mid)
                (self.refused if refused else self.acked).append((topic, payload))
            else:
                self._pending[info.mid] = (topic, payload)

    def wait_acked(self, count: int, timeout: float = 60.0) -> None:
        try:
            wait_until(lambda: len(self.acked) >= count, timeout, f"{count} PUBACKs")
        except AssertionError as exc:  # the counts at the deadline, not at the call
            raise AssertionError(f"{exc} (got {len(self.acked)}; {len(self.refused)} "
                                 f"refused; {self.outstanding} publishes without PUBACK)"
                                 ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self.client.disconnect()
        self.client.loop_stop()


class ThreadedProxy:
    """TcpProxy (forward / blackhole / cut) served from its own thread and event loop."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.proxy = self._call(TcpProxy(target_host, target_port).start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def address(self) -> str:
        return str(self.proxy.address)

    def blackhole(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.blackhole)

    def forward(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.forward)

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.cut)

    def refuse(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.refuse)

    def drop_to_target(self) -> None:
        self._call(self._now(self.proxy.drop_to_target))

    def hold_replies(self) -> None:
        self._call(self._now(self.proxy.hold_replies))

    def release(self) -> None:
        self._call(self._now(self.proxy.release))

    @staticmethod
    async def _now(action: Any) -> None:
        action()

    def close(self) -> None:
        self._call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def upstream(bridge: Any) -> list[dict[str, Any]]:
    """Every message of this gateway upstream (JetStream stream order; Kafka partition by
    partition), as `edge-broker replay --bridge NAME --from earliest` prints them."""
    from edge_broker.cli_bridges_replay import rows

    async def read() -> list[dict[str, Any]]:
        return [row async for row in rows(bridge, "earliest", None, None)]

    return asyncio.run(read())


def stream_count(url: str, stream: str = "EDGE") -> int:
    """Messages the JetStream stream holds (0 while it does not exist)."""
    import nats

    async def ask() -> int:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        except Exception:
            return 0
        finally:
            await nc.close()

    try:
        return asyncio.run(ask())
    except Exception:
        return 0


def assert_in_order_once(rows: list[dict[str, Any]], sent: list[tuple[str, bytes]], *,
                         duplicates_allowed: bool) -> None:
    """Every sent (topic, payload) is upstream; per topic in the order sent; duplicates (by
    message id) only if allowed."""
    ids = [r["message_id"] for r in rows]
    if not duplicates_allowed:
        assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicates stored"
    seen: set[str] = set()
    per_topic: dict[str, list[bytes]] = {}
    for r in rows:
        if r["message_id"] in seen:
            continue
        seen.add(r["message_id"])
        per_topic.setdefault(r["topic"], []).append(r["payload"].encode())
    expected: dict[str, list[bytes]] = {}
    for topic, payload in sent:
        expected.setdefault(topic, []).append(payload)
    assert {t: len(p) for t, p in per_topic.items()} == {t: len(p) for t, p in
                                                         expected.items()}
    assert per_topic == expected
