"""The test device of the gateway tests (tests/bridge/gateway.Device) against a broker that
falls far behind with its PUBACKs.

paho-mqtt numbers QoS 1 messages with the 16-bit packet identifier and refuses a publish
whose identifier is still awaiting its PUBACK (rc MQTT_ERR_QUEUE_SIZE, nothing sent). A device
that runs more than 65,535 publishes ahead of its PUBACKs would therefore count messages as
published that never left it: their PUBACKs can never come, and a test waiting for them sees
the acknowledgements stop for good (test_gateway_cluster failed so once in CI: 67,577 of
140,600). The device holds back instead, and every publish is acknowledged once the broker
catches up.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from tests.bridge.gateway import Device, wait_until
from tests.integration.brokerprocess import BrokerProcess, needs_console_script

pytestmark = needs_console_script

MESSAGES = 70_000  # more than the 65,535 packet identifiers a client has


def test_device_more_than_65535_publishes_ahead_of_its_pubacks(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data").wait_listening(20)
    device = Device(broker.port, client_id="dev-ahead")
    sent: list[tuple[str, bytes]] = []
    errors: list[BaseException] = []

    def publish_all() -> None:
        try:
            for n in range(MESSAGES):
                topic, payload = f"sensors/d{n % 4}/temp", f"{n}".encode()
                device.publish(topic, payload)
                sent.append((topic, payload))
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    publisher = threading.Thread(target=publish_all)
    try:
        # The broker answers nothing while stopped: every PUBACK is outstanding.
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            publisher.start()
            wait_until(lambda: not publisher.is_alive() or device.held_back.is_set(), 120,
                       "the device done publishing or holding back for PUBACKs")
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        publisher.join(120)
        assert not publisher.is_alive() and not errors, errors
        try:
            device.wait_acked(MESSAGES, 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; broker log (tail):\n{broker.stderr[-2000:]}") from exc
        assert sorted(device.acked) == sorted(sent)
    finally:
        device.close()
        broker.stop(20)
