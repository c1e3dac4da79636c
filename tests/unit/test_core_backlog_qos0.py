"""QoS 0 deliveries queued in the backlog (the log, core/backlog.py) of a CONNECTED persistent
session count against `max_queued_messages` as its in-memory queue's do, but are not kept when
it goes offline (`queue_qos0_messages = false`). The count the store records (`ReaderCounted`:
what a restart restores) never includes them, and going offline takes them out of the
session's count, or out of drop-oldest's `skip` when drop-oldest had already dropped them, so
the bound is never filled with messages that no longer exist."""

from __future__ import annotations

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import LogAppended, Message, ReaderCounted, Snapshot
from edge_broker.mqtt.packets import Publish
from tests.unit.test_core_broker import commit, connect, pub, sub


def counted(core: BrokerCore) -> list[tuple[int, int]]:
    """The (count, skip) of the ReaderCounted records of the next batch."""
    return [(c.count, c.skip) for c in core.drain().changes if isinstance(c, ReaderCounted)]


def reading_its_backlog() -> tuple[BrokerCore, int]:
    """dev (t/# at QoS 1, window 2, bound 3) reconnected with m0..m2 in its backlog: m0 and m1
    are in flight, m2 is queued behind them. Returns the core and dev's epoch."""
    core = BrokerCore(CoreSettings(max_queued_messages=3, max_inflight_messages=2))
    core.log_backlogs = True
    core.restore(Snapshot([], [], {}, [], {}, []), now=0.0)
    epoch = connect(core, "dev", clean=False, expiry=3600)
    sub(core, "dev", "t/#", qos=1)
    connect(core, "pub")
    commit(core)
    core.disconnect("dev", epoch, now=0.0, reason_code=0, session_expiry_interval=None)
    for n in range(3):
        pub(core, "pub", "t/a", b"m%d" % n, qos=1, packet_id=n + 1)
    appended: list[Message] = [c.message for c in core.drain().changes
                               if isinstance(c, LogAppended)]
    core.committed(core._batch)
    epoch = connect(core, "dev", clean=False, expiry=3600)
    commit(core)
    (fetch,) = core.take_backlog_fetches()
    core.backlog_page(fetch, appended, appended[-1].offset or 0, now=0.0)
    packets = core.pull("dev", now=0.0)
    assert [p.payload for p in packets if isinstance(p, Publish)] == [b"m0", b"m1"]
    commit(core)
    return core, epoch


def test_qos0_counted_while_connected_are_never_recorded_and_leave_the_count_offline() -> None:
    core, epoch = reading_its_backlog()
    for n in range(2):  # behind m2 in the backlog: counted against the bound (3)
        pub(core, "pub", "t/a", b"z%d" % n)
    session = core.sessions["dev"]
    assert session.backlog_count == 3
    assert counted(core) == [(1, 0)]  # a restart now would restore m2 only
    core.disconnect("dev", epoch, now=0.0, reason_code=0, session_expiry_interval=None)
    assert (session.backlog_count, session.backlog_bytes) == (1, 2)
    assert counted(core) == [(1, 0)]


def test_qos0_already_dropped_by_drop_oldest_leave_the_skip_offline() -> None:
    core, epoch = reading_its_backlog()
    for n in range(4):  # z2 drops m2, z3 drops z0 (drop-oldest): queued z1, z2, z3
        pub(core, "pub", "t/a", b"z%d" % n)
    session = core.sessions["dev"]
    backlog = session.backlog
    assert backlog is not None
    assert (session.backlog_count, backlog.skip) == (3, 2)
    assert core.stats.dropped_queue_full == 2
    assert counted(core) == [(0, 1)]  # kept offline: nothing, and m2 still to skip
    core.disconnect("dev", epoch, now=0.0, reason_code=0, session_expiry_interval=None)
    assert (session.backlog_count, session.backlog_bytes, backlog.skip) == (0, 0, 1)
    assert counted(core) == [(0, 1)]


def test_qos0_sent_while_connected_leave_the_count_once() -> None:
    core, epoch = reading_its_backlog()
    pub(core, "pub", "t/a", b"z0")
    session = core.sessions["dev"]
    backlog = session.backlog
    assert backlog is not None
    batch = core.drain()
    (z0,) = [c.message for c in batch.changes if isinstance(c, LogAppended)]
    core.committed(batch.number)
    (fetch,) = core.take_backlog_fetches()  # m2 is in the buffer; z0 is the next page
    core.backlog_page(fetch, [z0], z0.offset or 0, now=0.0)
    for packet in core.pull("dev", now=0.0):
        raise AssertionError(f"the window is full: {packet!r}")
    ids = [d.packet_id for d in session.inflight.values()]
    for packet_id in ids:
        assert packet_id is not None
        core.puback("dev", packet_id, now=0.0)
    packets = core.pull("dev", now=0.0)
    assert [(p.payload, p.qos) for p in packets if isinstance(p, Publish)] == [
        (b"m2", 1), (b"z0", 0)]
    assert session.backlog_count == 0
    core.disconnect("dev", epoch, now=0.0, reason_code=0, session_expiry_interval=None)
    assert (session.backlog_count, backlog.skip) == (0, 0)
    assert counted(core) == [(0, 0)]


def test_a_takeover_keeps_the_qos0_queued_in_the_backlog() -> None:
    """A takeover [MQTT-3.1.4-3] (3.1.1) leaves the session connected: what was queued for it
    stays queued, QoS 0 too (as in its in-memory queue), and stays counted."""
    core, _ = reading_its_backlog()
    pub(core, "pub", "t/a", b"z0")  # behind m2, not read yet
    batch = core.drain()
    (z0,) = [c.message for c in batch.changes if isinstance(c, LogAppended)]
    core.committed(batch.number)
    connect(core, "dev", clean=False, expiry=3600)  # the takeover
    commit(core)
    session = core.sessions["dev"]
    assert session.backlog_count == 2  # m2, z0
    (fetch,) = core.take_backlog_fetches()
    core.backlog_page(fetch, [z0], z0.offset or 0, now=0.0)
    resent = core.pull("dev", now=0.0)
    for packet in resent:
        assert isinstance(packet, Publish) and packet.packet_id is not None
        core.puback("dev", packet.packet_id, now=0.0)
    packets = core.pull("dev", now=0.0)
    assert [(p.payload, p.qos) for p in packets if isinstance(p, Publish)] == [
        (b"m2", 1), (b"z0", 0)]
    assert session.backlog_count == 0
