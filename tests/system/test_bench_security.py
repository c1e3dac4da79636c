"""The security benchmarks' pieces (S11-S13, benchmarks/scenarios_security.py): the load
generator's TLS path against a TLS edge-broker, the generated 1,000-rule ACL, and the quick
run of S11-S13 (delivery counts, no speed) against edge-broker and mosquitto.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import brokers, loadgen, security
from benchmarks.security import Security
from edge_broker.auth.acl import Acl
from tests.system.test_bench_smoke import REPO, TIMEOUT_S, _assert_delivered, _run_quick

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)


def test_generated_acl_has_1000_rules_and_grants_only_the_benchmark_topics() -> None:
    acl = Acl.parse(security.acl_text(), "bench-acl")
    assert acl.rule_count == security.ACL_RULES == 1000
    me = {"username": security.ACL_USER, "client_id": "bench-s13-sub"}
    assert acl.can_publish("bench/s13", **me)
    assert acl.can_read("bench/s13", **me)
    assert acl.can_read("site/dev0000/telemetry/t", **me)
    assert not acl.can_publish("site/dev0000/telemetry/t", **me)   # a read rule
    assert acl.can_publish("site/dev0001/cmd/c", **me)
    assert not acl.can_publish("bench/s13", username="dev0001", client_id="dev0001")
    assert not acl.can_publish("bench/s13", username=None, client_id="anon")


def test_tls_load_generator_counts_every_message_through_a_tls_edge_broker() -> None:
    """The TLS path of the publisher and the subscriber (QoS 0 and QoS 1): connects with the
    server verified against the run's CA, and every message is counted once."""
    rb = brokers.start("edge", sec=Security(tls=True))
    try:
        assert rb.cafile is not None
        info = security.negotiated(rb.host, rb.port, rb.cafile)
        assert info["version"] in ("TLSv1.2", "TLSv1.3"), info
        for qos in (0, 1):
            topic = f"bench/test-tls/{qos}"
            pub = loadgen.PubSpec(topic=topic, qos=qos, duration_s=0.5, rate=4000.0,
                                  cafile=rb.cafile)
            sub = loadgen.SubSpec(topic=topic, qos=qos, client_ids=[f"tls-sub-{qos}"],
                                  drain_s=10.0, cafile=rb.cafile)
            r = loadgen.run_flow(rb.host, rb.port, pub, sub, hard_timeout_s=40.0)
            assert r["published"] > 0, r
            assert r["delivered"] == r["expected"] == r["published"], r
            assert r["extra"] == 0 and r["protocol_errors"] == 0, r
            if qos == 1:
                assert r["acked"] == r["published"], r
    finally:
        rb.stop()


def test_tls_load_generator_refuses_a_server_from_another_ca(tmp_path: Path) -> None:
    """The server is verified: a CA that did not sign it makes the connection fail."""
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "edge_broker", "certs", "init-ca", str(other)],
                   check=True, capture_output=True, cwd=REPO, timeout=60)
    rb = brokers.start("edge", sec=Security(tls=True))
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            security.negotiated(rb.host, rb.port, str(other / "ca.crt"))
    finally:
        rb.stop()


def test_quick_security_scenarios_against_edge_broker(tmp_path: Path) -> None:
    scenarios = ["S11", "S12", "S13"]
    proc, data = _run_quick(tmp_path, "--brokers", "edge", "--scenarios", ",".join(scenarios))
    _assert_delivered(proc, data, "edge", scenarios)
    names = {c["name"] for c in data["scenarios"]["S13"]["edge"]["checks"]}
    assert "S13 ACL in force" in names
    assert data["scenarios"]["S12"]["edge"]["details"]["tls"]["version"] == "TLSv1.3"


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed "
                    "(sudo apt-get install mosquitto)")
def test_quick_security_scenarios_against_mosquitto(tmp_path: Path) -> None:
    """The same files (certificates, password file, ACL) work for the reference broker."""
    scenarios = ["S11", "S12", "S13"]
    proc, data = _run_quick(tmp_path, "--brokers", "mosquitto", "--scenarios",
                            ",".join(scenarios), timeout_s=TIMEOUT_S)
    _assert_delivered(proc, data, "mosquitto", scenarios)
