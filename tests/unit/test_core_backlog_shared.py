"""Backlog pages shared by the sessions reading the same range of the log (core/backlog.py,
*Shared pages*): one store read serves every session with the same filters at the same
position, each session still gets every row in order as its own deliveries, and a failed
read leaves none of them waiting."""

from __future__ import annotations

from edge_broker.core.backlog import BacklogFetch
from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import LogAppended, Message, Snapshot
from edge_broker.mqtt.packets import Publish
from tests.unit.test_core_broker import commit, connect, pub, sub


def offline(clients: dict[str, tuple[str, ...]], count: int) -> tuple[BrokerCore, list[Message]]:
    """Persistent sessions subscribed (QoS 1) to their filters, offline while `count` QoS 1
    messages are published on t/<n>."""
    core = BrokerCore(CoreSettings())
    core.log_backlogs = True
    core.restore(Snapshot([], [], {}, [], {}, []), now=0.0)
    connect(core, "pub")
    for client_id, filters in clients.items():
        epoch = connect(core, client_id, clean=False, expiry=3600)
        for topic_filter in filters:
            sub(core, client_id, topic_filter, qos=1)
        commit(core)
        core.disconnect(client_id, epoch, now=0.0, reason_code=0,
                        session_expiry_interval=None)
    commit(core)
    for n in range(count):
        pub(core, "pub", f"t/{n}", b"m%d" % n, qos=1, packet_id=n + 1)
    appended = [c.message for c in core.drain().changes if isinstance(c, LogAppended)]
    core.committed(core._batch)
    return core, appended


def reconnect(core: BrokerCore, *client_ids: str) -> None:
    for client_id in client_ids:
        connect(core, client_id, clean=False, expiry=3600)
    commit(core)


def payloads(core: BrokerCore, client_id: str) -> list[bytes]:
    return [p.payload for p in core.pull(client_id, now=0.0) if isinstance(p, Publish)]


def test_one_read_serves_the_sessions_reading_the_same_range() -> None:
    core, rows = offline({"a": ("t/#",), "b": ("t/#",), "c": ("t/#", "x/#")}, 5)
    reconnect(core, "a", "b", "c")
    fetches = core.take_backlog_fetches()
    # a and b read the same page: one of them reads it, the other waits; c has other filters.
    assert sorted(f.client_id for f in fetches) in (["a", "c"], ["b", "c"])
    assert core.take_backlog_fetches() == []  # nobody reads it twice
    shared = next(f for f in fetches if f.client_id != "c")
    waiting = "b" if shared.client_id == "a" else "a"
    assert shared.page is not None and shared.page.rows is None
    assert core.backlog_page(shared, rows, rows[-1].offset or 0, now=0.0) == [waiting]
    own = next(f for f in fetches if f.client_id == "c")
    assert core.backlog_page(own, rows, rows[-1].offset or 0, now=0.0) == []
    expected = [b"m%d" % n for n in range(5)]
    for client_id in ("a", "b", "c"):
        assert payloads(core, client_id) == expected
    # The Message made of a row is one, as a publish's deliveries share one.
    a, b = (core.sessions[c].inflight for c in ("a", "b"))
    assert [d.message for d in a.values()] == [d.message for d in b.values()]
    assert all(x.message is y.message for x, y in zip(a.values(), b.values(), strict=True))


def test_a_session_reading_later_takes_the_page_without_a_store_read() -> None:
    core, rows = offline({"a": ("t/#",), "b": ("t/#",)}, 3)
    reconnect(core, "a")
    (first,) = core.take_backlog_fetches()
    core.backlog_page(first, rows, rows[-1].offset or 0, now=0.0)
    reconnect(core, "b")
    assert payloads(core, "b") == [b"m0", b"m1", b"m2"]  # from memory, as it sends
    assert core.take_backlog_fetches() == []
    assert payloads(core, "a") == [b"m0", b"m1", b"m2"]


def test_a_failed_read_leaves_no_session_waiting() -> None:
    core, rows = offline({"a": ("t/#",), "b": ("t/#",)}, 2)
    reconnect(core, "a", "b")
    (fetch,) = core.take_backlog_fetches()
    core.backlog_fetch_failed(fetch)
    again: list[BacklogFetch] = core.take_backlog_fetches()
    assert len(again) == 1 and again[0].page is not None and again[0].page.rows is None
    core.backlog_page(again[0], rows, rows[-1].offset or 0, now=0.0)
    assert payloads(core, "a") == [b"m0", b"m1"]
    assert payloads(core, "b") == [b"m0", b"m1"]
