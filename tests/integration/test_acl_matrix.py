"""The ACL enforced by a real broker, for MQTT 3.1.1 and 5.0: PUBLISH (write), SUBSCRIBE and
each delivery (read), wills and retained messages; `%c` and `%u` patterns; anonymous rules.

Expected codes: a denied PUBLISH is acknowledged on 3.1.1 as [MQTT-3.3.5-2] (3.1.1) requires
and answered 0x87 on 5.0 (3.4.2.1 / 3.5.2.1 (5.0)); a refused filter gets 0x80 on 3.1.1
[MQTT-3.9.3-1] (3.1.1) and 0x87 on 5.0 (3.9.3 (5.0)). "Not delivered" is checked with a
marker message sent after the one under test (one session's messages arrive in order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_broker.config import StreamConfig
from tests.conftest import BrokerThread
from tests.integration.authsetup import auth_broker_factory, auth_config
from tests.integration.rawclient import (
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    RawClient,
    RawWill,
    ack_packet,
    connect,
    unique_id,
)

ACL = """\
# anonymous clients
topic read public/#
topic write public/anon-out

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic read shared/#

user bob
topic write bob/#
topic read alice/out

user ops
topic readwrite #

pattern write devices/%c/up
pattern read devices/%c/down
pattern readwrite users/%u/#
"""

VERSION = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
PASSWORDS = {"alice": b"alice-pw", "bob": b"bob-pw", "dev1": b"dev1-pw", "ops": "ops pw ü".encode()}


@pytest.fixture
def broker(make_broker: Callable[..., BrokerThread], tmp_path: Path) -> BrokerThread:
    return auth_broker_factory(make_broker, tmp_path)(acl=ACL, allow_anonymous=True)


def login(broker: BrokerThread, user: str | None, version: int, client_id: str | None = None,
          **kwargs: object) -> RawClient:
    return connect(broker.port, client_id or unique_id(user or "anon"), version=version,
                   username=user, password=PASSWORDS[user] if user else None,
                   **kwargs)  # type: ignore[arg-type]


class Watcher:
    """ops, subscribed to everything (`#`, QoS 1), to see what the broker let through."""

    def __init__(self, broker: BrokerThread, version: int) -> None:
        self.client = login(broker, "ops", version)
        assert self.client.subscribe(("#", 1)) == (1,)
        self._markers = 0

    def received_until_marker(self, receiver: RawClient | None = None) -> list[str]:
        """Topics `receiver` (default: ops) got before a marker ops publishes now."""
        receiver = receiver or self.client
        self._markers += 1
        marker = f"shared/marker/{self._markers}"
        self.client.publish(marker, b"", qos=0)
        topics = []
        while True:
            packet = receiver.expect_publish()
            if packet.qos and packet.packet_id is not None:
                receiver.ack(PUBACK if packet.qos == 1 else PUBREC, packet.packet_id)
                if packet.qos == 2:
                    receiver.expect(PUBREL)
                    receiver.ack(PUBCOMP, packet.packet_id)
            if receiver is self.client and packet.topic.startswith("shared/marker/"):
                if packet.topic == marker:
                    return topics
                continue
            if packet.topic == marker:
                return topics
            topics.append(packet.topic)


def denied_code(version: int) -> int:
    return 0x87 if version == 5 else 0


@VERSION
def test_publish_needs_write_access(broker: BrokerThread, version: int) -> None:
    watcher = Watcher(broker, version)
    alice = login(broker, "alice", version)
    assert alice.publish_acked("alice/a", qos=1) == 0
    assert alice.publish_acked("bob/a", qos=1) == denied_code(version)
    assert alice.publish_acked("alice/secret/a", qos=1) == denied_code(version)
    assert alice.publish_acked("shared/a", qos=2) == denied_code(version)  # read-only there
    alice.publish("bob/q0", qos=0)  # denied QoS 0: dropped silently, connection kept
    alice.ping()
    assert watcher.received_until_marker() == ["alice/a"]
    denied = broker.call(lambda: broker.app.metrics.acl_denied["publish"])
    assert denied == 4


@VERSION
def test_subscribe_refuses_filters_with_nothing_readable(broker: BrokerThread,
                                                         version: int) -> None:
    refused = 0x87 if version == 5 else 0x80
    alice = login(broker, "alice", version)
    codes = alice.subscribe(("alice/#", 1), ("bob/#", 1), ("shared/+", 0), ("alice/secret/#", 1),
                            ("#", 1), ("$SYS/#", 0))
    # "#" can match alice/... so it is granted (each delivery is checked); $SYS has no rule.
    assert codes == (1, refused, 0, refused, 1, refused)


@VERSION
def test_deliveries_are_checked_for_read_access(broker: BrokerThread, version: int) -> None:
    watcher = Watcher(broker, version)
    alice = login(broker, "alice", version)
    assert alice.subscribe(("#", 1)) == (1,)
    ops = login(broker, "ops", version)  # subscribed to nothing
    # More denied QoS 1 deliveries than the inflight window (20): each one is discarded,
    # so the window does not fill up and the readable message behind them still arrives.
    for index in range(30):
        assert ops.publish_acked(f"other/{index}", qos=1) == 0
    assert ops.publish_acked("alice/secret/x", qos=2) == 0
    assert ops.publish_acked("shared/ok", qos=1) == 0
    assert ops.publish_acked("alice/ok", qos=2) == 0
    assert watcher.received_until_marker(alice) == ["shared/ok", "alice/ok"]


@VERSION
def test_retained_messages_are_delivered_only_where_readable(broker: BrokerThread,
                                                             version: int) -> None:
    watcher = Watcher(broker, version)
    ops = login(broker, "ops", version)
    for topic in ("alice/r", "alice/secret/r", "bob/r", "shared/r"):
        assert ops.publish_acked(topic, b"kept", qos=1, retain=True) == 0
    alice = login(broker, "alice", version)
    assert alice.subscribe(("#", 0)) == (0,)
    received = sorted(watcher.received_until_marker(alice))
    assert received == ["alice/r", "shared/r"]


@VERSION
def test_client_id_and_username_patterns(broker: BrokerThread, version: int) -> None:
    refused = 0x87 if version == 5 else 0x80
    watcher = Watcher(broker, version)
    device = login(broker, "dev1", version, client_id="sensor-7")
    assert device.subscribe("devices/sensor-7/down", "devices/sensor-8/down",
                            "users/dev1/#", "users/bob/#") == (0, refused, 0, refused)
    device.unsubscribe("devices/sensor-7/down", "users/dev1/#")
    assert device.publish_acked("devices/sensor-7/up", qos=1) == 0
    assert device.publish_acked("devices/sensor-8/up", qos=1) == denied_code(version)
    assert device.publish_acked("devices/sensor-7/down", qos=1) == denied_code(version)
    assert device.publish_acked("users/dev1/state", qos=1) == 0
    assert device.publish_acked("users/bob/state", qos=1) == denied_code(version)
    assert watcher.received_until_marker() == ["devices/sensor-7/up", "users/dev1/state"]


@VERSION
def test_anonymous_clients_get_the_rules_before_any_user_line(broker: BrokerThread,
                                                              version: int) -> None:
    refused = 0x87 if version == 5 else 0x80
    watcher = Watcher(broker, version)
    anonymous = login(broker, None, version, client_id="anon-1")
    # %u patterns are skipped for anonymous clients; %c ones apply (client id anon-1).
    assert anonymous.subscribe("public/#", "alice/#", "users//#", "devices/anon-1/down") == (
        0, refused, refused, 0)
    anonymous.unsubscribe("public/#", "devices/anon-1/down")
    assert anonymous.publish_acked("public/anon-out", qos=1) == 0
    assert anonymous.publish_acked("public/other", qos=1) == denied_code(version)
    assert watcher.received_until_marker() == ["public/anon-out"]


@VERSION
def test_a_will_is_published_only_to_a_topic_its_client_may_write(broker: BrokerThread,
                                                                  version: int) -> None:
    watcher = Watcher(broker, version)
    allowed = login(broker, "alice", version, will=RawWill("alice/will", b"gone", 1))
    denied = login(broker, "alice", version, will=RawWill("bob/will", b"gone", 1))
    allowed.ping()
    denied.ping()
    denied.close()  # abnormal closes: both wills are due
    allowed.close()
    # The watcher sees alice/will; bob/will is not published (counted).
    topics = []
    while "alice/will" not in topics:
        packet = watcher.client.expect_publish()
        if packet.packet_id is not None:
            watcher.client.ack(PUBACK, packet.packet_id)
        topics.append(packet.topic)
    assert watcher.received_until_marker() == []
    assert topics == ["alice/will"]
    assert broker.call(lambda: broker.app.metrics.acl_denied["will"]) == 1


@VERSION
def test_a_qos2_denied_publish_completes_its_flow_on_311(broker: BrokerThread,
                                                         version: int) -> None:
    alice = login(broker, "alice", version)
    packet_id = alice.publish("bob/x", b"", qos=2)
    assert packet_id is not None
    rec = alice.expect(PUBREC)
    if version == 5:
        assert rec.reason_code == 0x87  # the flow ends here (reason >= 0x80)
        alice.ping()
        return
    alice.send(ack_packet(PUBREL, packet_id))
    assert alice.expect(PUBCOMP).packet_id == packet_id
    alice.ping()


@VERSION
def test_stream_subscriptions_are_judged_by_the_topics_they_select(
        make_broker: Callable[..., BrokerThread], tmp_path: Path, version: int) -> None:
    """`$stream/...` is no topic of its own for the ACL: the filter it selects (its own, else
    the stream's) decides the SUBSCRIBE, and each replayed message is checked on delivery
    under its original topic."""
    config = auth_config(tmp_path, acl=ACL, allow_anonymous=True)
    config = dataclasses.replace(config, streams=(StreamConfig("all", "#"),))
    broker = make_broker(config=config)
    ops = login(broker, "ops", version)
    for index, topic in enumerate(("alice/a", "public/p", "bob/b")):
        ops.publish(topic, b"x", qos=1, packet_id=index + 1)
        ops.expect(PUBACK)
    alice = login(broker, "alice", version)
    prefix = "$stream/all@earliest"
    # Only bob's topics: nothing readable for her. (First: a granted subscription's history
    # may arrive before a later SUBACK.)
    assert alice.subscribe((f"{prefix}/bob/#", 0)) == (0x87 if version == 5 else 0x80,)
    # Her own topics, and the whole stream (partly readable): granted, in one SUBSCRIBE.
    codes = alice.subscribe((f"{prefix}/alice/#", 0), (prefix, 0))
    assert all(code < 0x80 for code in codes), codes
    got = set()
    for _ in range(2):  # alice/a from both granted subscriptions; bob/b never
        got.add(alice.expect_publish().topic)
    assert got == {"alice/a"}
    alice.ping()  # nothing else was on its way: no bob/b, no public/p (not hers)
    alice.expect_nothing()
