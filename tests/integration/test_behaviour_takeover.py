"""Black-box, hand-built bytes: session takeover (a CONNECT with the client id of a live
connection) - what Session Present says, which session the new connection gets, and whether the
old connection's will is published.

- A session that was not persistent (3.1.1 CleanSession 1, 5.0 Session Expiry 0) ended with
  its connection [MQTT-3.1.2-6] (3.1.1), 3.1.2.11.2 (5.0): a takeover asking to resume gets
  Session Present 0 and a fresh session, without the old subscriptions.
- The old connection's will is published only if its session ends with the takeover: it was
  not persistent, or the new CONNECT has Clean Start set (mosquitto's rule;
  docs/architecture.md, "Wills").
"""

from __future__ import annotations

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    CONNACK,
    DISCONNECT,
    RawClient,
    RawWill,
    connect,
    connect_packet,
    props,
    subscriber,
    unique_id,
)

both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


def connect_bytes(client_id: str, version: int, *, persistent: bool, clean: bool,
                  will: RawWill | None = None) -> bytes:
    """The CONNECT: 3.1.1 persistence is CleanSession 0; 5.0's is a Session Expiry > 0."""
    properties = props(session_expiry_interval=600 if persistent else 0)
    if version == 4:
        assert persistent != clean
    return connect_packet(client_id, version=version, clean=clean, will=will,
                          properties=properties)


def open_with(port: int, version: int, packet: bytes) -> RawClient:
    client = RawClient(port, version)
    client.send(packet)
    return client


def session_present(client: RawClient) -> bool:
    """Session Present of the CONNACK (acknowledge flags byte), checked byte by byte."""
    raw = client.expect_raw(CONNACK)
    assert raw[0] == 0x20
    flags, code = raw[2], raw[3]
    assert code == 0, raw.hex()
    if client.version == 4:
        assert raw == bytes((0x20, 0x02, flags, 0x00))
    return bool(flags & 0x01)


def old_closed(client: RawClient) -> None:
    if client.version == 5:
        assert client.expect(DISCONNECT).reason_code == 0x8E  # Session taken over
    client.expect_closed()


@both_versions
def test_takeover_of_a_clean_session_gives_a_fresh_session(broker: BrokerThread,
                                                           version: int) -> None:
    client_id = unique_id("clean")
    watcher = subscriber(broker.port, unique_id("watch"), "will/#", version=version)
    old = open_with(broker.port, version, connect_bytes(
        client_id, version, persistent=False, clean=True, will=RawWill("will/old", b"gone")))
    assert not session_present(old)
    old.subscribe(("old/t", 1))

    # The new connection asks to resume (CleanSession 0 / Clean Start 0 with an expiry).
    new = open_with(broker.port, version, connect_bytes(client_id, version, persistent=True,
                                                        clean=False))
    assert not session_present(new)  # [MQTT-3.1.2-6] (3.1.1), 3.1.2.11.2 (5.0)
    old_closed(old)
    # The old session ended: its will goes, and its subscription is gone.
    will = watcher.expect_publish()
    assert (will.topic, will.payload) == ("will/old", b"gone")
    publisher = connect(broker.port, unique_id("pub"), version=version)
    publisher.publish_acked("old/t", b"not for the new session", qos=1)
    new.ping()
    new.expect_nothing()


@both_versions
def test_takeover_resuming_a_persistent_session_keeps_it_and_drops_the_will(
        broker: BrokerThread, version: int) -> None:
    client_id = unique_id("durable")
    watcher = subscriber(broker.port, unique_id("watch"), "will/#", version=version)
    old = open_with(broker.port, version, connect_bytes(
        client_id, version, persistent=True, clean=False, will=RawWill("will/old", b"gone")))
    assert not session_present(old)
    old.subscribe(("kept/t", 1))

    new = open_with(broker.port, version, connect_bytes(client_id, version, persistent=True,
                                                        clean=False))
    assert session_present(new)
    old_closed(old)
    publisher = connect(broker.port, unique_id("pub"), version=version)
    publisher.publish_acked("kept/t", b"still subscribed", qos=1)
    assert new.expect_publish().payload == b"still subscribed"
    # mosquitto's rule: the resumed session's old will is not published.
    watcher.ping()
    watcher.expect_nothing()


@both_versions
def test_takeover_with_clean_start_publishes_the_old_will(broker: BrokerThread,
                                                          version: int) -> None:
    client_id = unique_id("restart")
    watcher = subscriber(broker.port, unique_id("watch"), "will/#", version=version)
    old = open_with(broker.port, version, connect_bytes(
        client_id, version, persistent=True, clean=False, will=RawWill("will/old", b"gone")))
    assert not session_present(old)

    new = open_with(broker.port, version, connect_bytes(client_id, version,
                                                        persistent=version == 5, clean=True))
    assert not session_present(new)
    old_closed(old)
    will = watcher.expect_publish()
    assert (will.topic, will.payload) == ("will/old", b"gone")
