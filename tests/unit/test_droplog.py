"""server/droplog.py: a growing drop count is logged at most once per interval, and what an
interval left unlogged is logged at the end."""

from __future__ import annotations

from edge_broker.server.droplog import DropLog


def test_one_line_per_interval_and_the_rest_at_the_end() -> None:
    drops = DropLog(interval=3600.0)
    assert drops.due(0) == 0  # nothing dropped: no line
    assert drops.due(5) == 5  # the first drops: a line at once
    assert drops.due(7) == 0  # inside the interval: held back
    assert drops.due(9, every=True) == 4  # closing: the 4 held back
    assert drops.due(9, every=True) == 0  # no line of 0


def test_a_line_once_the_interval_has_passed() -> None:
    drops = DropLog(interval=0.0)
    assert drops.due(2) == 2
    assert drops.due(3) == 1
