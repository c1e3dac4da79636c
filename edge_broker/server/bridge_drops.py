"""Drops of rows a bridge's uplink process has in flight: dropped only once given up.

A `max_backlog_bytes` drop or a step of the store budget moves a bridge's stored cursor past
its oldest rows (store/log/cursors.py `drop_to_bound`, counted in `Reader.dropped`). Some of
them may be in flight then: read by the uplink, sent, their acknowledgement not back yet.
Acknowledged later, they were forwarded: the store takes them out of `Reader.dropped` again
when a cursor write passes them (store/log/bridges.py `commit`), and the broker never shows
them as dropped. Given up instead (the window failed or was acknowledged in part: the uplink
does not read them again, the stored cursor being past them) they count as dropped then.

So `Bridge.dropped` (server/bridges.py: what `bridges status`, $SYS and the metrics show) is
the rows drops skipped that were not in flight, plus those given up; it never goes down. The
in-process uplink's reader settles its drops itself (server/bridge_log.py `skipped`): it
holds the rows read. With a separate process (server/bridge_proc.py) that process holds them,
so a drop is settled in an exchange (server/bridge_wire.py), kept here:

1. `skipped`: the store's drop returned (after, through] and its row count. Rows of it in
   acknowledgements not yet stored are forwarded (their write, queued after the drop, takes
   them out again); the rest are unsettled, and the process is asked ("log_dropped").
2. Acknowledgements arriving before its answer may pass more rows of it: forwarded too.
3. The answer ("log_held", count): that many are held by the process; every other unsettled
   row counts as dropped now.
4. Later acknowledgements say how many held rows they pass (forwarded); "log_released" says
   how many were given up (dropped now). A process that ends (a crash, a restart, a stop)
   gives up what it held and what it had not answered: a new one starts after the stored
   cursor, past them.

The process answers in order, after every acknowledgement it sent before the question, so no
row is counted twice. What a crash of the broker leaves unsettled stays in `Reader.dropped`
(it may have arrived: the count errs towards dropped).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from ..store.log.cursors import Passed


def count_none(_count: int) -> None:
    """A `count` that keeps no account (readers and forwarders made without one)."""


class DropSettler:
    """The broker's account of a separate uplink process's drops (see the module docstring).
    `count(n)`: n more rows count as dropped."""

    def __init__(self, count: Callable[[int], None]) -> None:
        self.count = count
        # Drops asked about, not answered: [after, through, unsettled rows, acked since].
        self._asked: deque[list[int]] = deque()
        self.held = 0  # rows the process said it holds, not yet acknowledged or given up

    @property
    def busy(self) -> bool:
        """An acknowledgement needs looking at (`acked`)."""
        return bool(self._asked) or self.held > 0

    def skipped(self, after: int, through: int, count: int, unstored: Iterable[Passed],
                running: bool) -> bool:
        """A drop skipped `count` rows, the bridge's in (after, through]; `unstored`: the
        acknowledged rows whose cursor write is not yet known stored. True: ask the process
        ("log_dropped"); False (none runs): settled now."""
        acked = sum(passed.between(after, through) for passed in unstored)
        if not running:
            self.count(count - acked)
            return False
        self._asked.append([after, through, count - acked, 0])
        return True

    def acked(self, passed: Passed, held: int) -> None:
        """An acknowledgement passing `passed`, `held` of them held by the process."""
        self.held -= held
        for entry in self._asked:
            entry[3] += passed.between(entry[0], entry[1])

    def answered(self, through: int, held: int) -> None:
        """"log_held": the oldest question's answer."""
        if not self._asked:
            return
        _, asked_through, unsettled, acked = self._asked.popleft()
        assert asked_through == through, (asked_through, through)
        self.held += held
        self.count(unsettled - acked - held)

    def released(self, count: int) -> None:
        """"log_released": held rows given up."""
        self.held -= count
        self.count(count)

    def ended(self) -> None:
        """The process ended: what it held, and what it did not answer, is given up."""
        while self._asked:
            _, _, unsettled, acked = self._asked.popleft()
            self.count(unsettled - acked)
        if self.held:
            self.count(self.held)
            self.held = 0
