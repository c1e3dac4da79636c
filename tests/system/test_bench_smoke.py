"""Smoke test of the benchmark harness: `python -m benchmarks --quick` counts deliveries.

Runs as a subprocess (the load generator forks worker processes and raises RLIMIT_NOFILE, which
should not happen inside pytest). Quick mode uses paced, modest rates, so any loss is a bug, not
overload; it exits 1 on a delivery-count failure. Budget: well under 60 s in total.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 50


def _edge_runnable() -> str | None:
    """None when edge-broker can be launched, else why not."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    for module in ("edge_broker.__main__", "edge_broker.server.run"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} does not exist yet"
        except (ImportError, ValueError) as exc:
            return f"{module} is not importable: {exc}"
    return None


def _run_quick(tmp_path: Path, *args: str,
               timeout_s: float = TIMEOUT_S) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "quick.json"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), *args]
    popen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the runner then stops the broker it started.
        popen.terminate()
        try:
            stdout, stderr = popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            stdout, stderr = popen.communicate()
        pytest.fail(f"quick benchmark exceeded {timeout_s} s\nstdout:\n{stdout}\n"
                    f"stderr:\n{stderr[-3000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc, data


def _assert_delivered(proc: subprocess.CompletedProcess, data: dict, broker: str,
                      scenarios: list[str]) -> None:
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert data.get("failures") == [], report
    for sc in scenarios:
        entry = data["scenarios"][sc][broker]
        assert "error" not in entry, f"{sc}: {entry.get('error')}\n{report}"
        assert entry["checks"], f"{sc} made no delivery check\n{report}"
        for check in entry["checks"]:
            assert check["ok"], f"{sc} {check['name']}: {check['detail']}\n{report}"


def test_quick_edge_broker_delivers_everything(tmp_path: Path) -> None:
    why = _edge_runnable()
    if why:
        pytest.skip(f"edge-broker is not runnable yet ({why}); the harness itself is "
                    "covered by the mosquitto smoke test")
    scenarios = ["S1", "S2", "S3", "S4", "S5", "S6", "S8"]
    proc, data = _run_quick(tmp_path, "--brokers", "edge", "--scenarios", ",".join(scenarios))
    _assert_delivered(proc, data, "edge", scenarios)
    s1 = data["scenarios"]["S1"]["edge"]["details"]["runs"][-1]
    assert s1["delivered"] == s1["published"] > 0
    # S4 runs once per durability; the store counters come from the running broker.
    s4 = data["scenarios"]["S4"]["edge"]["details"]["variants"]
    assert set(s4) == {"fsync", "os"}
    for durability, run in s4.items():
        assert run["drain"]["delivered"] == run["acked"] * run["sessions"] > 0
        ingest = run["store"]["ingest"]
        assert 0 < ingest["commits"] <= run["acked"], ingest
        assert (ingest["fsyncs"] > 0) == (durability == "fsync"), (durability, ingest)
    # S8: a broker restarted on a stored backlog restores it and resends one session's queue.
    s8 = data["scenarios"]["S8"]["edge"]["details"]
    start = s8["starts"][0]
    assert start["restored_queued"] == s8["messages"] > 0
    assert start["check"]["received"] == s8["per_session"] > 0
    assert start["check"]["in_order"]


@pytest.mark.skipif(shutil.which("mosquitto") is None
                    and not Path("/usr/sbin/mosquitto").exists(),
                    reason="mosquitto not installed (sudo apt-get install mosquitto)")
def test_quick_harness_against_mosquitto(tmp_path: Path) -> None:
    """The harness end to end against a reference broker, so it is checked before edge-broker
    runs. A subset of scenarios keeps it to about 25 s."""
    scenarios = ["S1", "S3", "S4", "S6", "S10"]
    proc, data = _run_quick(tmp_path, "--brokers", "mosquitto", "--scenarios",
                            ",".join(scenarios), timeout_s=TIMEOUT_S + 30)
    _assert_delivered(proc, data, "mosquitto", scenarios)
    s4 = data["scenarios"]["S4"]["mosquitto"]["details"]["variants"]["memory"]
    assert s4["drain"]["delivered"] == s4["acked"] * s4["sessions"] > 0
    figures = data["figures"]["mosquitto"]
    assert figures["S3.msgs_per_s"] > 0
    assert figures["S6.qos1_p99_ms"] is not None
    # S10: the control client did its round trips next to each kind of load, and the load ran.
    parts = data["scenarios"]["S10"]["mosquitto"]["details"]["parts"]
    _assert_fairness_ran(parts)
    for part in ("flood", "flood_sub"):
        assert parts[part]["load_rate"] > 0, parts[part]
    assert parts["flood_sub"]["load"]["not_delivered"] == 0, parts["flood_sub"]["load"]
    assert parts["churn"]["load"]["cycles"] > 0, parts["churn"]["load"]
    assert parts["takeover"]["load"]["taken_over"] > 0, parts["takeover"]["load"]


def _assert_fairness_ran(parts: dict) -> None:
    assert set(parts) == {"idle", "flood", "flood_sub", "churn", "takeover"}
    for part, r in parts.items():
        control = r["control"]
        assert control["started"] > 0 and control["rtt"]["p99_ms"] is not None, (part, control)
        if part in ("flood", "flood_sub"):
            assert r["load"]["sent"] > 0, (part, r["load"])
        elif part in ("churn", "takeover"):
            assert r["load"]["connects"] > 0, (part, r["load"])
            assert r["load"]["unexpected_packets"] == 0, (part, r["load"])


@pytest.mark.skipif(_edge_runnable() is not None, reason="edge-broker is not runnable yet")
def test_quick_fairness_scenario_runs_against_edge_broker(tmp_path: Path) -> None:
    """S10 against edge-broker runs every part to its end and reports figures. Whether the
    control client was served fast enough is the benchmark's verdict, not this test's (no
    timed assertions in tests), so the scenario's own checks (round trips done within a grace
    period, CONNACKs received) are not asserted here; mosquitto's run above asserts them."""
    proc, data = _run_quick(tmp_path, "--brokers", "edge", "--scenarios", "S10",
                            timeout_s=TIMEOUT_S + 40)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    entry = data.get("scenarios", {}).get("S10", {}).get("edge", {})
    assert "error" not in entry and "details" in entry, report
    _assert_fairness_ran(entry["details"]["parts"])
    assert data["machine"]["cpu_model"], data["machine"]


def test_loadgen_refuses_non_loopback() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks import loadgen

    loadgen.require_loopback("127.0.0.1")
    loadgen.require_loopback("localhost")
    with pytest.raises(ValueError, match="non-loopback"):
        loadgen.require_loopback("192.0.2.1")


def test_histogram_percentiles_are_close() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.histogram import Histogram, bucket_of, bucket_range

    for v in (0, 1, 127, 128, 129, 1000, 123_456, 10**9, 7 * 10**10):
        lo, hi = bucket_range(bucket_of(v))
        assert lo <= v < hi
        assert hi - lo <= max(1, lo // 64)
    h = Histogram()
    for v in range(1, 100_001):
        h.record(v * 1000)          # 1 us .. 100 ms
    assert abs(h.percentile(50) - 50_000_000) / 50_000_000 < 0.02
    assert abs(h.percentile(99) - 99_000_000) / 99_000_000 < 0.02
