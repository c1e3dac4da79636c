"""server/metrics.py SysLoad: mosquitto's $SYS/broker/load averages, per minute, weighted
e^(-elapsed / window) per update."""

from __future__ import annotations

import math

import pytest

from edge_broker.server.metrics import LOAD_SOURCES, SysLoad


def test_the_averages_move_towards_the_rate_per_minute_by_their_window() -> None:
    zero = (0,) * len(LOAD_SOURCES)
    load = SysLoad(zero, now=0.0)
    received = (600, *zero[1:])  # 600 packets in 10 s: 3,600 a minute
    topics = load.topics(received, now=10.0)
    for window, seconds in (("1min", 60), ("5min", 300), ("15min", 900)):
        value = float(topics[f"$SYS/broker/load/messages/received/{window}"])
        assert value == pytest.approx((1 - math.exp(-10 / seconds)) * 3600, abs=0.01)
        assert topics[f"$SYS/broker/load/messages/sent/{window}"] == "0.00"
    # Steady at the same rate for long: the 1 minute average reaches it.
    for step in range(2, 200):
        topics = load.topics((600 * step, *zero[1:]), now=10.0 * step)
    assert float(topics["$SYS/broker/load/messages/received/1min"]) == pytest.approx(3600, 0.01)
    # Quiet again: it decays.
    later = load.topics((600 * 199, *zero[1:]), now=10.0 * 199 + 60)
    assert float(later["$SYS/broker/load/messages/received/1min"]) == pytest.approx(
        3600 * math.exp(-1), abs=1)
