"""SqliteStore beyond the shared contract: schema versions, damage and recovery, durability,
group commit, full storage (the cap and a full disk), the read-only helpers, fault injection.

A full disk is simulated with `PRAGMA max_page_count` on the store's own connection, which
makes SQLite answer SQLITE_FULL exactly as on a real full disk, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_broker.core.changes import (
    AWAIT_ACK,
    Change,
    DeliveryDeleted,
    DeliveryRecord,
    DeliverySaved,
    Message,
    MessageSaved,
    Qos2Received,
    RetainedDeleted,
    RetainedSaved,
    SessionDeleted,
    SessionRecord,
    SessionSaved,
    SubscriptionRecord,
    SubscriptionSaved,
)
from edge_broker.errors import StoreError, StoreFullError, StoreInUseError
from edge_broker.mqtt.packets import Will
from edge_broker.store.base import DONE
from edge_broker.store.sqlite import (
    SCHEMA_VERSION,
    SqliteStore,
    maintenance,
    read_session,
    read_sessions,
    read_stats,
)
from edge_broker.store.sqlite import sql as sql_module
from edge_broker.store.sqlite import store as store_module

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def msg(mid: int, size: int = 10, received_at: float = 0.0) -> MessageSaved:
    return MessageSaved(Message(mid, f"t/{mid}", bytes(size), 1, False, received_at=received_at))


def dlv(client_id: str, did: int, mid: int | None = None, **kw: Any) -> DeliverySaved:
    return DeliverySaved(DeliveryRecord(client_id, did, did if mid is None else mid, 1, False,
                                        **kw))


def sess(client_id: str, **kw: Any) -> SessionSaved:
    return SessionSaved(SessionRecord(client_id, 5, 3600, **kw))


def queue(client_id: str, ids: range, size: int = 10) -> list[Change]:
    out: list[Change] = []
    for i in ids:
        out += [msg(i, size), dlv(client_id, i)]
    return out


async def apply_all(store: SqliteStore, batches: Sequence[Sequence[Change]]) -> None:
    waiters = [store.apply(batch) for batch in batches]
    for waiter in waiters:
        await waiter


def peek(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the file from outside, as another process would (sees committed data only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return list(db.execute(sql))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a state that has no event of its own, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


async def pragma(store: SqliteStore, sql: str) -> Any:
    """Run a statement on the store's own connection (in its database thread)."""
    rows = await store._query(sql)
    return rows[0][0] if rows else None


@pytest.fixture(autouse=True)
async def _close_every_store(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Close whatever a test opened, also when it failed half-way (no leaked threads or
    open files into the next test)."""
    opened: list[SqliteStore] = []
    real_open = SqliteStore.open

    async def tracking_open(self: SqliteStore) -> Any:
        opened.append(self)
        return await real_open(self)

    monkeypatch.setattr(SqliteStore, "open", tracking_open)
    yield
    for s in opened:
        with contextlib.suppress(Exception):
            await s.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    # No disk reserve: `full` must not depend on how much room the test machine has.
    s = SqliteStore(path, ballast_bytes=64 * 1024, disk_reserve_bytes=0)
    await s.open()
    yield s
    await s.close()


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("existing", [False, True], ids=["no-file", "empty-file"])
async def test_creates_the_schema(path: Path, existing: bool) -> None:
    if existing:
        path.write_bytes(b"")
    s = SqliteStore(path)
    snapshot = await s.open()
    assert snapshot.sessions == [] and snapshot.messages == {}
    assert await pragma(s, "PRAGMA user_version") == SCHEMA_VERSION
    assert await pragma(s, "PRAGMA journal_mode") == "wal"
    assert await pragma(s, "PRAGMA auto_vacuum") == 2  # incremental
    await s.close()
    tables = {r[0] for r in peek(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"sessions", "subscriptions", "messages", "deliveries", "retained",
            "incoming_qos2", "quarantine"} <= tables
    # Closing checkpointed and truncated the WAL.
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


async def test_reopening_does_not_migrate_again(path: Path) -> None:
    s = SqliteStore(path)
    await s.open()
    await apply_all(s, [[sess("c")]])
    await s.close()
    s = SqliteStore(path)
    snapshot = await s.open()
    await s.close()
    assert [r.client_id for r in snapshot.sessions] == ["c"]


async def test_refuses_a_newer_schema_version(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    with pytest.raises(StoreError) as error:
        await SqliteStore(path).open()
    text = str(error.value)
    assert str(path) in text and str(SCHEMA_VERSION + 7) in text and str(SCHEMA_VERSION) in text


# --------------------------------------------------------------------------- damage


async def test_not_a_database_names_the_file_and_recover(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database, just some bytes\n" * 200)
    with pytest.raises(StoreError) as error:
        await SqliteStore(path).open()
    assert str(path) in str(error.value) and "--recover" in str(error.value)


async def test_damaged_pages_name_the_file_and_recover(path: Path) -> None:
    s = SqliteStore(path, ballast_bytes=0)
    await s.open()
    await apply_all(s, [[sess("c"), *queue("c", range(1, 300), 1000)]])
    await s.close()
    size = path.stat().st_size
    with path.open("r+b") as f:  # scribble over the pages after the first two
        f.seek(2 * 4096)
        f.write(os.urandom(size - 3 * 4096))
    with pytest.raises(StoreError) as error:
        await SqliteStore(path).open()
    assert str(path) in str(error.value) and "--recover" in str(error.value)


async def test_move_aside_then_start_empty(path: Path) -> None:
    path.write_bytes(b"garbage" * 1000)
    Path(f"{path}-wal").write_bytes(b"wal")
    Path(f"{path}-shm").write_bytes(b"shm")
    moved = SqliteStore.move_aside(path)
    assert moved.parent == path.parent and moved.name.startswith("store.db.corrupt-")
    assert moved.read_bytes() == b"garbage" * 1000
    assert Path(f"{moved}-wal").read_bytes() == b"wal"
    assert Path(f"{moved}-shm").read_bytes() == b"shm"
    assert not path.exists() and not Path(f"{path}-wal").exists()
    # A second damaged file in the same second gets a name of its own.
    path.write_bytes(b"more garbage")
    assert SqliteStore.move_aside(path) != moved
    s = SqliteStore(path)
    assert (await s.open()).sessions == []
    await s.close()
    with pytest.raises(StoreError):
        SqliteStore.move_aside(path.with_name("missing.db"))


async def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=str(tmp_path)):
        await SqliteStore(tmp_path).open()


# --------------------------------------------------------------------------- durability


@pytest.mark.parametrize(("durability", "synchronous"), [("fsync", 2), ("os", 1), ("none", 0)])
async def test_durability_sets_synchronous(path: Path, durability: str, synchronous: int) -> None:
    s = SqliteStore(path, durability=durability)
    await s.open()
    assert await pragma(s, "PRAGMA synchronous") == synchronous
    waiter = s.apply([sess("c")])
    assert (waiter is DONE) == (durability == "none")
    await waiter
    await s.close()
    s = SqliteStore(path, durability=durability)
    assert [r.client_id for r in (await s.open()).sessions] == ["c"]  # close() flushed
    stats = await s.stats()
    await s.close()
    assert stats.fsyncs == 0  # this store object has not committed anything yet


async def test_fsyncs_count_commits_only_for_fsync(path: Path) -> None:
    for durability, fsyncs in (("fsync", 1), ("os", 0)):
        s = SqliteStore(path, durability=durability)
        await s.open()
        await apply_all(s, [[sess(durability)]])
        stats = await s.stats()
        await s.close()
        assert (stats.commits, stats.fsyncs) == (1, fsyncs)


def test_unknown_durability_is_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        SqliteStore(path, durability="paranoid")


# --------------------------------------------------------------------------- group commit


async def test_group_commit_groups_concurrent_batches(store: SqliteStore) -> None:
    waiters = [store.apply([sess(f"c{i}"), *queue(f"c{i}", range(i * 10 + 1, i * 10 + 11))])
               for i in range(100)]
    for waiter in waiters:
        await waiter
    stats = await store.stats()
    assert stats.batches == 100
    assert stats.commits <= 5
    assert stats.changes_written == 100 * 21
    assert stats.sessions == 100 and stats.queued_messages == 1000


async def test_saved_then_deleted_in_a_group_is_not_written(store: SqliteStore) -> None:
    await apply_all(store, [queue("c", range(1, 101)),
                            [DeliveryDeleted("c", i) for i in range(1, 101)]])
    stats = await store.stats()
    assert stats.rows_written == 0 and stats.queued_messages == 0
    assert peek(store.path, "SELECT count(*) FROM messages") == [(0,)]


async def test_empty_batch_is_done_when_nothing_is_pending(store: SqliteStore) -> None:
    assert store.apply([]) is DONE
    waiter = store.apply([sess("c")])
    assert store.apply([]) is not DONE
    await waiter


async def test_apply_after_close_fails(path: Path) -> None:
    s = SqliteStore(path)
    await s.open()
    await s.close()
    with pytest.raises(StoreError):
        await s.apply([sess("c")])


async def test_commit_error_fails_the_batch_and_later_ones(store: SqliteStore) -> None:
    await store._query("DROP TABLE incoming_qos2")  # sabotage: the next commit fails
    with pytest.raises(StoreError, match="incoming_qos2"):
        await store.apply([Qos2Received("c", 1)])
    with pytest.raises(StoreError):
        await store.apply([sess("c")])


# --------------------------------------------------------------------------- pruning


def body_ids(path: Path) -> set[int]:
    return {r[0] for r in peek(path, "SELECT id FROM messages")}


async def test_bodies_are_pruned_at_commit(store: SqliteStore) -> None:
    """In the file itself after each commit, not only in what open() returns."""
    path = store.path
    await apply_all(store, [[sess("a"), sess("b"), *queue("a", range(1, 4)), dlv("b", 10, 1)]])
    assert body_ids(path) == {1, 2, 3}
    await apply_all(store, [[DeliveryDeleted("a", 1), DeliveryDeleted("a", 2)]])
    assert body_ids(path) == {1, 3}  # 1 is still queued for b
    await apply_all(store, [[SessionDeleted("b")]])  # cascade
    assert body_ids(path) == {3}
    await apply_all(store, [[dlv("a", 3, mid=4), msg(4)]])  # re-pointed delivery
    assert body_ids(path) == {4}
    await apply_all(store, [[msg(5), RetainedSaved("r", 5)]])
    await apply_all(store, [[msg(6), RetainedSaved("r", 6)]])  # replaced retained
    assert body_ids(path) == {4, 6}
    await apply_all(store, [[RetainedDeleted("r"), DeliveryDeleted("a", 3)]])
    assert body_ids(path) == set()


async def test_steady_traffic_does_not_grow_the_file(store: SqliteStore) -> None:
    sizes = []
    for round_ in range(40):
        first = round_ * 100 + 1
        batch = queue("sub", range(first, first + 100), 200)
        if round_:
            batch += [DeliveryDeleted("sub", i) for i in range(first - 100, first)]
        await store.apply(batch)
        sizes.append((await store.stats()).used_bytes)
    assert sizes[-1] <= sizes[9] * 1.2
    assert (await store.stats()).queued_messages == 100


async def test_idle_vacuum_gives_free_pages_back(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintenance, "VACUUM_MIN_FREE_BYTES", 64 * 1024)
    monkeypatch.setattr(maintenance, "VACUUM_INTERVAL_S", 0.0)
    monkeypatch.setattr(maintenance, "SIZE_CHECK_S", 0.0)
    await store.apply([sess("c"), *queue("c", range(1, 201), 8000)])
    await store.apply([DeliveryDeleted("c", i) for i in range(1, 201)])
    assert (await store.stats()).free_bytes > 1024 * 1024

    async def free_bytes() -> int:
        return (await store.stats()).free_bytes

    deadline = time.monotonic() + 10
    while await free_bytes() >= 64 * 1024:
        assert time.monotonic() < deadline, "vacuum did not run"
        await asyncio.sleep(0.01)
    # Each step gives back up to 512 pages (2 MiB): a few steps, not one per page.
    assert 0 < store.vacuum_steps <= 4


# --------------------------------------------------------------------------- full storage


async def test_full_at_the_cap_and_clears_after_draining(path: Path) -> None:
    s = SqliteStore(path, max_store_bytes=1, ballast_bytes=0, disk_reserve_bytes=0)
    await s.open()
    cap = s.used_bytes + 256 * 1024
    await s.close()
    s = SqliteStore(path, max_store_bytes=cap, ballast_bytes=0, disk_reserve_bytes=0)
    await s.open()
    assert not s.full
    await s.apply([sess("c"), *queue("c", range(1, 101), 4000)])  # ~400 KiB
    assert s.full  # already when the batch resolved
    stats = await s.stats()
    assert stats.full and stats.used_bytes >= cap
    await s.apply([DeliveryDeleted("c", i) for i in range(1, 101)])
    assert not s.full
    assert not (await s.stats()).full
    await s.close()


async def test_disk_full_keeps_the_batches_and_retries(store: SqliteStore) -> None:
    ballast = store.ballast_path
    assert ballast.exists()
    pages = await pragma(store, "PRAGMA page_count")
    await pragma(store, f"PRAGMA max_page_count = {pages + 2}")
    first = asyncio.ensure_future(store.apply([sess("a"), *queue("a", range(1, 41), 4000)]))
    await until(lambda: store.full and not ballast.exists())  # given up to make room
    assert not first.done()
    second = asyncio.ensure_future(store.apply([sess("b"), *queue("b", range(41, 46), 100)]))
    third = asyncio.ensure_future(store.apply([]))
    await until(lambda: store.full and not second.done())
    assert not first.done() and not second.done() and not third.done()
    assert peek(store.path, "SELECT count(*) FROM sessions") == [(0,)]  # nothing half-applied
    await pragma(store, "PRAGMA max_page_count = 1000000")  # space comes back
    await asyncio.wait_for(asyncio.gather(first, second, third), 10)
    assert not store.full
    assert ballast.exists()  # recreated
    await store.close()
    reopened = SqliteStore(store.path)
    snapshot = await reopened.open()
    await reopened.close()
    assert [s.client_id for s in snapshot.sessions] == ["a", "b"]
    assert len(snapshot.deliveries) == 45 and len(snapshot.messages) == 45


async def test_disk_full_acks_make_room(store: SqliteStore) -> None:
    await store.apply([sess("s"), *queue("s", range(1, 41), 4000)])
    pages = await pragma(store, "PRAGMA page_count")
    await pragma(store, f"PRAGMA max_page_count = {pages}")  # not one page more
    new_work = asyncio.ensure_future(store.apply(queue("s", range(41, 61), 4000)))
    await until(lambda: store.full)
    assert not new_work.done()
    # The subscriber acks the old messages; retried together, the deletions make room.
    acks = asyncio.ensure_future(store.apply([DeliveryDeleted("s", i) for i in range(1, 41)]))
    await asyncio.wait_for(asyncio.gather(new_work, acks), 10)
    assert await pragma(store, "PRAGMA page_count") <= pages
    assert body_ids(store.path) == set(range(41, 61))
    assert not store.full


async def test_close_while_the_disk_stays_full_fails_pending_batches(store: SqliteStore) -> None:
    pages = await pragma(store, "PRAGMA page_count")
    await pragma(store, f"PRAGMA max_page_count = {pages}")
    stuck = asyncio.ensure_future(store.apply(queue("s", range(1, 41), 4000)))
    await until(lambda: store.full)
    await asyncio.wait_for(store.close(), 10)
    with pytest.raises(StoreFullError):
        await stuck


# --------------------------------------------------------------------------- stats and reads


async def test_stats(store: SqliteStore) -> None:
    await apply_all(store, [[sess("a"), sess("b"), msg(1, 100, received_at=50.0),
                             msg(2, 30, received_at=20.0), dlv("a", 1), dlv("b", 2, mid=1),
                             dlv("b", 3, mid=2)]])
    stats = await store.stats()
    assert (stats.sessions, stats.queued_messages, stats.queued_bytes) == (2, 3, 230)
    assert stats.oldest_message_at == 20.0
    assert stats.file_bytes > 0 and stats.used_bytes > 0
    assert (stats.commits, stats.batches, stats.changes_written) == (1, 1, 7)


async def test_read_only_helpers_while_the_writer_is_open(store: SqliteStore) -> None:
    will = Will("w", b"bye", 1, False)
    await apply_all(store, [[
        sess("a", will=will, disconnected_at=12.5), sess("b"),
        SubscriptionSaved(SubscriptionRecord("a", "x/#", 1)),
        SubscriptionSaved(SubscriptionRecord("a", "y", 0)),
        msg(1, 100, received_at=7.0), dlv("a", 1, packet_id=3, state=AWAIT_ACK),
        msg(2, 50, received_at=8.0), dlv("a", 2), Qos2Received("a", 9)]])
    sessions = await read_sessions(store.path)
    assert [(s.client_id, s.has_will, s.subscriptions, s.queued_messages, s.queued_bytes)
            for s in sessions] == [("a", True, 2, 2, 150), ("b", False, 0, 0, 0)]
    assert sessions[0].disconnected_at == 12.5 and sessions[1].disconnected_at is None
    detail = await read_session(store.path, "a")
    assert detail is not None
    assert detail.record.will == will
    assert [s.topic_filter for s in detail.subscriptions] == ["x/#", "y"]
    assert [(d.delivery.delivery_id, d.topic, d.payload_bytes, d.received_at)
            for d in detail.deliveries] == [(1, "t/1", 100, 7.0), (2, "t/2", 50, 8.0)]
    assert detail.deliveries[0].delivery.state == AWAIT_ACK
    assert detail.incoming_qos2 == [9]
    assert await read_session(store.path, "nobody") is None
    stats = await read_stats(store.path)
    assert (stats.sessions, stats.queued_messages, stats.queued_bytes) == (2, 2, 150)
    assert stats.oldest_message_at == 7.0 and stats.commits == 0
    # The writer carries on while readers are about.
    await apply_all(store, [[SessionDeleted("b")]])
    assert [s.client_id for s in await read_sessions(store.path)] == ["a"]


async def test_read_only_helpers_refuse_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"missing\.db"):
        await read_sessions(tmp_path / "missing.db")


# --------------------------------------------------------------------------- fault injection

_KILLED_WRITER = """
import asyncio, sys
from edge_broker.core.changes import DeliverySaved, DeliveryRecord, Message, MessageSaved
from edge_broker.core.changes import SessionRecord, SessionSaved
from edge_broker.store.sqlite import SqliteStore
from tests.faults import kill_in_commit

async def main():
    SqliteStore.before_commit = kill_in_commit(2)
    store = SqliteStore(sys.argv[1])
    await store.open()
    await store.apply([SessionSaved(SessionRecord("first", 5, 60))])
    print("first committed", flush=True)
    big = [SessionSaved(SessionRecord("second", 5, 60))]
    for i in range(1, 3001):  # more than the page cache holds: frames reach the WAL
        big += [MessageSaved(Message(i, "t", bytes(4000), 1, False)),
                DeliverySaved(DeliveryRecord("second", i, i, 1, False))]
    await store.apply(big)
    print("second committed", flush=True)

asyncio.run(main())
"""


async def test_killed_in_the_middle_of_a_commit(path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.splitlines() == ["first committed"]
    assert Path(f"{path}-wal").stat().st_size > 1024 * 1024  # frames of the torn transaction
    s = SqliteStore(path)
    snapshot = await s.open()  # quick_check passes: the torn transaction is simply absent
    await s.close()
    assert [r.client_id for r in snapshot.sessions] == ["first"]
    assert snapshot.deliveries == [] and snapshot.messages == {}


async def test_durability_none_waits_only_when_far_behind(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "NONE_MAX_BACKLOG", 10)
    s = SqliteStore(path, durability="none")
    await s.open()
    waiters = [s.apply(queue("c", range(i * 3 + 1, i * 3 + 4))) for i in range(3)]  # 6 each
    assert waiters[0] is DONE and waiters[1] is DONE
    assert waiters[2] is not DONE  # 12 changes queued: back-pressure
    await waiters[2]
    await s.close()
    s = SqliteStore(path)
    assert len((await s.open()).deliveries) == 9
    await s.close()


async def test_open_drops_references_to_missing_bodies(path: Path) -> None:
    """A core that refers to a body it let go (against the rule) must not stop a restart;
    the rows are kept in the quarantine table."""
    s = SqliteStore(path)
    await s.open()
    await apply_all(s, [[sess("c"), msg(1), dlv("c", 1), msg(2), RetainedSaved("r", 2)]])
    await apply_all(s, [[DeliveryDeleted("c", 1), RetainedDeleted("r")]])  # bodies pruned
    await apply_all(s, [[dlv("c", 2, mid=1), RetainedSaved("r", 2)]])  # dangling
    await s.close()
    s = SqliteStore(path)
    snapshot = await s.open()
    assert snapshot.deliveries == [] and snapshot.retained == {} and snapshot.messages == {}
    assert [r.client_id for r in snapshot.sessions] == ["c"]
    assert sorted(peek(path, "SELECT table_name, reason FROM quarantine")) == [
        ("deliveries", "its message 1 is missing"), ("retained", "its message 2 is missing")]


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 17, 64, 255, 256, 257, 1000, 1234])
def test_multi_row_statements_cover_every_row_once_in_order(count: int) -> None:
    rows = [(i, f"r{i}") for i in range(count)]
    statement = sql_module._MultiRow("INSERT INTO t (a, b) VALUES ", 2)
    flattened: list[Any] = []
    executions = 0
    for sql, params in statement.statements(rows):
        per_execution = sql.count("?")
        assert all(len(p) == per_execution for p in params)
        executions += len(params)
        for p in params:
            flattened.extend(p)
    assert flattened == [v for row in rows for v in row]
    assert executions <= count // 256 + 3 * 4  # few statement steps, however many rows


async def test_full_while_the_disk_is_nearly_full(path: Path) -> None:
    s = SqliteStore(path, disk_reserve_bytes=1 << 60)  # more than any disk has free
    await s.open()
    assert s.full  # known at open, before any work
    await s.apply([sess("c"), *queue("c", range(1, 11))])  # the store still commits
    assert s.full and (await s.stats()).full
    s.disk_reserve_bytes = 0  # as if space came back
    await s.apply([DeliveryDeleted("c", i) for i in range(1, 11)])
    assert not s.full
    await s.close()


# --------------------------------------------------------------------------- damaged rows
#
# A file SQLite finds sound (quick_check ok) whose rows are not what this code writes: open()
# quarantines them (store/sqlite/validate.py) and returns everything else. The system test
# tests/system/test_store_damage.py does the same with a real broker.


def damage(path: Path, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute(sql).rowcount >= 1
        db.commit()


async def write_two_sessions(path: Path) -> None:
    s = SqliteStore(path)
    await s.open()
    await apply_all(s, [[sess("good"), sess("bad", will=Will("w/t", b"x", 1, False)),
                         SubscriptionSaved(SubscriptionRecord("good", "a/#", 1)),
                         SubscriptionSaved(SubscriptionRecord("bad", "a/#", 1)),
                         *queue("good", range(1, 4)), *queue("bad", range(4, 7)),
                         Qos2Received("bad", 9), msg(7), RetainedSaved("r", 7)]])
    await s.close()


@pytest.mark.parametrize(("sql", "table", "lost"), [
    ("UPDATE deliveries SET qos = 7 WHERE delivery_id = 4", "deliveries", {4}),
    ("UPDATE deliveries SET subscription_ids = ',,' WHERE delivery_id = 4", "deliveries", {4}),
    ("UPDATE deliveries SET packet_id = 0 WHERE delivery_id = 4", "deliveries", {4}),
    ("UPDATE messages SET properties = '{\"3\": 5}' WHERE id = 5", "messages", {5}),
    ("UPDATE messages SET payload = 'text' WHERE id = 5", "messages", {5}),
    ("UPDATE messages SET topic = 'a/+' WHERE id = 5", "messages", {5}),
    ("UPDATE sessions SET expiry_interval = -1 WHERE client_id = 'bad'", "sessions",
     {4, 5, 6}),
], ids=["qos", "subscription_ids", "packet_id", "properties", "payload", "topic", "session"])
async def test_open_quarantines_invalid_rows_and_serves_the_rest(
        path: Path, sql: str, table: str, lost: set[int]) -> None:
    await write_two_sessions(path)
    damage(path, sql)
    s = SqliteStore(path)
    snapshot = await s.open()
    assert {d.delivery_id for d in snapshot.deliveries} == {1, 2, 3, 4, 5, 6} - lost
    assert sorted(snapshot.messages) == sorted({1, 2, 3, 4, 5, 6, 7} - lost)
    assert snapshot.retained == {"r": 7}
    assert "good" in {r.client_id for r in snapshot.sessions}
    quarantined = peek(path, "SELECT table_name, client_id, row_key, reason, row_json"
                             " FROM quarantine")
    assert table in {q[0] for q in quarantined}
    assert (await s.stats()).quarantined == len(quarantined) == s.quarantined_at_open
    await s.close()
    assert (await read_stats(path)).quarantined == len(quarantined)
    s = SqliteStore(path)  # gone from the live tables: nothing more to quarantine
    again = await s.open()
    assert s.quarantined_at_open == 0 and again == snapshot
    await s.close()


async def test_a_bad_will_drops_only_the_will(path: Path) -> None:
    await write_two_sessions(path)
    damage(path, "UPDATE sessions SET will_qos = 3 WHERE client_id = 'bad'")
    s = SqliteStore(path)
    snapshot = await s.open()
    assert {r.client_id: r.will for r in snapshot.sessions} == {"good": None, "bad": None}
    assert len(snapshot.deliveries) == 6 and ("bad", 9) in snapshot.incoming_qos2
    (row,) = peek(path, "SELECT table_name, client_id, reason, row_json FROM quarantine")
    assert row[:2] == ("sessions", "bad") and "will_qos" in row[2] and '"w/t"' in row[3]
    await s.close()


async def test_text_that_is_not_utf8_is_quarantined(path: Path) -> None:
    await write_two_sessions(path)
    damage(path, "UPDATE messages SET topic = CAST(X'61ff' AS TEXT) WHERE id = 5")
    s = SqliteStore(path)
    snapshot = await s.open()
    assert 5 not in snapshot.messages and len(snapshot.deliveries) == 5
    (row,) = peek(path, "SELECT row_json FROM quarantine WHERE table_name = 'messages'")
    assert "text_not_utf8_base64" in row[0]
    await s.close()


# --------------------------------------------------------------------------- interference


async def test_a_second_store_on_the_same_file_is_refused(path: Path) -> None:
    first = SqliteStore(path)
    await first.open()
    with pytest.raises(StoreInUseError, match=str(path)):
        await SqliteStore(path).open()
    await apply_all(first, [[sess("c")]])  # the first one goes on
    await first.close()
    second = SqliteStore(path)  # free again once the first closed
    assert [r.client_id for r in (await second.open()).sessions] == ["c"]
    await second.close()


def _interfere(path: Path, how: str) -> None:
    if how == "all_deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    elif how == "wal_deleted":
        Path(f"{path}-wal").unlink()
    else:  # replaced by a copy (an operator restoring a backup over it)
        copy = path.with_name("copy.db")
        copy.write_bytes(path.read_bytes())
        copy.replace(path)


@pytest.mark.parametrize("how", ["all_deleted", "wal_deleted", "replaced"])
async def test_a_deleted_file_fails_unacknowledged_batches_and_reports_full(
        store: SqliteStore, caplog: pytest.LogCaptureFixture, how: str) -> None:
    await apply_all(store, [[sess("c")]])
    assert not store.full
    _interfere(store.path, how)
    with pytest.raises(StoreError, match="deleted or replaced"):
        await store.apply([sess("d")])  # committed after the unlink: no acknowledgement
    assert store.full and (await store.stats()).file_lost
    await store.apply([DeliveryDeleted("c", 1)])  # later batches (acks) go on
    errors = [r for r in caplog.records if "deleted or replaced while" in r.getMessage()]
    assert len(errors) == 1 and str(store.path) in errors[0].getMessage()
