"""`process_nice` (docs/bridges.md "A separate uplink process"): the uplink process of a
`separate_process` bridge runs at the broker's niceness plus this increment, so that on a
busy gateway the broker and its clients get the cores first; out of 0-19 it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_broker.bridge.config import parse_bridges
from edge_broker.errors import ConfigError

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from tests.bridge.gateway import Gateway, jetstream_bridge, wait_until
from tests.integration.brokerprocess import needs_console_script


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: [0] is field 3."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _nice(pid: int) -> int:
    return int(_stat(pid)[16])  # field 19


@needs_console_script
def test_the_uplink_process_runs_at_the_configured_niceness(tmp_path: Path) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads the niceness from /proc")
    gateway = Gateway(tmp_path, jetstream_bridge(["nats://127.0.0.1:9"],
                                                 separate_process="true",
                                                 process_nice="7")).start()
    try:
        pid = wait_until(lambda: gateway.status("central")["uplink_process"], 20,
                         "the uplink process started")
        broker_nice = _nice(int(_stat(pid)[1]))  # field 4: the parent, the broker
        assert _nice(pid) == min(19, broker_nice + 7)
    finally:
        gateway.stop()


def test_process_nice_out_of_range_is_refused() -> None:
    entry = {"name": "c", "kind": "jetstream", "servers": ["nats://127.0.0.1:9"],
             "subject_prefix": "a.b", "jetstream_stream": "S", "separate_process": True,
             "process_nice": 20}
    with pytest.raises(ConfigError, match="process_nice"):
        parse_bridges([entry], file=None, gateway_id="gw")
    entry["process_nice"] = 5
    (config,) = parse_bridges([entry], file=None, gateway_id="gw")
    assert config.process_nice == 5
