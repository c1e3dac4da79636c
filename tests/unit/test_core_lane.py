"""The core's side of the QoS 0 lane (core/streams.py `_to_lane`, docs/bridges.md "The QoS 0
lane"): while a bridge's lane is open, a QoS 0 message only lane bridges take goes to
`lane_out` instead of the log (no offset, no `LogAppended`); QoS 1/2, topics a named stream
records, and every message while the lane is closed are appended to the log as before."""

from __future__ import annotations

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import LogAppended, Snapshot
from edge_broker.core.downlink import set_uplinks
from edge_broker.mqtt.types import ReasonCode
from tests.unit.test_core_broker import connect, pub


def _core() -> tuple[BrokerCore, list[int]]:
    core = BrokerCore(CoreSettings())
    core.set_streams([("t", "logged/#")])
    set_uplinks(core, [("bridge:central", ("sensors/#", "logged/#"))])
    core.restore(Snapshot([], [], {}, [], {}, [], log_last_offset=7), now=0.0)
    wakes: list[int] = []
    core.lane_wake = lambda: wakes.append(len(core.lane_out))
    connect(core, "pub")
    core.drain()
    return core, wakes


def _appended(core: BrokerCore) -> list[str]:
    return [c.message.topic for c in core.drain().changes if isinstance(c, LogAppended)]


def test_qos0_goes_to_the_open_lane_not_the_log() -> None:
    core, wakes = _core()
    core.lane_open = frozenset({"bridge:central"})
    # Only the bridge takes it: 0x00 as before (its QoS 0 has no reply, but a subscriber-less
    # QoS 0 is still "taken").
    assert pub(core, "pub", "sensors/a", qos=0) == ReasonCode.SUCCESS
    pub(core, "pub", "sensors/b", qos=0)
    assert [(reader, m.topic, m.offset) for reader, ms in core.lane_out.items() for m in ms] == [
        ("bridge:central", "sensors/a", None), ("bridge:central", "sensors/b", None)]
    assert wakes == [0]  # woken once, when the list stopped being empty
    assert _appended(core) == []
    assert core.log_end() == 7


def test_qos1_and_stream_topics_still_go_to_the_log() -> None:
    core, _ = _core()
    core.lane_open = frozenset({"bridge:central"})
    pub(core, "pub", "sensors/a", qos=1, packet_id=1)
    pub(core, "pub", "logged/a", qos=0)  # a named stream records it too
    assert core.lane_out == {}
    assert _appended(core) == ["sensors/a", "logged/a"]
    assert core.log_end() == 9


def test_a_closed_lane_appends_to_the_log() -> None:
    core, wakes = _core()
    pub(core, "pub", "sensors/a", qos=0)
    assert core.lane_out == {} and wakes == []
    assert _appended(core) == ["sensors/a"]


def test_overlapping_uplink_filters_put_a_message_on_the_lane_once() -> None:
    # Two of the bridge's filters match one topic: the log path appended it once, and the
    # lane must too (else the remote gets it twice, under two message ids).
    core = BrokerCore(CoreSettings())
    core.set_streams([])
    set_uplinks(core, [("bridge:central", ("sensors/#", "sensors/+")),
                       ("bridge:backup", ("sensors/a",))])
    core.restore(Snapshot([], [], {}, [], {}, [], log_last_offset=0), now=0.0)
    connect(core, "pub")
    core.drain()
    core.lane_open = frozenset({"bridge:central", "bridge:backup"})
    pub(core, "pub", "sensors/a", qos=0)
    assert sorted((reader, len(ms)) for reader, ms in core.lane_out.items()) == [
        ("bridge:backup", 1), ("bridge:central", 1)]
