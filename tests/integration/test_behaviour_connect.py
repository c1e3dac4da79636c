"""Black-box, hand-built bytes: connecting, client identifiers, keep alive, takeover, shutdown.

Spec references name their version: [MQTT-x.y.z-n] (3.1.1) or (5.0).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    CONNACK,
    DISCONNECT,
    PINGREQ_BYTES,
    PINGRESP,
    RawClient,
    RawWill,
    connect,
    connect_packet,
    disconnect_packet,
    props,
    publish_packet,
    subscriber,
    unique_id,
)

both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


# -- CONNECT / CONNACK -------------------------------------------------------------------


def test_v311_connack_bytes_and_session_present(broker: BrokerThread) -> None:
    # [MQTT-3.2.2-1] (3.1.1): clean session 1 -> session present 0.
    client = connect(broker.port, "sp", clean=True)
    assert client.last_raw == b"\x20\x02\x00\x00"
    client.disconnect()
    # [MQTT-3.2.2-3] (3.1.1): clean session 0 with no stored session -> session present 0.
    client = connect(broker.port, "sp", clean=False)
    assert client.last_raw == b"\x20\x02\x00\x00"
    client.disconnect()
    # [MQTT-3.2.2-2] (3.1.1): the session is resumed -> session present 1.
    client = connect(broker.port, "sp", clean=False)
    assert client.last_raw == b"\x20\x02\x01\x00"
    client.disconnect()
    # Clean session 1 discards it [MQTT-3.1.2-6] (3.1.1).
    client = connect(broker.port, "sp", clean=True)
    assert client.last_raw == b"\x20\x02\x00\x00"
    client.disconnect()


def test_v5_connack_session_present_and_limits(broker: BrokerThread) -> None:
    expiry = props(session_expiry_interval=60)
    client = connect(broker.port, "sp5", version=5, clean=False, properties=expiry)
    raw = client.last_raw
    assert raw[0] == 0x20 and raw[2:4] == b"\x00\x00"  # session present 0, reason Success
    connack = client.connack
    assert connack is not None
    assert connack.properties.receive_maximum == broker.config.mqtt.receive_maximum
    assert connack.properties.topic_alias_maximum == broker.config.mqtt.topic_alias_maximum
    assert connack.properties.assigned_client_identifier is None
    client.disconnect()
    client = connect(broker.port, "sp5", version=5, clean=False, properties=expiry)
    assert client.last_raw[2:4] == b"\x01\x00"  # [MQTT-3.2.2-3] (5.0): session present 1
    client.disconnect()


def test_v5_empty_client_id_gets_assigned_identifier(broker: BrokerThread) -> None:
    # [MQTT-3.1.3-7] (5.0): the server assigns an id and returns it in the CONNACK
    # (Assigned Client Identifier, 3.2.2.3.7).
    first = connect(broker.port, "", version=5)
    second = connect(broker.port, "", version=5)
    assert first.connack is not None and second.connack is not None
    assigned = first.connack.properties.assigned_client_identifier
    other = second.connack.properties.assigned_client_identifier
    assert assigned and other and assigned != other
    # Both connections stay up: two different sessions, no takeover.
    first.ping()
    second.ping()


def test_v311_empty_client_id_with_clean_session_is_accepted(broker: BrokerThread) -> None:
    # [MQTT-3.1.3-6] (3.1.1)
    client = connect(broker.port, "", clean=True)
    assert client.last_raw == b"\x20\x02\x00\x00"
    other = connect(broker.port, "", clean=True)
    client.ping()  # the second one did not take the first one's session over
    other.ping()


def test_v311_empty_client_id_without_clean_session_is_refused(broker: BrokerThread) -> None:
    # [MQTT-3.1.3-8] (3.1.1): CONNACK return code 2 (identifier rejected), then close.
    client = connect(broker.port, "", clean=False, expect_success=False)
    assert client.last_raw == b"\x20\x02\x00\x02"
    client.expect_closed()


def test_mqtt31_mqisdp_is_accepted(broker: BrokerThread) -> None:
    subscriber = connect(broker.port, "old-sub", version=3)
    assert subscriber.last_raw == b"\x20\x02\x00\x00"
    subscriber.subscribe(("t/31", 1))
    publisher = connect(broker.port, "old-pub", version=3)
    publisher.publish_acked("t/31", b"hi", qos=1)
    message = subscriber.expect_publish()
    assert (message.topic, message.payload, message.qos) == ("t/31", b"hi", 1)


@both_versions
def test_broker_closes_the_connection_after_disconnect(broker: BrokerThread,
                                                       version: int) -> None:
    # 3.14.4 (3.1.1 and 5.0): on DISCONNECT the server closes the network connection if the
    # client has not; the session is then offline, not taken over by the next connection.
    client_id = unique_id()
    client = connect(broker.port, client_id, version=version, clean=False,
                     properties=props(session_expiry_interval=60))
    client.send(disconnect_packet(None))  # and keep our end open
    client.expect_closed()
    again = connect(broker.port, client_id, version=version, clean=False,
                    properties=props(session_expiry_interval=60))
    assert again.last_raw[2] == 1
    again.ping()


# -- keep alive -------------------------------------------------------------------------


@both_versions
def test_keepalive_timeout_closes_silent_client(broker: BrokerThread, version: int) -> None:
    # [MQTT-3.1.2-24] (3.1.1) / [MQTT-3.1.2-22] (5.0): after 1.5 x keep alive of silence the
    # server closes the connection; on 5.0 with DISCONNECT 0x8D (Keep Alive timeout).
    watcher = subscriber(broker.port, unique_id(), "ka/will", version=version)
    client = RawClient(broker.port, version)
    started = time.monotonic()
    client.send(connect_packet(unique_id(), version=version, keepalive=1,
                               will=RawWill("ka/will", b"timed out")))
    client.expect(CONNACK)
    if version == 5:
        disconnect = client.expect(DISCONNECT, timeout=3.0)
        assert disconnect.reason_code == 0x8D
    client.expect_closed(timeout=3.0)
    elapsed = time.monotonic() - started
    assert 1.2 <= elapsed <= 2.5, elapsed
    # Not a normal disconnect: the will goes [MQTT-3.1.2-8] (3.1.1).
    assert watcher.expect_publish().payload == b"timed out"


@both_versions
def test_bytes_that_never_complete_a_packet_do_not_keep_the_connection_alive(
        broker: BrokerThread, version: int) -> None:
    # The keep alive counts control packets, not bytes [MQTT-3.1.2-24] (3.1.1) /
    # [MQTT-3.1.2-22] (5.0): a client that trickles a PUBLISH it never completes is closed
    # after 1.5 x keep alive, as a silent one is, and its will goes.
    watcher = subscriber(broker.port, unique_id(), "ka/trickle", version=version)
    client = RawClient(broker.port, version)
    client.send(connect_packet(unique_id(), version=version, keepalive=1,
                               will=RawWill("ka/trickle", b"timed out")))
    client.expect(CONNACK)
    started = time.monotonic()
    unfinished = publish_packet("ka/t", b"x" * 100, version=version)
    closed = False
    for byte in unfinished[:-1]:  # one byte per 0.25 s: past 1.5 s long before the end
        closed = client.is_closed(0.25)
        if closed or time.monotonic() - started > 3.0:
            break
        client.send(bytes([byte]))
    assert closed, "still connected after 3 s of bytes that make no packet"
    assert watcher.expect_publish().payload == b"timed out"


@both_versions
def test_pingreq_keeps_the_connection_alive(broker: BrokerThread, version: int) -> None:
    client = connect(broker.port, unique_id(), version=version, keepalive=1)
    started = time.monotonic()
    while time.monotonic() - started < 1.7:  # past 1.5 x keep alive
        client.expect_nothing(0.4)
        client.send(PINGREQ_BYTES)
        assert client.expect_raw(PINGRESP) == b"\xd0\x00"


def test_v5_server_keep_alive_caps_the_client_value(
        make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(max_keepalive_s=10)
    client = connect(broker.port, "ka", version=5, keepalive=100)
    assert client.connack is not None
    # 3.2.2.3.14 (5.0): the client must use the Server Keep Alive instead of its own.
    assert client.connack.properties.server_keep_alive == 10


def test_v311_keepalive_above_maximum_is_refused(
        make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(max_keepalive_s=10)
    client = connect(broker.port, "ka", version=4, keepalive=100, expect_success=False)
    assert client.last_raw == b"\x20\x02\x00\x02"
    client.expect_closed()
    ok = connect(broker.port, "ka", version=4, keepalive=10)
    assert ok.last_raw == b"\x20\x02\x00\x00"


# -- session takeover -------------------------------------------------------------------


@both_versions
def test_second_connection_with_same_id_takes_over(broker: BrokerThread,
                                                   version: int) -> None:
    # [MQTT-3.1.4-2] (3.1.1) / [MQTT-3.1.4-3] (5.0): the existing connection is closed;
    # on 5.0 with DISCONNECT 0x8E (Session taken over) first.
    first = connect(broker.port, "dup-id", version=version)
    second = connect(broker.port, "dup-id", version=version)
    if version == 5:
        disconnect = first.expect(DISCONNECT)
        assert disconnect.reason_code == 0x8E
    first.expect_closed()
    # The new connection is the one that works.
    second.subscribe("t/takeover")
    second.publish("t/takeover", b"x")
    assert second.expect_publish().payload == b"x"


# -- graceful shutdown -------------------------------------------------------------------


@both_versions
def test_shutdown_disconnects_clients(broker: BrokerThread, version: int) -> None:
    client = connect(broker.port, unique_id(), version=version)
    client.ping()
    broker.stop()
    if version == 5:
        disconnect = client.expect(DISCONNECT)
        assert disconnect.reason_code == 0x8B  # Server shutting down
    client.expect_closed()
