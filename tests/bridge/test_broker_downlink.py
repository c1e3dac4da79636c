"""Bridges inside a BrokerApp, without a remote server: downlink positions stored with the
message (exactly once across a crash between the local commit and the remote ack), the ACL
identity of downlink messages, the store id, and the one-line error of a missing extra."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from edge_broker.bridge.base import DownlinkMessage
from edge_broker.bridge.config import parse_bridges
from edge_broker.config import Config
from edge_broker.errors import StoreError
from edge_broker.mqtt.packets import Connect, Subscribe, Subscription
from edge_broker.mqtt.properties import Properties
from edge_broker.server.app import BrokerApp
from tests.bridge.servers import Mosquitto
from tests.bridge.test_mqtt_upstream import Remote
from tests.conftest import broker_config
from tests.integration.brokerprocess import BrokerProcess, needs_console_script

# A closed port: the bridge's own connection attempts fail and back off (a minute), so only
# what the test hands the bridge happens.
TABLE = {"name": "central", "kind": "mqtt", "servers": ["mqtt://127.0.0.1:9"],
         "topics": ['sensors/# out 1 "" gw7/', 'cmd/# in 2 "" gw7/'],
         "backoff_initial": "1min", "backoff_max": "1min"}
JS_TABLE = {"name": "central", "kind": "jetstream", "servers": ["nats://127.0.0.1:9"],
            "uplink": ["sensors/#"], "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE",
            "downlink": ["site1.gw7.cmd.>"], "backoff_initial": "1min", "backoff_max": "1min"}


def config_with(tmp_path: Path, table: dict[str, object], acl: Path | None = None) -> Config:
    base = broker_config(tmp_path)
    bridges = parse_bridges([table], file="test.toml", gateway_id="gw7")
    auth = dataclasses.replace(base.auth, acl_file=acl) if acl else base.auth
    return dataclasses.replace(base, bridges=bridges, auth=auth)


class Source:
    """A downlink source standing for the remote side: records acknowledgements."""

    def __init__(self, crash: bool = False) -> None:
        self.crash = crash
        self.acked: list[int] = []

    async def ack(self, message: DownlinkMessage) -> None:
        if self.crash:
            raise ConnectionError("the process died before the remote ack")
        self.acked.append(message.position)

    def messages(self) -> None:  # pragma: no cover - not used: the test hands messages in
        raise NotImplementedError

    async def close(self) -> None:
        return None


def command(position: int, topic: str = "cmd/valve1") -> DownlinkMessage:
    return DownlinkMessage(topic=topic, payload=f"open{position}".encode(), source="EDGE",
                           position=position, qos=1)


def park_session(app: BrokerApp, client_id: str = "valve") -> None:
    """A stored session subscribed to cmd/#, offline: what it is sent stays in its queue."""
    core = app.core
    core.connect(Connect(client_id=client_id, clean_start=False, protocol_level=5,
                         properties=Properties(session_expiry_interval=3600)),
                 client_id=client_id, now=0.0, receive_maximum=10)
    core.subscribe(client_id, Subscribe(1, (Subscription("cmd/#", 1),), Properties()), now=0.0)
    core.disconnect(client_id, core.sessions[client_id].epoch, now=0.0, reason_code=0,
                    session_expiry_interval=None)


def queued(app: BrokerApp, client_id: str = "valve") -> list[bytes]:
    """What the offline session will be sent: its in-memory queue (old-path deliveries) and
    its backlog, the committed log rows its reader selects (offline persistent sessions are
    readers of the log: the messages are stored once there, not queued in memory)."""
    kept = [d.message.payload for d in app.core.sessions[client_id].queue]
    db = sqlite3.connect(f"file:{app.config.broker.data_dir / 'edge-broker.db'}?mode=ro",
                         uri=True)
    try:
        rows = db.execute("SELECT payload FROM log JOIN log_topics ON log.topic_id ="
                          " log_topics.id WHERE log_topics.name LIKE 'cmd/%' ORDER BY offset")
        return kept + [bytes(payload) for (payload,) in rows]
    finally:
        db.close()


async def test_downlink_position_commits_with_the_message_so_a_redelivery_is_not_doubled(
        tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    config = config_with(tmp_path, JS_TABLE)
    app = BrokerApp(config)
    await app.start()
    try:
        park_session(app)
        await app.commit()
        bridge = app.bridges.bridges["central"]
        with pytest.raises(ConnectionError):
            await bridge._take(Source(crash=True), command(5))
        assert queued(app) == [b"open5"]
    finally:
        await app.stop()
    # The remote side never got the ack: it delivers position 5 again, then 6.
    app = BrokerApp(config)
    await app.start()
    try:
        bridge = app.bridges.bridges["central"]
        source = Source()
        await bridge._take(source, command(5))
        await bridge._take(source, command(6))
        assert source.acked == [5, 6]
        assert queued(app) == [b"open5", b"open6"]
        assert bridge.status.downlink_duplicates == 1
        assert bridge.status.downlink_published == 1
    finally:
        await app.stop()


async def test_downlink_messages_are_published_as_the_bridge_identity_the_acl_names(
        tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user bridge:central\ntopic write cmd/#\n", encoding="utf-8")
    app = BrokerApp(config_with(tmp_path, TABLE, acl))
    await app.start()
    try:
        park_session(app)
        await app.commit()
        bridge = app.bridges.bridges["central"]
        source = Source()
        message = DownlinkMessage(topic="cmd/valve1", payload=b"open", source="mqtt:gw7",
                                  position=3, qos=2)
        refused = DownlinkMessage(topic="sensors/x", payload=b"no", source="mqtt:gw7",
                                  position=4, qos=1)
        await bridge._take(source, message)
        await bridge._take(source, refused)
        await bridge._take(source, message)  # QoS 2 resend before PUBREL: held, not again
        assert queued(app) == [b"open"]
        assert source.acked == [3, 4, 3]
        assert bridge.status.downlink_denied == 1
        db = sqlite3.connect(f"file:{app.config.broker.data_dir / 'edge-broker.db'}?mode=ro",
                             uri=True)
        try:  # the publisher recorded with the message (No Local, loop prevention)
            assert db.execute("SELECT origin FROM log").fetchall() == [("bridge-central",)]
        finally:
            db.close()
    finally:
        await app.stop()


async def test_the_store_id_is_made_with_the_file_and_kept(tmp_path: Path) -> None:
    config = config_with(tmp_path, TABLE)
    ids = []
    for _ in range(2):
        app = BrokerApp(config)
        await app.start()
        ids.append(app.bridges.to_dict()["store_id"])
        await app.stop()
    assert ids[0] == ids[1] and len(ids[0]) == 16
    (tmp_path / "data" / "edge-broker.db").unlink()
    app = BrokerApp(config)
    await app.start()
    try:
        assert app.bridges.to_dict()["store_id"] != ids[0]  # a rebuilt store: a new id
    finally:
        await app.stop()


@needs_console_script
def test_a_missing_extra_fails_start_up_with_one_line_naming_the_pip_install(
        tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "nats").mkdir(parents=True)
    (fake / "nats" / "__init__.py").write_text("raise ImportError('No module named nats')\n")
    config = tmp_path / "edge-broker.toml"
    config.write_text('''
[[bridges]]
name = "central"
kind = "jetstream"
servers = ["nats://127.0.0.1:9"]
uplink = ["sensors/#"]
subject_prefix = "site1.gw7"
jetstream_stream = "EDGE"
''', encoding="utf-8")
    broker = BrokerProcess(tmp_path / "data", "--config", str(config),
                           env_extra={"PYTHONPATH": str(fake)})
    assert broker.wait_exit() == 2
    errors = [line for line in broker.stderr.splitlines() if "ERROR" in line or "error" in line]
    assert len(errors) == 1, broker.stderr
    assert "pip install nats-py" in errors[0]
    assert f"{config}: [[bridges]] #1 \"central\" kind:" in errors[0]




async def test_a_local_failure_of_the_uplink_is_reported_and_the_uplink_goes_on(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    table = {**TABLE, "servers": [f"mqtt://127.0.0.1:{mosquitto.port}"],
             "backoff_initial": 1, "backoff_max": 1}
    app = BrokerApp(config_with(tmp_path, table))
    await app.start()
    cloud = Remote(mosquitto.port, "cloud")
    device = None
    try:
        cloud.subscribe("gw7/sensors/#", 1)
        side = app.store.bridges  # type: ignore[attr-defined]
        real_page = side.page
        failures = []

        async def page_failing_once(*args: object) -> object:
            if not failures:
                failures.append(1)
                raise StoreError("disk I/O error (injected)")
            return await real_page(*args)

        side.page = page_failing_once
        device = Remote(app.addresses[0][1], "dev1")
        device.publish("sensors/t1", b"after the failure", 1)
        (got,) = await asyncio.to_thread(cloud.wait_for, 1)
        assert got.payload == b"after the failure"
        status = app.bridges.to_dict()["bridges"][0]
        assert failures and "injected" in (status["last_error"] or "")
    finally:
        for client in (cloud, device):
            if client is not None:
                client.client.disconnect()
                client.client.loop_stop()
        await app.stop()
