"""Drops of rows an uplink process has in flight, settled between the broker and the process
(server/bridge_drops.py `DropSettler`, server/bridge_child_log.py `ChildLogReader`) and by
the store (store/log/bridges.py `drop`, `commit`: a real log, in memory), over random
schedules: the process reads, acknowledges and gives up windows; the broker drops the
oldest rows and writes cursors, each write carrying the rows of the writes it does not yet
know stored (as server/bridge_proc.py does), so a row may be handed to the store twice; the
frames between broker and process cross in both directions; the process may crash, losing
the frames it had not written yet.

At every step the count shown never goes down and never exceeds the rows skipped that the
broker has not seen acknowledged. Once everything is delivered and stored: it is exactly
the rows skipped that the broker never saw acknowledged, and so is the store's count (what
a restart shows). Not modelled: failed cursor writes (the store reloads its state: its
count may then stay higher, docs/bridges.md "Retention"), the in-broker reader (tests/bridge/
test_bridge_budget_inflight.py, test_bridge_inflight_drops.py), LogGate's held-back rows.
"""

from __future__ import annotations

import random
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

from edge_broker.server.bridge_child_log import ChildLogReader
from edge_broker.server.bridge_drops import DropSettler
from edge_broker.store.log import Log as StoreLog
from edge_broker.store.log import LogMessage, bridges, transaction
from edge_broker.store.log.cursors import Passed

from .test_bridge_child_log import raw

T = TypeVar("T")
ROWS = 60


class Log:
    """The store's log as both sides see it: a real log (in memory) with the bridge's reader
    "b", and its rows as the process reads them (after the stored cursor, as
    store/log/bridge_file.py `LogFile` does)."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        self.log = StoreLog(())
        with transaction(self.db):
            self.log.load(self.db)
            bridges.setup_reader(self.log, self.db, "b", ["s/#"])
            self.log.append(self.db, [LogMessage("s/x", b"p" * 10) for _ in range(ROWS)],
                            1000.0)
        self.reader = self.log.readers["bridge:b"]
        self.size = self.log.read_page(self.db, 0, self.reader.topics, 1).rows[0].size

    @property
    def stored(self) -> int:
        return self.reader.offset

    def page_of(self, make: Callable[[Sequence[Any], str, int], T], after: int,
                limit: int) -> tuple[list[T], int]:
        rows = [raw(o) for o in range(max(after, self.stored) + 1, ROWS + 1)][:limit]
        return [make(r, "s/x", 3) for r in rows], rows[-1][0] if rows else after

    def close(self) -> None:
        pass


class Model:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.log = Log()
        self.shown = 0
        self.settler = DropSettler(self._count)
        self.to_broker: deque[tuple[Any, ...]] = deque()
        self.to_process: deque[tuple[Any, ...]] = deque()
        # As server/bridge_proc.py: acknowledgements in no write yet, and the rows of the
        # writes not known stored (stored or not), which every later write carries again.
        self.unstored: list[tuple[int, Passed]] = []
        self.writing: list[tuple[int, Passed]] = []
        self.written = 0  # how many of `writing` the store has stored, not yet known
        self.skipped: set[int] = set()  # rows drops skipped
        self.seen_acked: set[int] = set()  # rows in acknowledgements the broker handled
        self.acked_cursor = 0  # the latest acknowledged cursor the broker heard of
        self.process: ChildLogReader | None = None
        self.start()

    def _count(self, count: int) -> None:
        assert count >= 0, count
        self.shown += count

    def start(self) -> None:
        """A process starts from the latest cursor acknowledged (bridge_proc.py `_run_once`)."""
        cursor = max(self.log.stored, self.acked_cursor)
        self.process = ChildLogReader(self.log, "own", self.to_broker.append, ROWS, cursor)
        self.acked = self.sent = cursor

    # -- the process ----------------------------------------------------------------------

    async def read(self) -> None:
        assert self.process is not None
        batch = await self.process.read_after(self.sent, self.rng.randint(1, 6))
        if batch:
            self.sent = batch[-1].offset

    async def ack(self) -> None:
        assert self.process is not None
        if self.sent > self.acked:
            self.acked = self.rng.randint(self.acked + 1, self.sent)
            await self.process.commit_cursor(self.acked)

    def rewind(self) -> None:
        assert self.process is not None
        self.process.rewind(self.acked)
        self.sent = self.acked

    def process_hears(self) -> None:
        assert self.process is not None
        if self.to_process:
            _, after, through = self.to_process.popleft()
            self.process.dropped(after, through)

    def crash(self) -> None:
        """The process ends; what it had not written yet is lost, the rest is delivered."""
        for _ in range(self.rng.randint(0, len(self.to_broker))):
            self.to_broker.pop()
        while self.to_broker:
            self.broker_hears()
        self.to_process.clear()
        self.settler.ended()
        self.start()

    # -- the broker -----------------------------------------------------------------------

    def broker_hears(self) -> None:
        if not self.to_broker:
            return
        message = self.to_broker.popleft()
        if message[0] == "ack":
            passed = Passed(message[2], message[3], message[4])
            if message[5] or self.settler.busy:
                self.settler.acked(passed, message[5])
            self.unstored.append((message[1], passed))
            self.acked_cursor = max(self.acked_cursor, message[1])
            self.seen_acked.update(passed.rows[0::2])
        elif message[0] == "log_held":
            self.settler.answered(message[1], message[2])
        elif message[0] == "log_released":
            self.settler.released(message[1])

    def store(self) -> None:
        """A cursor write of the latest acknowledged cursor, carrying the rows of the
        writes not known stored, stored by the real `bridges.commit` (rows a drop skipped
        come out of the store's count again, once)."""
        self.writing += self.unstored
        self.unstored = []
        if not self.writing:
            return
        target = max(cursor for cursor, _ in self.writing)
        with transaction(self.log.db):
            bridges.commit(self.log.log, self.log.db, "b", target,
                           [passed for _, passed in self.writing])
        self.written = len(self.writing)

    def known(self) -> None:
        """The broker learns that the last write was stored (its rows leave `writing`)."""
        del self.writing[:self.written]
        self.written = 0

    def drop(self) -> None:
        log = self.log
        left = log.reader.backlog_count
        if not left:
            return
        bound = (left - self.rng.randint(1, min(left, 8))) * log.size
        with transaction(log.db):
            skipped = bridges.drop(log.log, log.db, "b", max(1, bound))
        after, through = skipped.after, skipped.through
        self.skipped.update(range(after + 1, through + 1))
        unstored = [p for _, p in self.unstored] + [p for _, p in self.writing]
        if self.settler.skipped(after, through, skipped.count, unstored, True):
            self.to_process.append(("log_dropped", after, through))

    def check(self, before: int) -> None:
        assert before <= self.shown <= len(self.skipped - self.seen_acked), (
            before, self.shown, sorted(self.skipped - self.seen_acked))


@pytest.mark.parametrize("seed", range(150))
async def test_drops_in_flight_count_once_whatever_the_schedule(seed: int) -> None:
    rng = random.Random(seed)
    model = Model(rng)
    steps: list[Callable[[], Any]] = [
        model.read, model.read, model.ack, model.ack, model.rewind, model.process_hears,
        model.broker_hears, model.broker_hears, model.store, model.known, model.drop,
        model.crash]
    for _ in range(200):
        before = model.shown
        step = rng.choice(steps)
        result = step()
        if result is not None:
            await result
        model.check(before)
    # Settle: the process gives up what it holds (a rewind, or an end), every frame is
    # delivered both ways, every write stored.
    if rng.random() < 0.5:
        model.rewind()
    else:
        model.crash()
    while model.to_process or model.to_broker:
        model.process_hears()
        model.broker_hears()
    model.store()
    model.known()
    model.settler.ended()
    truth = len(model.skipped - model.seen_acked)
    assert model.shown == truth == model.log.reader.dropped, (model.shown, truth,
                                                              model.log.reader.dropped)
