"""Issue 9, S1 with every message uplinked: a bridge's uplink in a process of its own
(`separate_process = true`, server/bridge_proc.py and server/bridge_child.py), through the real
broker (a subprocess) and a real nats-server.

- Forwarding works, and the parent shows the figures (admin socket `bridges`: connected,
  cursor, forwarded, backlog, the process's pid) while the process does the work.
- The uplink process SIGKILLed while it forwards is started again by the broker and resumes
  from the stored cursor: every acknowledged message upstream, in order, none stored twice.
- A broker restart with a backlog (the uplink down meanwhile): the process starts from the
  stored cursor and drains it once the server appears.
- A graceful stop stores the last acknowledged cursor: after a restart nothing is resent.
- A Kafka bridge forwards the same way (its config crosses to the process intact: in the
  compiled build `KafkaRoute` is a compiled class, which pickle cannot rebuild).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from edge_broker.bridge.config import parse_bridges
from edge_broker.server.bridge_wire import decode_config, encode_config, frame
from tests.bridge.gateway import (
    Device,
    Gateway,
    assert_in_order_once,
    kafka_bridge,
    separate_jetstream_bridge,
    stream_count,
    upstream,
    wait_until,
)
from tests.bridge.servers import NatsServer, Tansu
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script

TOPICS = 4


def _publish(device: Device, sent: list[tuple[str, bytes]], start: int, count: int) -> None:
    for n in range(start, start + count):
        topic = f"sensors/d{n % TOPICS}/temp"
        device.publish(topic, f"{n}".encode())
        sent.append((topic, f"{n}".encode()))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_forwards_and_the_broker_shows_it(nats_server: NatsServer, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, separate_jetstream_bridge(nats_server.url)).start()
    sent: list[tuple[str, bytes]] = []
    try:
        device = Device(gateway.port)
        try:
            _publish(device, sent, 0, 1000)
            device.wait_acked(1000)
        finally:
            device.close()
        status = wait_until(lambda: (s := gateway.status("central"))["forwarded"] >= 1000
                            and s["backlog_messages"] == 0 and s, 30, "all forwarded")
        pid = status["uplink_process"]
        assert pid and pid != gateway.broker.pid and _alive(pid)
        assert status["connected"] and status["uplink_process_starts"] == 1
        assert status["cursor"] >= 1000
        rows = upstream(gateway.bridge_config("central"))
    finally:
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=False)
    assert not _alive(pid), "the uplink process outlived the broker's stop"


def test_process_sigkilled_is_restarted_and_resumes(nats_server: NatsServer,
                                                    tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, separate_jetstream_bridge(nats_server.url, window="64")).start()
    sent: list[tuple[str, bytes]] = []
    try:
        device = Device(gateway.port)
        try:
            first = wait_until(lambda: gateway.status("central")["uplink_process"], 20,
                               "the uplink process started")
            _publish(device, sent, 0, 3000)
            # Killed while it forwards: part of the messages upstream, part not yet.
            wait_until(lambda: stream_count(nats_server.url) >= 300, 30, "forwarding")
            os.kill(first, signal.SIGKILL)
            _publish(device, sent, 3000, 2000)
            device.wait_acked(5000)
        finally:
            device.close()
        status = wait_until(lambda: (s := gateway.status("central"))["uplink_process"]
                            not in (None, first) and s["backlog_messages"] == 0
                            and s["forwarded"] > 0 and s, 60,
                            "a new uplink process drained the backlog")
        assert status["uplink_process_starts"] == 2
        assert status["failures"] >= 1 and "uplink process" in (status["last_error"] or "")
        rows = upstream(gateway.bridge_config("central"))
    finally:
        gateway.stop()
    # The resend after the kill carries the same Nats-Msg-Id: JetStream stores none twice.
    assert_in_order_once(rows, sent, duplicates_allowed=False)


def test_broker_restart_with_a_backlog(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")  # its port is chosen; not started yet
    gateway = Gateway(tmp_path, separate_jetstream_bridge(server.url)).start()
    sent: list[tuple[str, bytes]] = []
    try:
        device = Device(gateway.port)
        try:
            _publish(device, sent, 0, 2000)
            device.wait_acked(2000)
        finally:
            device.close()
        status = wait_until(lambda: (s := gateway.status("central"))["backlog_messages"]
                            == 2000 and s, 20, "the backlog counted")
        assert not status["connected"]
        gateway.stop()
        gateway.start()
        assert gateway.status("central")["backlog_messages"] == 2000
        server.start()
        try:
            wait_until(lambda: gateway.status("central")["backlog_messages"] == 0, 60,
                       "the backlog drained after the restart")
            rows = upstream(gateway.bridge_config("central"))
            gateway.stop()
            # A graceful stop stored the last cursor: a restart sends nothing again.
            gateway.start()
            wait_until(lambda: gateway.status("central")["connected"], 30, "reconnected")
            assert gateway.status("central")["cursor"] >= 2000
            assert stream_count(server.url) == len(rows)
        finally:
            server.stop()
    finally:
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=False)


def test_a_kafka_config_crosses_to_the_process_intact() -> None:
    import pickle

    (config,) = parse_bridges([{"name": "lake", "kind": "kafka", "servers": ["127.0.0.1:9"],
                                "topic_map": [{"filter": "alarms/#", "topic": "edge.alarms"},
                                              {"filter": "#", "topic": "edge.telemetry"}],
                                "separate_process": True}], file=None, gateway_id="gw7")
    sent = frame(("init", {"config": encode_config(config)}))
    assert decode_config(pickle.loads(sent[4:])[1]["config"]) == config


def test_kafka_forwards(tansu: Tansu, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, kafka_bridge([tansu.bootstrap], separate_process="true")).start()
    sent: list[tuple[str, bytes]] = []
    try:
        device = Device(gateway.port)
        try:
            _publish(device, sent, 0, 500)
            device.wait_acked(500)
        finally:
            device.close()
        status = wait_until(lambda: (s := gateway.status("lake"))["forwarded"] >= 500
                            and s["backlog_messages"] == 0 and s, 60, "all forwarded")
        assert status["uplink_process"]
        rows = wait_until(lambda: len(r := upstream(gateway.bridge_config("lake"))) >= 500
                          and r, 30, "all upstream")
    finally:
        gateway.stop()
    assert_in_order_once(rows, sent, duplicates_allowed=True)  # Kafka keeps resends
