"""The broker as Eclipse Mosquitto's command-line clients see it (MQTT 3.1.1 and 5.0).

mosquitto_sub does not say when its subscription is in place, so before publishing the tests
poll the broker (deadline, no sleep) until the subscriber's session holds the filter.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import BrokerThread

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
    reason="mosquitto_pub/mosquitto_sub not found: sudo apt-get install mosquitto-clients")

TIMEOUT = 10.0
versions = pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])


def common(broker: BrokerThread, version: str) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.port), "-V", version]


def pub(broker: BrokerThread, version: str, *args: str) -> None:
    result = subprocess.run(["mosquitto_pub", *common(broker, version), *args],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr


class Sub:
    """A running mosquitto_sub; `wait_subscribed` polls the broker for its subscription."""

    def __init__(self, broker: BrokerThread, version: str, client_id: str, *args: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.process = subprocess.Popen(
            ["mosquitto_sub", *common(broker, version), "-i", client_id, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_subscribed(self, topic_filter: str) -> None:
        core = self.broker.app.core if self.broker.app is not None else None
        assert core is not None

        def subscribed() -> bool:
            session = core.sessions.get(self.client_id)
            return session is not None and session.online and topic_filter in \
                session.subscriptions

        deadline = time.monotonic() + TIMEOUT
        while not self.broker.call(subscribed):
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, f"{self.client_id} never subscribed"
            time.sleep(0.01)  # polling interval, bounded by the deadline

    def finish(self) -> str:
        """Wait for mosquitto_sub to exit on its own (-C); return what it printed."""
        stdout, stderr = self.process.communicate(timeout=TIMEOUT)
        assert self.process.returncode == 0, stderr
        return stdout


@pytest.fixture
def subs() -> Iterator[list[Sub]]:
    started: list[Sub] = []
    yield started
    for sub in started:
        if sub.process.poll() is None:
            sub.process.kill()
            sub.process.communicate()


@versions
def test_qos1_round_trip_and_exit_after_count(broker: BrokerThread, subs: list[Sub],
                                              version: str) -> None:
    sub = Sub(broker, version, "sub-1", "-t", "sensors/#", "-q", "1", "-C", "2", "-v")
    subs.append(sub)
    sub.wait_subscribed("sensors/#")
    pub(broker, version, "-t", "sensors/room1/temp", "-m", "21.5", "-q", "1")
    pub(broker, version, "-t", "other/topic", "-m", "ignored", "-q", "1")
    pub(broker, version, "-t", "sensors/room2/temp", "-m", "19.0", "-q", "1")
    # -C 2: exits 0 after the second message.
    assert sub.finish() == "sensors/room1/temp 21.5\nsensors/room2/temp 19.0\n"


@versions
def test_qos_and_retain_flag_as_delivered(broker: BrokerThread, subs: list[Sub],
                                          version: str) -> None:
    sub = Sub(broker, version, "sub-2", "-t", "q/#", "-q", "1", "-C", "3", "-F", "%t %q %r %p")
    subs.append(sub)
    sub.wait_subscribed("q/#")
    pub(broker, version, "-t", "q/zero", "-m", "a", "-q", "0")
    pub(broker, version, "-t", "q/two", "-m", "b", "-q", "2")  # downgraded to 1
    pub(broker, version, "-t", "q/retained", "-m", "c", "-q", "1", "-r")  # live: flag clear
    assert sub.finish() == "q/zero 0 0 a\nq/two 1 0 b\nq/retained 1 0 c\n"


@versions
def test_retained_set_received_and_cleared(broker: BrokerThread, subs: list[Sub],
                                           version: str) -> None:
    pub(broker, version, "-t", "cfg/interval", "-m", "30", "-q", "1", "-r")
    first = Sub(broker, version, "sub-3", "-t", "cfg/#", "-q", "1", "-C", "1",
                "-F", "%t %r %p")
    subs.append(first)
    assert first.finish() == "cfg/interval 1 30\n"

    pub(broker, version, "-t", "cfg/interval", "-q", "1", "-r", "-n")  # -n: empty, clears
    second = Sub(broker, version, "sub-4", "-t", "cfg/#", "-q", "1", "-C", "1",
                 "-F", "%t %r %p")
    subs.append(second)
    second.wait_subscribed("cfg/#")
    pub(broker, version, "-t", "cfg/live", "-m", "now", "-q", "1")
    # Had a retained message survived, it would have been sent before this live one.
    assert second.finish() == "cfg/live 0 now\n"


def test_v5_properties_pass_through(broker: BrokerThread, subs: list[Sub]) -> None:
    sub = Sub(broker, "mqttv5", "sub-5", "-t", "props", "-q", "1", "-C", "1",
              "-F", "%C|%P|%R|%p")
    subs.append(sub)
    sub.wait_subscribed("props")
    pub(broker, "mqttv5", "-t", "props", "-m", "{}", "-q", "1",
        "-D", "publish", "content-type", "application/json",
        "-D", "publish", "user-property", "site", "north",
        "-D", "publish", "response-topic", "reply/here")
    assert sub.finish() == "application/json|site:north|reply/here|{}\n"
