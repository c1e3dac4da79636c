"""`edge-broker bridges status`: what an operator on the gateway sees of each bridge, asked of
the running broker over its admin socket."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from edge_broker import cli
from edge_broker.cli_bridges import render


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()


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
                   "downlink_published": 0, "downlink_duplicates": 0, "downlink_denied": 0})
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
