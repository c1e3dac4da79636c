"""When to log a count of dropped messages: at most one line per interval, and at the end
(a stop, a close) whatever the last interval left unlogged.

Used where drops are counted as one growing total: a bridge's backlog bound (bridges.py),
its QoS 0 lane's (bridge_lane.py), the QoS 0 messages streams did not record (streams.py).
The queues' drops are per session and reported by the core (core/queues.py, app.py).
"""

from __future__ import annotations

import time

from ..core.queues import DROP_LOG_INTERVAL_S


class DropLog:
    """The last line's total and time; `due` says what the next line reports, if any."""

    __slots__ = ("interval", "logged", "logged_at")

    def __init__(self, interval: float = DROP_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self.logged = 0  # the total the last line reported
        self.logged_at = -1e18  # time.monotonic() of the last line

    def due(self, total: int, *, every: bool = False) -> int:
        """The drops a line should report now, of `total` (a count that only grows): those
        since the last line, once `interval` has passed since it, or at once with `every`
        (closing). 0: no line now. A non-zero answer counts as logged."""
        new = total - self.logged
        if new <= 0:
            return 0
        now = time.monotonic()
        if not every and now - self.logged_at < self.interval:
            return 0
        self.logged = total
        self.logged_at = now
        return new
