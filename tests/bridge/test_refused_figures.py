"""The `refused` and `unrouted` figures of a bridge where an operator looks: $SYS, /metrics,
`edge-broker bridges status` (text and --json: the broker's answer as it is)."""

from __future__ import annotations

from edge_broker.bridge.config import parse_bridges
from edge_broker.cli_bridges import render
from edge_broker.server.bridge_status import BridgeStatus, bridge_families, bridge_sys_topics


def test_sys_topics_and_metrics_have_refused_and_unrouted() -> None:
    (config,) = parse_bridges([{"name": "lake", "kind": "kafka", "servers": ["k:9092"],
                                "topic_map": [{"filter": "#", "topic": "t"}]}],
                              file="test.toml", gateway_id="gw7")
    status = BridgeStatus("lake", "kafka", True, forwarded=10, refused=2, unrouted=3)
    topics = bridge_sys_topics([config], [status])
    assert topics["$SYS/broker/bridges/lake/refused"] == "2"
    assert topics["$SYS/broker/bridges/lake/unrouted"] == "3"
    families = {f.name: f for f in bridge_families([status])}
    for name, value in (("edge_broker_bridge_refused_total", 2.0),
                        ("edge_broker_bridge_unrouted_total", 3.0),
                        ("edge_broker_bridge_forwarded_total", 10.0)):
        family = families[name]
        assert family.type == "counter"
        assert family.samples == [((("bridge", "lake"), ("kind", "kafka")), value)]
    assert status.to_dict()["refused"] == 2 and status.to_dict()["unrouted"] == 3


def test_the_status_block_says_what_was_skipped() -> None:
    base = {"name": "central", "enabled": True, "connected": True, "cursor": 12,
            "backlog_messages": 0, "backlog_bytes": 0, "backlog_oldest_age_s": 0.0,
            "forwarded": 10, "forwarded_per_s": 0.0, "failures": 0, "last_error": None,
            "dropped": 0, "expired": 0, "refused": 1, "unrouted": 0}
    jetstream = render({**base, "kind": "jetstream"}).splitlines()
    assert ("  skipped     1 refused (the remote side can never take them: too large, topic "
            "too long; logged)") in jetstream
    assert not any("unrouted" in line or "expired" in line for line in jetstream)
    kafka = render({**base, "kind": "kafka", "unrouted": 1234}).splitlines()
    assert any(line.startswith("  skipped     1 refused") and line.endswith(
        ", 1,234 unrouted (no topic line or topic_map entry sends them)") for line in kafka)
    mqtt = render({**base, "kind": "mqtt", "expired": 2}).splitlines()
    assert any(line.endswith(", 2 expired (Message Expiry Interval)") for line in mqtt)
    assert kafka.index(next(line for line in kafka if "skipped" in line)) == \
        kafka.index("  dropped     0 messages (max_backlog_bytes)") + 1
