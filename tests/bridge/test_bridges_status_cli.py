"""`edge-broker bridges status`: what an operator on the gateway sees of each bridge, asked of
the running broker over its admin socket."""

from __future__ import annotations

import json
from pathlib import Path

from edge_broker.cli_bridges import render
from tests.bridge.gateway import Device, Gateway, jetstream_bridge, wait_until
from tests.bridge.servers import NatsServer
from tests.integration.brokerprocess import needs_console_script, run_in_process


def run(*argv: str) -> tuple[int, str, str]:
    return run_in_process(*argv)


def test_no_broker_running_exits_3_saying_so(tmp_path: Path) -> None:
    code, out, err = run("bridges", "status", "--data-dir", str(tmp_path))
    assert code == 3 and out == ""
    assert f"no broker is running with the data directory {tmp_path}" in err


def test_one_block_per_bridge_says_why_it_is_not_connected() -> None:
    text = render({"name": "central", "kind": "jetstream", "enabled": True,
                   "connected": False, "cursor": 1200, "backlog_messages": 3400,
                   "backlog_bytes": 2_500_000, "backlog_oldest_age_s": 95.0,
                   "forwarded": 1200, "forwarded_per_s": 0.0, "failures": 4,
                   "last_error": "BridgeError: cannot connect to nats://10.0.0.5:4222",
                   "last_error_at": None, "dropped": 7, "downlink_connected": False,
                   "downlink_published": 0, "downlink_duplicates": 0, "downlink_denied": 0,
                   # An uplink in the broker has no process: nothing said about one.
                   "uplink_process": None, "uplink_process_starts": 0})
    assert text.splitlines() == [
        "bridge central (jetstream)",
        "  uplink      NOT connected: BridgeError: cannot connect to nats://10.0.0.5:4222",
        "  cursor      1,200 (log offset acknowledged upstream)",
        "  backlog     3,400 messages, 2.4 MB, oldest 95.0 s",
        "  forwarded   1,200 total, 0.0/s",
        "  dropped     7 messages (max_backlog_bytes)",
        "  failures    4 connection or send attempts failed",
        "  last error  BridgeError: cannot connect to nats://10.0.0.5:4222",
    ]


@needs_console_script
def test_status_of_a_running_gateway(nats_server: NatsServer, tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, jetstream_bridge([nats_server.url])).start()
    try:
        wait_until(lambda: gateway.status("central")["connected"], 20, "bridge connected")
        device = Device(gateway.port)
        try:
            for n in range(10):
                device.publish("sensors/d1/temp", f"{n}".encode())
            device.wait_acked(10)
        finally:
            device.close()
        wait_until(lambda: gateway.status("central")["forwarded"] == 10, 20, "forwarded")
        code, out, err = run("bridges", "status", "--config", str(gateway.config))
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith("gateway gw7, store id ")
        assert "bridge central (jetstream)" in lines
        assert "  uplink      connected" in lines
        assert "  backlog     0 messages, 0 B, oldest 0.0 s" in lines
        assert any(line.startswith("  forwarded   10 total, ") for line in lines)
        code, out, _ = run("bridges", "status", "central", "--json", "--config",
                           str(gateway.config))
        reply = json.loads(out)
        assert code == 0 and reply["gateway_id"] == "gw7"
        assert [b["name"] for b in reply["bridges"]] == ["central"]
        code, _, err = run("bridges", "status", "nope", "--config", str(gateway.config))
        assert code == 1 and "no bridge 'nope'" in err
    finally:
        gateway.stop()
