"""A bridge that cannot start says why in its status (`edge-broker bridges status`)."""

from __future__ import annotations

from types import SimpleNamespace

from edge_broker.bridge.config import parse_bridges
from edge_broker.cli_bridges import render
from edge_broker.server.bridges import BridgeManager

JS = {"name": "central", "kind": "jetstream", "servers": ["nats://127.0.0.1:4222"],
      "uplink": ["sensors/#"], "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE"}


def test_bridge_on_a_store_without_a_log_reports_why_it_did_not_start() -> None:
    bridges = parse_bridges([JS], file="/etc/edge-broker.toml", gateway_id="gw7")
    app = SimpleNamespace(config=SimpleNamespace(bridges=bridges,
                                                 broker=SimpleNamespace(gateway_id="gw7"),
                                                 source=None),
                          store=object(), core=SimpleNamespace())  # a store without `bridges`
    manager = BridgeManager(app)  # type: ignore[arg-type]
    manager.setup()
    (status,) = manager.to_dict()["bridges"]
    assert not status["connected"]
    assert 'persistence = "sqlite"' in (status["last_error"] or "")
    shown = render(status)
    assert "(connecting)" not in shown
    assert 'NOT connected: not started: bridges need [storage] persistence = "sqlite"' in shown
