"""Model-based test of the log (edge_broker.store.log): random append / subscribe /
unsubscribe / read-advance / in-flight / drop / retention / reopen sequences against a plain
reference model, in which each reader's due messages are simply the list of appended
messages after its position that one of its filters selects (offset above that filter's
since). Every reader must read exactly those, in order, whatever retention, compaction or a
reopen did in between; its backlog counters must equal the model's; the topic counters must
equal a count of the rows."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge_broker.mqtt.topics import topic_matches
from edge_broker.store.log import (
    Log,
    LogMessage,
    StreamConfig,
    cursors,
    retention_step,
    transaction,
)

TOPICS = ["a", "a/b", "a/c", "b", "b/c", "$s/x"]
FILTERS = ["a", "a/#", "+", "+/c", "#", "b/+", "$s/#", "nothing"]
READERS = ["r1", "r2", "r3"]
STREAMS = (StreamConfig("small", "a/#", max_age_s=30, max_bytes=400),
           StreamConfig("lv", "+/c", max_age_s=None, max_bytes=10_000, last_value=True),
           StreamConfig("none", "zzz/#"))


class ModelReader:
    def __init__(self, position: int) -> None:
        self.position = position
        self.filters: dict[str, int] = {}
        self.inflight: dict[int, int] = {}  # packet id -> offset


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="log-model-"))
        self.conn = self._connect()
        self.log = Log(STREAMS)
        with transaction(self.conn):
            self.log.load(self.conn)
        self.messages: list[tuple[int, str, int]] = []  # offset, topic, size
        self.readers: dict[str, ModelReader] = {}
        self.now = 1000.0
        self.next_packet_id = 1

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.dir / "log.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    def teardown(self) -> None:
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def due(self, name: str) -> list[tuple[int, str, int]]:
        reader = self.readers[name]
        return [m for m in self.messages if m[0] > reader.position and any(
            topic_matches(f, m[1]) and m[0] > since for f, since in reader.filters.items())]

    # -- rules ----------------------------------------------------------------------------

    @rule(topics=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=6),
          size=st.integers(0, 60), step=st.floats(-50, 50))
    def append(self, topics: list[str], size: int, step: float) -> None:
        self.now += step  # the wall clock may go back too
        with transaction(self.conn):
            offsets = self.log.append(
                self.conn, [LogMessage(t, b"p" * size) for t in topics], self.now)
        assert offsets == list(range(offsets[0], offsets[0] + len(topics)))
        assert not self.messages or offsets[0] > self.messages[-1][0]
        self.messages += [(o, t, len(t) + size) for o, t in zip(offsets, topics, strict=True)]

    @rule(name=st.sampled_from(READERS), topic_filter=st.sampled_from(FILTERS))
    def subscribe(self, name: str, topic_filter: str) -> None:
        with transaction(self.conn):
            cursors.add_reader(self.log, self.conn, name)
            since = cursors.subscribe(self.log, self.conn, name, topic_filter)
        reader = self.readers.setdefault(name, ModelReader(self.log.last_offset))
        expected = reader.filters.setdefault(topic_filter, self.log.last_offset)
        assert since == expected

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.readers)))
        topic_filter = data.draw(st.sampled_from(FILTERS))
        with transaction(self.conn):
            removed = cursors.unsubscribe(self.log, self.conn, name, topic_filter)
        assert removed == (self.readers[name].filters.pop(topic_filter, None) is not None)

    @precondition(lambda self: self.readers)
    @rule(data=st.data(), limit=st.integers(1, 8), hold=st.booleans())
    def read_advance(self, data: st.DataObject, limit: int, hold: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.readers)))
        reader = self.readers[name]
        page = cursors.read(self.log, self.conn, name, limit)
        due = self.due(name)
        assert [(r.offset, r.topic, r.size) for r in page.rows] == due[:limit]
        assert len(page.rows) == min(limit, len(due))
        with transaction(self.conn):
            cursors.advance(self.log, self.conn, name, page.rows, page.end)
            if hold and page.rows:
                packet_id = self.next_packet_id
                self.next_packet_id += 1
                cursors.set_inflight(self.log, self.conn, name, packet_id,
                                     page.rows[0].offset, 1)
                reader.inflight[packet_id] = page.rows[0].offset
        reader.position = page.end

    @precondition(lambda self: any(r.inflight for r in self.readers.values()))
    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, r in self.readers.items()
                                                if r.inflight)))
        reader = self.readers[name]
        packet_id = data.draw(st.sampled_from(sorted(reader.inflight)))
        with transaction(self.conn):
            assert cursors.clear_inflight(self.log, self.conn, name, packet_id)
        del reader.inflight[packet_id]

    @precondition(lambda self: self.readers)
    @rule(data=st.data(), bound=st.integers(1, 5))  # 0 would mean no bound
    def drop_to_bound(self, data: st.DataObject, bound: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.readers)))
        due = self.due(name)
        with transaction(self.conn):
            dropped = cursors.drop_to_bound(self.log, self.conn, name, max_count=bound)
        skipped = due[:max(0, len(due) - bound)]
        assert (dropped.count, dropped.bytes) == (len(skipped), sum(m[2] for m in skipped))
        if skipped:
            self.readers[name].position = skipped[-1][0]

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def remove_reader(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.readers)))
        with transaction(self.conn):
            assert cursors.remove_reader(self.log, self.conn, name)
        del self.readers[name]

    @rule(later=st.floats(0, 100), budget=st.integers(1, 10))
    def retention(self, later: float, budget: int) -> None:
        now = self.now + later
        with transaction(self.conn):
            report = retention_step(self.log, self.conn, now, budget=budget)
        if report.done:  # every stream is within its bounds
            for state in self.log.streams.values():
                config = state.config
                assert config.max_bytes is None or state.bytes <= config.max_bytes
                if config.max_age_s is not None and state.count:
                    marks = ", ".join("?" * len(state.topics))
                    first = self.conn.execute(
                        "SELECT at FROM log WHERE offset = (SELECT min(offset) FROM log"
                        f" WHERE offset >= ? AND topic_id IN ({marks}))",
                        (state.first_offset, *state.topics)).fetchone()
                    assert first[0] >= now - config.max_age_s
        # In-flight rows are still there (a resend needs them).
        for reader in self.readers.values():
            for offset in reader.inflight.values():
                assert self.conn.execute("SELECT 1 FROM log WHERE offset = ?",
                                         (offset,)).fetchone()

    @rule()
    def reopen(self) -> None:
        self.conn.close()
        self.conn = self._connect()
        before = self.log
        self.log = Log(STREAMS)
        with transaction(self.conn):
            self.log.load(self.conn)
        assert (self.log.last_offset, self.log.by_id) == (before.last_offset, before.by_id)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def backlogs_match_the_model(self) -> None:
        for name in self.readers:
            due = self.due(name)
            assert cursors.backlog(self.log, name) == cursors.Backlog(
                len(due), sum(m[2] for m in due))
            assert self.log.readers[name].inflight == {
                p: (o, 1) for p, o in self.readers[name].inflight.items()}

    @invariant()
    def stream_counters_match_the_rows(self) -> None:
        for state in self.log.streams.values():
            count, size = 0, 0
            for tid in state.topics:
                n, payload = self.conn.execute(
                    "SELECT count(*), coalesce(sum(length(payload)), 0) FROM log"
                    " WHERE topic_id = ? AND offset >= ?", (tid, state.first_offset)).fetchone()
                count += n
                size += payload + n * self.log.by_id[tid].name_size
            assert (state.count, state.bytes) == (count, size), state.config.name

    @invariant()
    def topic_counters_match_the_rows(self) -> None:
        rows = dict.fromkeys(self.log.by_id, (0, 0))
        for tid, count, size in self.conn.execute(
                "SELECT topic_id, count(*), sum(length(payload)) FROM log GROUP BY topic_id"):
            rows[tid] = (count, size + count * self.log.by_id[tid].name_size)
        assert rows == {t: (s.count, s.bytes) for t, s in self.log.by_id.items()}


LogMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLogModel = LogMachine.TestCase
