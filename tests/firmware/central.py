"""A central subscriber for the firmware tests: paho-mqtt, persistent session, QoS 1.

It records every telemetry payload per device (duplicates included) and the other messages, and
lets a test wait on a condition with a deadline (no sleeps)."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt


class Central:
    def __init__(self, client_id: str = "central", protocol: Any = mqtt.MQTTv311) -> None:
        self.client_id = client_id
        self.protocol = protocol
        self.cond = threading.Condition()
        self.telemetry: dict[str, list[str]] = defaultdict(list)  # device -> payloads as received
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client: mqtt.Client | None = None
        self.subscribed = threading.Event()

    def connect(self, port: int, topics: tuple[str, ...] = ("devices/#",)) -> Central:
        """Connect (again) with the same client id and clean session 0; subscribe at QoS 1."""
        self.subscribed.clear()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=False, protocol=self.protocol)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            c.subscribe([(topic, 1) for topic in topics])

        def on_subscribe(*_args: Any) -> None:
            self.subscribed.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_message
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        self.client = client
        assert self.subscribed.wait(10), "central subscriber: no SUBACK"
        return self

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            parts = msg.topic.split("/")
            if len(parts) == 3 and parts[2] == "telemetry":
                self.telemetry[parts[1]].append(msg.payload.decode())
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.cond.notify_all()

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self.cond.wait(min(left, 0.2))

    def events(self, device: str) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(p) for t, p, _r in self.messages if t == f"devices/{device}/event"]
