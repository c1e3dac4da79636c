"""The core's side of bridges (core/downlink.py): a bridge's uplink filters record messages in
the log like a stream's (QoS 0 included; a QoS 1/2 message only a bridge takes is
acknowledged 0x00), and a downlink message goes into the same batch as its remote position."""

from __future__ import annotations

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import DownlinkPosition, LogAppended, Snapshot
from edge_broker.core.downlink import forget_downlink_position, publish_downlink, set_uplinks
from edge_broker.mqtt.packets import Publish, Subscribe, Subscription
from edge_broker.mqtt.properties import NO_PROPERTIES, Properties
from edge_broker.mqtt.types import ReasonCode
from tests.unit.test_core_broker import connect, pub


def core_with_bridge(streams: bool = False) -> BrokerCore:
    core = BrokerCore(CoreSettings())
    if streams:
        core.set_streams([("t", "sensors/#")])
    set_uplinks(core, [("bridge:central", ("sensors/#", "alarms/+"))])
    core.restore(Snapshot([], [], {}, [], {}, [], log_last_offset=7), now=0.0)
    return core


def test_uplink_filters_record_messages_in_the_log_qos0_included() -> None:
    core = core_with_bridge()
    connect(core, "pub")
    assert pub(core, "pub", "sensors/a", qos=0) == ReasonCode.SUCCESS
    # Only the bridge takes it: 0x00, not 0x10 "no matching subscribers".
    assert pub(core, "pub", "alarms/fire", qos=1, packet_id=2) == ReasonCode.SUCCESS
    assert pub(core, "pub", "other", qos=1, packet_id=3) == ReasonCode.NO_MATCHING_SUBSCRIBERS
    appended = [c.message for c in core.drain().changes if isinstance(c, LogAppended)]
    assert [(m.topic, m.offset, m.origin) for m in appended] == [
        ("sensors/a", 8, "pub"), ("alarms/fire", 9, "pub")]


def test_a_message_of_a_stream_and_a_bridge_is_appended_once() -> None:
    core = core_with_bridge(streams=True)
    connect(core, "pub")
    pub(core, "pub", "sensors/a", qos=1, packet_id=1)
    assert [type(c) for c in core.drain().changes].count(LogAppended) == 1
    assert sorted(core.streams_of("sensors/a")) == ["bridge:central", "t"]


def test_sys_values_are_recorded_only_by_filters_that_name_sys() -> None:
    # mosquitto users bridge `$SYS/broker/# out` to watch their gateways centrally; `#` does
    # not take $SYS topics [MQTT-4.7.2-1]. Before, no $SYS value reached the log at all.
    core = BrokerCore(CoreSettings())
    core.set_streams([("everything", "#")])
    set_uplinks(core, [("bridge:cloud", ("$SYS/broker/clients/#",))])
    core.restore(Snapshot([], [], {}, [], {}, [], log_last_offset=0), now=0.0)
    core.publish_internal("$SYS/broker/clients/connected", b"3", now=1.0, retain=True)
    core.publish_internal("$SYS/broker/uptime", b"9 seconds", now=1.0, retain=True)
    appended = [c.message for c in core.drain().changes if isinstance(c, LogAppended)]
    assert [(m.topic, m.payload, m.offset) for m in appended] == [
        ("$SYS/broker/clients/connected", b"3", 1)]
    assert core.streams_of("$SYS/broker/clients/connected") == ["bridge:cloud"]


def test_store_full_refuses_qos1_for_a_bridge() -> None:
    core = core_with_bridge()
    connect(core, "pub")
    assert core.would_store("pub", Publish("sensors/a", b"x", qos=1, packet_id=1))
    assert not core.would_store("pub", Publish("other", b"x", qos=1, packet_id=1))


def test_downlink_message_and_position_share_a_batch() -> None:
    core = core_with_bridge()
    connect(core, "dev")
    core.subscribe("dev", Subscribe(1, (Subscription("cmd/#", 1),), Properties()), now=0.0)
    core.drain()
    targets = publish_downlink(
        core, "cmd/valve", b"open", 1, False,
        Properties(user_properties=(("k", "v"),)), origin="bridge-central", now=1.0,
        bridge="central", source="EDGE", position=42)
    assert targets == 1
    changes = core.drain().changes
    assert DownlinkPosition("central", "EDGE", 42) in changes
    forget_downlink_position(core, "central", "mqtt:gw#7")
    assert core.drain().changes == [DownlinkPosition("central", "mqtt:gw#7", -1)]


def test_downlink_without_a_position_writes_none() -> None:
    core = core_with_bridge()
    publish_downlink(core, "cmd/x", b"", 0, False, NO_PROPERTIES, origin="b", now=1.0,
                     bridge="central", source="", position=0)
    assert not any(isinstance(c, DownlinkPosition) for c in core.drain().changes)
