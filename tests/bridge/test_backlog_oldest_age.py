"""`backlog_oldest_age_s` (`bridges status`, `--json`, `$SYS/broker/bridges/<name>/backlog/
oldest_age`) is the age of the oldest message after the cursor whenever there is a backlog,
also when the uplink never read a page: down since boot (nothing listens where its servers
are), or an existing stream that does not capture the bridge's subjects (the sink never
starts). In the broker and with `separate_process = true`.

The first message goes in, the status is polled until its age shows (>= 0.5 s), then more
go in: the age stays that of the first one (the publish time it gives is before the newer
ones were published). Waiting is polling with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bridge.gateway import jetstream_bridge, wait_until
from tests.bridge.servers import NatsServer, free_port
from tests.bridge.test_mqtt_upstream import Remote
from tests.integration.brokerprocess import BrokerProcess, needs_console_script

pytestmark = needs_console_script

SYS_TOPIC = "$SYS/broker/bridges/central/backlog/oldest_age"


def start_broker(tmp_path: Path, url: str, separate: bool, started: list[Any]) -> BrokerProcess:
    config = tmp_path / "edge-broker.toml"
    extra = {"separate_process": "true"} if separate else {}
    config.write_text('[broker]\ngateway_id = "gw7"\nsys_interval = 1\n'
                      '[storage]\ndurability = "os"\n\n' + jetstream_bridge([url], **extra))
    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening(20)
    started.append(_Stopped(broker))
    return broker


class _Stopped:
    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker

    def close(self) -> None:
        self.broker.kill()


def status(broker: BrokerProcess) -> dict[str, Any]:
    from edge_broker.server.admin import admin_request

    reply = asyncio.run(admin_request(broker.data_dir, {"command": "bridges"}))
    (found,) = reply["bridges"]
    result: dict[str, Any] = found
    return result


def check_oldest_age(broker: BrokerProcess, started: list[Any]) -> None:
    device = Remote(broker.port, "dev1")
    started.append(device)
    device.subscribe(SYS_TOPIC, 0)
    before_first = time.time()
    device.publish("sensors/a", b"first", qos=1)
    after_first = time.time()
    first = wait_until(lambda: (s := status(broker))["backlog_messages"] == 1
                       and s["backlog_oldest_age_s"] >= 0.5 and s, 30,
                       "the age of the one message waiting")
    assert not first["connected"]
    for i in range(4):
        device.publish("sensors/b", f"later{i}".encode(), qos=1)

    def aged() -> tuple[float, float, float] | None:
        asked = time.time()
        s = status(broker)
        if s["backlog_messages"] != 5:
            return None
        return asked, s["backlog_oldest_age_s"], time.time()

    asked, age, answered = wait_until(aged, 30, "5 messages waiting")
    # The oldest's publish time (now - age) is the first message's, not a later one's.
    assert before_first - 0.05 <= answered - age
    assert asked - age <= after_first + 0.05
    # $SYS shows it too (published every second; whole seconds).
    wait_until(lambda: any(m.payload not in (b"0 seconds", b"") for m in device.received
                           if m.topic == SYS_TOPIC), 30, f"{SYS_TOPIC} above 0")


@pytest.mark.parametrize("separate", [False, True], ids=["in-broker", "separate-process"])
def test_oldest_age_with_the_uplink_down_since_boot(tmp_path: Path, separate: bool,
                                                    started: list[Any]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    broker = start_broker(tmp_path, nowhere, separate, started)
    check_oldest_age(broker, started)


async def _other_stream(url: str) -> None:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(api.StreamConfig(name="EDGE", subjects=["other.>"]))
    finally:
        await nc.close()


@pytest.mark.parametrize("separate", [False, True], ids=["in-broker", "separate-process"])
def test_oldest_age_when_the_existing_stream_is_refused(
        tmp_path: Path, nats_server: NatsServer, separate: bool, started: list[Any]) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    asyncio.run(_other_stream(nats_server.url))  # does not capture site1.gw7.>
    broker = start_broker(tmp_path, nats_server.url, separate, started)
    check_oldest_age(broker, started)
    assert "the existing stream 'EDGE' captures ['other.>']" in status(broker)["last_error"]
