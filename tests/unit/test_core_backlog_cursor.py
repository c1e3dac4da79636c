"""The durable cursor of a reconnected persistent session reading its backlog from the log
(core/backlog.py *Durability*): moves over QoS 1 rows are recorded lazily (so a subscriber's
PUBACKs need no commit), any other move at once, and the cursor is recorded at disconnect."""

from __future__ import annotations

from edge_broker.core.backlog import CURSOR_SAVE_EVERY
from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import InflightSaved, LogAppended, Message, ReaderMoved, Snapshot
from edge_broker.mqtt.packets import Publish
from tests.unit.test_core_broker import commit, connect, pub, sub


def moves(core: BrokerCore) -> tuple[list[int], bool]:
    """The ReaderMoved offsets of the next batch, and whether it holds any change."""
    changes = core.drain().changes
    return [c.offset for c in changes if isinstance(c, ReaderMoved)], bool(changes)


def offline_with_backlog(qos: list[int],
                         receive_maximum: int = 65535) -> tuple[BrokerCore, list[Message]]:
    core = BrokerCore(CoreSettings())
    core.log_backlogs = True
    core.restore(Snapshot([], [], {}, [], {}, []), now=0.0)
    epoch = connect(core, "dev", clean=False, expiry=3600)
    sub(core, "dev", "t/#", qos=2)
    connect(core, "pub")
    commit(core)
    core.disconnect("dev", epoch, now=0.0, reason_code=0, session_expiry_interval=None)
    for n, q in enumerate(qos):
        pub(core, "pub", f"t/{n}", qos=q, packet_id=n + 1 if q else None)
    appended = [c.message for c in core.drain().changes if isinstance(c, LogAppended)]
    core.committed(core._batch)
    core.dev_epoch = connect(  # type: ignore[attr-defined]
        core, "dev", clean=False, expiry=3600, receive_maximum=receive_maximum)
    commit(core)
    (fetch,) = core.take_backlog_fetches()
    core.backlog_page(fetch, appended, appended[-1].offset or 0, now=0.0)
    return core, appended


def test_qos1_acks_record_the_cursor_lazily_and_a_disconnect_records_it() -> None:
    count = CURSOR_SAVE_EVERY + 10
    core, rows = offline_with_backlog([1] * count)
    acked = 0
    recorded: list[int] = []
    while acked < count:
        packets = core.pull("dev", now=0.0)
        assert packets and all(isinstance(p, Publish) and p.qos == 1 for p in packets)
        assert moves(core) == ([], False) or acked  # sending QoS 1 rows records nothing
        for packet in packets:
            assert isinstance(packet, Publish) and packet.packet_id is not None
            core.puback("dev", packet.packet_id, now=0.0)
            acked += 1
            offsets, _ = moves(core)
            recorded += offsets
    # At most one record per CURSOR_SAVE_EVERY moves, each at an acknowledged offset.
    assert 1 <= len(recorded) <= 2 * count // CURSOR_SAVE_EVERY + 1
    assert recorded == sorted(recorded) and recorded[-1] <= (rows[-1].offset or 0)


def test_a_disconnect_records_the_lazy_cursor() -> None:
    core, rows = offline_with_backlog([1, 1, 1, 1, 1], receive_maximum=4)
    packets = core.pull("dev", now=0.0)
    assert len(packets) == 4
    moves(core)
    for packet in packets[:3]:
        assert isinstance(packet, Publish) and packet.packet_id is not None
        core.puback("dev", packet.packet_id, now=0.0)
    assert moves(core) == ([], False)  # three PUBACKs: no commit needed
    core.disconnect("dev", core.dev_epoch, now=0.0, reason_code=0, session_expiry_interval=None)
    changes = core.drain().changes
    # The cursor covers what was sent; the one in flight is stored with its packet id.
    assert [c.offset for c in changes if isinstance(c, ReaderMoved)] == [rows[3].offset]
    assert [c.offset for c in changes if isinstance(c, InflightSaved)] == [rows[3].offset]
