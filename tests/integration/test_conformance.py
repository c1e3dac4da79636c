"""Black-box conformance, hand-built bytes on a real broker: the protocol-layer rules that
third-party suites found broken (issue 7, item 10), for each protocol version involved.

3.1 is protocol level 3 ("MQIsdp"), 3.1.1 level 4, 5.0 level 5. Spec references name their
version. Every test also checks that nothing was logged at ERROR (an internal exception).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    CONNACK,
    DISCONNECT,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RawClient,
    ack_packet,
    connect,
    connect_packet,
    frame,
    props,
    subscribe_packet,
    subscriber,
    u16,
    unique_id,
    unsubscribe_packet,
    utf8,
)

MALFORMED, PROTOCOL_ERROR, PACKET_ID_NOT_FOUND = 0x81, 0x82, 0x92
PUBACK_T, PUBREC_T, PUBCOMP_T = 4, 5, 7


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and r.name.split(".")[0] in ("edge_broker", "asyncio")]
    assert not errors, [r.getMessage() for r in errors]


def closes_with(client: RawClient, version: int, reason: int) -> None:
    """5.0: DISCONNECT with `reason`, then the close; 3.1/3.1.1: the close alone."""
    if version == 5:
        assert client.expect(DISCONNECT).reason_code == reason
    client.expect_closed()


# -- MQTT 3.1: client identifier ---------------------------------------------------------


def test_v31_empty_client_id_gets_return_code_2(broker: BrokerThread) -> None:
    # MQTT 3.1, CONNECT payload: the Client Identifier is 1 to 23 characters (mosquitto: 2).
    client = RawClient(broker.port, 3)
    client.send(connect_packet("", version=3))
    assert client.expect_raw(CONNACK) == b"\x20\x02\x00\x02"
    client.expect_closed()


@pytest.mark.parametrize("version", [4, 5])
def test_empty_client_id_with_clean_start_is_assigned_on_311_and_5(broker: BrokerThread,
                                                                  version: int) -> None:
    client = connect(broker.port, "", version=version)  # [MQTT-3.1.3-6] (3.1.1)
    client.ping()


def test_v31_client_id_of_one_character_is_accepted(broker: BrokerThread) -> None:
    connect(broker.port, "x", version=3).ping()


# -- MQTT 3.1: DUP on a resent PUBREL -------------------------------------------------------


def _qos2_received(port: int, version: int) -> RawClient:
    client = connect(port, unique_id("dup"), version=version)
    client.publish("dup/t", b"x", qos=2, packet_id=5)
    assert client.expect(PUBREC).packet_id == 5
    return client


def test_v31_pubrel_with_dup_is_answered(broker: BrokerThread) -> None:
    # MQTT 3.1, 2.1 Fixed header: DUP is set when a PUBREL is sent again.
    client = _qos2_received(broker.port, 3)
    client.send(b"\x6a\x02\x00\x05")  # PUBREL, QoS 1, DUP
    assert client.expect_raw(PUBCOMP) == b"\x70\x02\x00\x05"
    client.ping()


@pytest.mark.parametrize("version", [4, 5])
def test_pubrel_with_dup_is_malformed_on_311_and_5(broker: BrokerThread, version: int) -> None:
    # [MQTT-3.6.1-1] (3.1.1), [MQTT-2.1.3-1] (5.0): PUBREL's fixed flags are 0010.
    client = _qos2_received(broker.port, version)
    client.send(b"\x6a\x02\x00\x05")
    closes_with(client, version, MALFORMED)


# -- acknowledgements of the wrong type -----------------------------------------------------


def _delivered(broker: BrokerThread, version: int, qos: int,
               receive_maximum: int | None = None) -> tuple[RawClient, int]:
    """A subscriber that got one QoS `qos` PUBLISH it has not acknowledged; its packet id."""
    connect_props = props(receive_maximum=receive_maximum) if receive_maximum else b"\x00"
    topic = f"ack/{unique_id()}"
    sub = subscriber(broker.port, unique_id("sub"), (topic, qos), version=version,
                     properties=connect_props)
    pub = connect(broker.port, unique_id("pub"), version=4)
    pub.publish_acked(topic, b"m1", qos=qos)
    if receive_maximum:
        pub.publish_acked(topic, b"m2", qos=qos)
    message = sub.expect_publish()
    assert message.qos == qos and message.payload == b"m1"
    assert message.packet_id is not None
    return sub, message.packet_id


WRONG = [(2, PUBACK_T, "puback-for-qos2"), (2, PUBCOMP_T, "pubcomp-before-pubrec"),
         (1, PUBREC_T, "pubrec-for-qos1"), (1, PUBCOMP_T, "pubcomp-for-qos1")]


@pytest.mark.parametrize("version", [3, 4, 5])
@pytest.mark.parametrize(("qos", "ptype"), [w[:2] for w in WRONG], ids=[w[2] for w in WRONG])
def test_wrong_ack_type_closes(broker: BrokerThread, version: int, qos: int,
                               ptype: int) -> None:
    # [MQTT-4.8.0-1] (3.1.1): a protocol violation closes the connection; 5.0: 0x82.
    sub, packet_id = _delivered(broker, version, qos)
    sub.send(ack_packet(ptype, packet_id))
    closes_with(sub, version, PROTOCOL_ERROR)


def test_wrong_ack_does_not_open_the_receive_window(broker: BrokerThread) -> None:
    # Receive Maximum 1: the second QoS 2 message waits for the first's PUBCOMP. A PUBCOMP
    # before the PUBREC must not release it (it used to).
    sub, packet_id = _delivered(broker, 5, 2, receive_maximum=1)
    sub.send(ack_packet(PUBCOMP_T, packet_id))
    assert sub.expect(DISCONNECT).reason_code == PROTOCOL_ERROR
    sub.expect_closed()


@pytest.mark.parametrize("version", [3, 4, 5])
def test_right_acks_complete_the_flows(broker: BrokerThread, version: int) -> None:
    sub, packet_id = _delivered(broker, version, 2)
    sub.send(ack_packet(PUBREC_T, packet_id))
    assert sub.expect(PUBREL).packet_id == packet_id
    sub.send(ack_packet(PUBCOMP_T, packet_id))
    sub.ping()


@pytest.mark.parametrize("version", [3, 4, 5])
def test_acks_for_unknown_ids_keep_the_connection(broker: BrokerThread, version: int) -> None:
    # An ack for an id the broker did not send (e.g. from before a reconnect) is not a
    # wrong-type ack: PUBACK / PUBCOMP are ignored, a PUBREC gets PUBREL (0x92 on 5.0,
    # 4.3.3 (5.0)).
    client = connect(broker.port, unique_id("unknown"), version=version)
    client.send(ack_packet(PUBACK_T, 31) + ack_packet(PUBCOMP_T, 32))
    client.ping()
    client.send(ack_packet(PUBREC_T, 33))
    pubrel = client.expect(PUBREL)
    assert pubrel.packet_id == 33
    if version == 5:
        assert pubrel.reason_code == PACKET_ID_NOT_FOUND
    client.ping()


# -- ill-formed topic filters ------------------------------------------------------------------

ILL_FORMED = ["#/a", "a/b#", "a+/b", ""]


def _raw_subscribe(version: int, topic_filter: str) -> bytes:
    # The filter is written by hand: rawclient's builder has no empty-filter guard, but be
    # explicit about the bytes.
    body = u16(1) + (b"\x00" if version == 5 else b"") + utf8(topic_filter) + b"\x00"
    return frame(0x82, body)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("topic_filter", ILL_FORMED)
def test_subscribe_with_ill_formed_filter_is_malformed(broker: BrokerThread, version: int,
                                                       topic_filter: str) -> None:
    # [MQTT-4.7.1-1], [MQTT-4.7.1-2], [MQTT-4.7.3-1] (5.0): DISCONNECT 0x81, not SUBACK 0x8F;
    # 3.1.1: [MQTT-4.7.1-1]..[MQTT-4.7.1-3] and 4.8: the close.
    client = connect(broker.port, unique_id("filter"), version=version)
    client.send(_raw_subscribe(version, topic_filter))
    closes_with(client, version, MALFORMED)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("topic_filter", ILL_FORMED)
def test_unsubscribe_with_ill_formed_filter_is_malformed(broker: BrokerThread, version: int,
                                                         topic_filter: str) -> None:
    client = connect(broker.port, unique_id("filter"), version=version)
    client.send(unsubscribe_packet(1, ["ok/t", topic_filter], version=version))
    closes_with(client, version, MALFORMED)


@pytest.mark.parametrize("topic_filter", ["$share//t", "$share/g", "$share/g/"])
def test_v5_bad_shared_subscription_is_a_protocol_error(broker: BrokerThread,
                                                        topic_filter: str) -> None:
    # [MQTT-4.8.2-1], [MQTT-4.8.2-2] (5.0): well-formed as a filter, but the ShareName is
    # empty or not followed by '/' and a filter: the packet parses and breaks a rule.
    client = connect(broker.port, unique_id("share"), version=5)
    client.send(subscribe_packet(1, [(topic_filter, 0)], version=5))
    closes_with(client, 5, PROTOCOL_ERROR)


def test_v5_well_formed_filters_are_granted(broker: BrokerThread) -> None:
    client = connect(broker.port, unique_id("ok"), version=5)
    assert client.subscribe("a/+/b", "#", "$share/g/a/#") == (0, 0, 0)


# -- an error reply never exceeds the client's Maximum Packet Size ----------------------------


def _connack_and_error(port: int, maximum: int | None) -> tuple[bytes, bytes]:
    """The raw CONNACK, then the raw DISCONNECT answering a wildcard topic name (0x90)."""
    client = RawClient(port, 5)
    properties = props(maximum_packet_size=maximum) if maximum else b"\x00"
    client.send(connect_packet(unique_id("mps"), version=5, properties=properties))
    connack = client.expect_raw(CONNACK)
    client.send(frame(0x30, utf8("a/+") + b"\x00"))
    disconnect = client.expect_raw(DISCONNECT)
    client.expect_closed()
    return connack, disconnect


def test_v5_disconnect_fits_the_clients_maximum_packet_size(broker: BrokerThread) -> None:
    # [MQTT-3.1.2-24], 3.1.2.11.4 (5.0): the reason string is left out to fit.
    connack, full = _connack_and_error(broker.port, None)
    assert len(full) > len(connack)  # the reason string makes it larger than the CONNACK
    _, fitted = _connack_and_error(broker.port, len(connack))
    assert fitted == b"\xe0\x01\x90"


def test_publish_after_malformed_filter_is_not_processed(broker: BrokerThread) -> None:
    sub = subscriber(broker.port, unique_id("watch"), "w/t", version=5)
    client = connect(broker.port, unique_id("bad"), version=5)
    client.send(_raw_subscribe(5, "#/a") + frame(0x30, utf8("w/t") + b"\x00" + b"after"))
    closes_with(client, 5, MALFORMED)
    sub.ping()  # the PUBLISH behind the bad SUBSCRIBE was not routed
    with pytest.raises(AssertionError):
        sub.expect(PUBLISH, timeout=0.2)
