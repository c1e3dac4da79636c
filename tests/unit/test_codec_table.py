"""Codec round trips against bytes written by hand from the 3.1.1 and 5.0 specs.

Each row: protocol level, the packet's bytes (hex, spaces and `|` only for reading), and the
packet. decode(bytes) == packet and encode(packet) == bytes.
"""

from __future__ import annotations

import pytest

from edge_broker.mqtt.codec import decode, encode, split_frame
from edge_broker.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from edge_broker.mqtt.properties import PROPERTY_ATTRIBUTES, Properties

V3, V4, V5 = 3, 4, 5


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


# The properties used in rows below; together they contain every property of 2.2.2.2 (5.0).
CONNECT_PROPS = Properties(
    session_expiry_interval=3600, authentication_method="SCRAM",
    authentication_data=b"\x01\x02", request_problem_information=0,
    request_response_information=1, receive_maximum=20, topic_alias_maximum=5,
    user_properties=(("k", "v"),), maximum_packet_size=1024)
CONNECT_PROPS_HEX = (
    "28 | 11 00000e10 | 15 0005 534352414d | 16 0002 0102 | 17 00 | 19 01 | 21 0014 "
    "| 22 0005 | 26 0001 6b 0001 76 | 27 00000400")
WILL_PROPS = Properties(
    will_delay_interval=5, payload_format_indicator=1, message_expiry_interval=60,
    content_type="text", response_topic="r", correlation_data=b"\xaa",
    user_properties=(("a", "b"),))
WILL_PROPS_HEX = (
    "22 | 01 01 | 02 0000003c | 03 0004 74657874 | 08 0001 72 | 09 0001 aa | 18 00000005 "
    "| 26 0001 61 0001 62")
CONNACK_PROPS = Properties(
    session_expiry_interval=60, assigned_client_identifier="gen", server_keep_alive=30,
    authentication_method="M", authentication_data=b"", response_information="ri",
    server_reference="srv", reason_string="ok", receive_maximum=100, topic_alias_maximum=10,
    maximum_qos=1, retain_available=0, user_properties=(("x", "y"),),
    maximum_packet_size=65536, wildcard_subscription_available=1,
    subscription_identifier_available=0, shared_subscription_available=1)
CONNACK_PROPS_HEX = (
    "41 | 11 0000003c | 12 0003 67656e | 13 001e | 15 0001 4d | 16 0000 | 1a 0002 7269 "
    "| 1c 0003 737276 | 1f 0002 6f6b | 21 0064 | 22 000a | 24 01 | 25 00 "
    "| 26 0001 78 0001 79 | 27 00010000 | 28 01 | 29 00 | 2a 01")
PUBLISH_PROPS = Properties(
    payload_format_indicator=1, message_expiry_interval=10, content_type="c",
    response_topic="r", correlation_data=b"\x01\x02", subscription_identifiers=(1, 128),
    topic_alias=5, user_properties=(("k", "v"),))
PUBLISH_PROPS_HEX = (
    "23 | 01 01 | 02 0000000a | 03 0001 63 | 08 0001 72 | 09 0002 0102 | 0b 01 | 0b 8001 "
    "| 23 0005 | 26 0001 6b 0001 76")

TABLE: list[tuple[str, int, str, Packet]] = [
    # ---------------------------------------------------------------- MQTT 3.1.1
    ("connect minimal", V4,
     "10 0f | 0004 4d515454 | 04 | 02 | 003c | 0003 616263",
     Connect("abc", protocol_level=4)),
    ("connect will, user, password", V4,
     "10 1c | 0004 4d515454 | 04 | ec | 000a | 0002 6331 | 0001 77 | 0003 627965 | 0001 75 "
     "| 0001 70",
     Connect("c1", protocol_level=4, clean_start=False, keep_alive=10, username="u",
             password=b"p", will=Will("w", b"bye", qos=1, retain=True))),
    ("connect 3.1", V3,
     "10 10 | 0006 4d5149736470 | 03 | 02 | 003c | 0002 6964",
     Connect("id", protocol_level=3)),
    ("connack session present", V4, "20 02 01 00", ConnAck(session_present=True)),
    ("connack 1", V4, "20 02 00 01", ConnAck(reason_code=0x84)),
    ("connack 2", V4, "20 02 00 02", ConnAck(reason_code=0x85)),
    ("connack 3", V4, "20 02 00 03", ConnAck(reason_code=0x88)),
    ("connack 4", V4, "20 02 00 04", ConnAck(reason_code=0x86)),
    ("connack 5", V4, "20 02 00 05", ConnAck(reason_code=0x87)),
    ("connack 3.1", V3, "20 02 00 00", ConnAck()),
    ("publish qos 0", V4, "30 0a | 0003 612f62 | 68656c6c6f", Publish("a/b", b"hello")),
    ("publish qos 1 dup retain", V4, "3b 07 | 0001 74 | 000a | 6869",
     Publish("t", b"hi", qos=1, retain=True, dup=True, packet_id=10)),
    ("publish qos 2 empty payload", V4, "34 05 | 0001 74 | ffff",
     Publish("t", b"", qos=2, packet_id=65535)),
    ("puback", V4, "40 02 0001", PubAck(1)),
    ("pubrec", V4, "50 02 0002", PubRec(2)),
    ("pubrel", V4, "62 02 0003", PubRel(3)),
    ("pubcomp", V4, "70 02 0004", PubComp(4)),
    ("subscribe", V4, "82 0e | 0001 | 0003 612f23 01 | 0003 622f2b 02",
     Subscribe(1, (Subscription("a/#", 1), Subscription("b/+", 2)))),
    ("suback", V4, "90 05 | 0001 | 01 02 80", SubAck(1, (1, 2, 0x80))),
    ("unsubscribe", V4, "a2 0a | 0005 | 0003 612f23 | 0001 62",
     Unsubscribe(5, ("a/#", "b"))),
    ("unsuback", V4, "b0 02 0005", UnsubAck(5)),
    ("pingreq", V4, "c0 00", PingReq()),
    ("pingresp", V4, "d0 00", PingResp()),
    ("disconnect", V4, "e0 00", Disconnect()),
    # ---------------------------------------------------------------- MQTT 5.0
    ("v5 connect minimal", V5,
     "10 10 | 0004 4d515454 | 05 | 02 | 003c | 00 | 0003 616263",
     Connect("abc")),
    ("v5 connect every property", V5,
     f"10 65 | 0004 4d515454 | 05 | d6 | 0000 | {CONNECT_PROPS_HEX} | 0000 "
     f"| {WILL_PROPS_HEX} | 0001 77 | 0001 78 | 0001 75 | 0002 7077",
     Connect("", keep_alive=0, username="u", password=b"pw",
             will=Will("w", b"x", qos=2, properties=WILL_PROPS), properties=CONNECT_PROPS)),
    ("v5 connect password without user name", V5,
     "10 12 | 0004 4d515454 | 05 | 42 | 003c | 00 | 0001 61 | 0002 7077",
     Connect("a", password=b"pw")),
    ("v5 connack", V5, "20 03 00 00 00", ConnAck()),
    ("v5 connack refused", V5, "20 03 00 87 00", ConnAck(reason_code=0x87)),
    ("v5 connack banned", V5, "20 03 00 8a 00", ConnAck(reason_code=0x8A)),
    ("v5 connack every property", V5, f"20 44 | 01 00 | {CONNACK_PROPS_HEX}",
     ConnAck(session_present=True, properties=CONNACK_PROPS)),
    ("v5 publish qos 0", V5, "30 0b | 0003 612f62 | 00 | 68656c6c6f", Publish("a/b", b"hello")),
    ("v5 publish every property", V5, f"32 2a | 0001 74 | 0007 | {PUBLISH_PROPS_HEX} | 70",
     Publish("t", b"p", qos=1, packet_id=7, properties=PUBLISH_PROPS)),
    ("v5 publish topic alias only", V5, "30 06 | 0000 | 03 2300 01",
     Publish("", b"", properties=Properties(topic_alias=1))),
    ("v5 puback short", V5, "40 02 0001", PubAck(1)),
    ("v5 puback reason", V5, "40 03 0001 10", PubAck(1, 0x10)),
    ("v5 puback reason string", V5, "40 08 0001 80 | 04 1f 0001 65",
     PubAck(1, 0x80, Properties(reason_string="e"))),
    ("v5 pubrec user property", V5, "50 0b 0002 00 | 07 26 0001 61 0001 62",
     PubRec(2, properties=Properties(user_properties=(("a", "b"),)))),
    ("v5 pubrel not found", V5, "62 03 0003 92", PubRel(3, 0x92)),
    ("v5 pubcomp", V5, "70 02 0004", PubComp(4)),
    ("v5 subscribe options", V5,
     "82 1f | 000a | 09 0b05 26 0001 61 0001 62 | 0003 612f2b 2d "
     "| 000a 2473686172652f672f78 12",
     Subscribe(10, (Subscription("a/+", 1, no_local=True, retain_as_published=True,
                                 retain_handling=2),
                    Subscription("$share/g/x", 2, retain_handling=1)),
               Properties(subscription_identifiers=(5,), user_properties=(("a", "b"),)))),
    ("v5 suback", V5, "90 10 | 000a | 05 1f 0002 6e6f | 00 01 02 80 8f 9e a1 a2",
     SubAck(10, (0, 1, 2, 0x80, 0x8F, 0x9E, 0xA1, 0xA2), Properties(reason_string="no"))),
    ("v5 unsubscribe", V5, "a2 0b | 000b | 00 | 0003 612f62 | 0001 23",
     Unsubscribe(11, ("a/b", "#"))),
    ("v5 unsubscribe user property", V5, "a2 0d | 000b | 07 26 0001 61 0001 62 | 0001 23",
     Unsubscribe(11, ("#",), Properties(user_properties=(("a", "b"),)))),
    ("v5 unsuback", V5, "b0 05 | 000b | 00 | 00 11", UnsubAck(11, (0, 0x11))),
    ("v5 pingreq", V5, "c0 00", PingReq()),
    ("v5 pingresp", V5, "d0 00", PingResp()),
    ("v5 disconnect short", V5, "e0 00", Disconnect()),
    ("v5 disconnect reason only", V5, "e0 01 04", Disconnect(4)),
    ("v5 disconnect properties", V5,
     "e0 10 8b | 0e 11 00000000 | 1c 0001 73 | 1f 0002 6279",
     Disconnect(0x8B, Properties(session_expiry_interval=0, server_reference="s",
                                 reason_string="by"))),
    ("v5 auth short", V5, "f0 00", Auth()),
    ("v5 auth reason no properties", V5, "f0 02 19 00", Auth(0x19)),
    ("v5 auth properties", V5,
     "f0 14 18 | 12 15 0005 534352414d | 16 0003 010203 | 1f 0001 78",
     Auth(0x18, Properties(authentication_method="SCRAM", authentication_data=b"\x01\x02\x03",
                           reason_string="x"))),
]


def decode_all(data: bytes, level: int) -> Packet:
    frame = split_frame(data, 0, len(data))
    assert frame is not None
    first, body_start, body_end = frame
    assert body_end == len(data)
    return decode(first, data[body_start:body_end], level)


@pytest.mark.parametrize(("level", "hex_text", "packet"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_decode(level: int, hex_text: str, packet: Packet) -> None:
    assert decode_all(hexbytes(hex_text), level) == packet


@pytest.mark.parametrize(("level", "hex_text", "packet"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_encode(level: int, hex_text: str, packet: Packet) -> None:
    assert encode(packet, level) == hexbytes(hex_text)


def test_table_covers_every_property() -> None:
    used = set()
    for props in (CONNECT_PROPS, WILL_PROPS, CONNACK_PROPS, PUBLISH_PROPS):
        used |= {name for name in PROPERTY_ATTRIBUTES
                 if getattr(props, name) is not None and getattr(props, name) != ()}
    assert used == set(PROPERTY_ATTRIBUTES)


def test_table_covers_every_packet_type_in_both_versions() -> None:
    for levels in ((V4,), (V5,)):
        types = {type(row[3]) for row in TABLE if row[1] in levels}
        assert len(types) == (14 if levels == (V4,) else 15)


# Forms a receiver accepts but the encoder never produces.
DECODE_ONLY: list[tuple[str, int, str, Packet]] = [
    ("v5 connack without property length", V5, "20 02 00 00", ConnAck()),
    ("v5 auth reason without property length", V5, "f0 01 18", Auth(0x18)),
    ("non-minimal remaining length", V4, "c0 80 00", PingReq()),
    ("non-minimal property length", V5, "30 06 | 0001 74 | 80 00 | 78", Publish("t", b"x")),
    ("3.1 connack ignores the reserved byte", V3, "20 02 01 02", ConnAck(reason_code=0x85)),
]


@pytest.mark.parametrize(("level", "hex_text", "packet"), [row[1:] for row in DECODE_ONLY],
                         ids=[row[0] for row in DECODE_ONLY])
def test_decode_only(level: int, hex_text: str, packet: Packet) -> None:
    assert decode_all(hexbytes(hex_text), level) == packet


# What 3.1/3.1.1 cannot carry is translated or dropped by the encoder.
ENCODE_ONLY: list[tuple[str, int, Packet, str]] = [
    ("connack banned -> not authorized", V4, ConnAck(reason_code=0x8A), "20 02 00 05"),
    ("connack busy -> unavailable", V4, ConnAck(reason_code=0x89), "20 02 00 03"),
    ("connack bad auth method -> 4", V4, ConnAck(reason_code=0x8C), "20 02 00 04"),
    ("connack other failure -> unavailable", V4, ConnAck(reason_code=0x9F), "20 02 00 03"),
    ("connack 3.1 has no session present", V3, ConnAck(session_present=True), "20 02 00 00"),
    ("suback failures -> 0x80", V4, SubAck(1, (0x87, 0x8F, 1)), "90 05 0001 80 80 01"),
    ("publish properties dropped", V4,
     Publish("t", b"", properties=Properties(message_expiry_interval=1)), "30 03 0001 74"),
    ("puback reason dropped", V4, PubAck(1, 0x80, Properties(reason_string="x")),
     "40 02 0001"),
    ("subscribe options dropped", V4,
     Subscribe(1, (Subscription("a", 1, no_local=True, retain_handling=2),)),
     "82 06 0001 0001 61 01"),
    ("unsuback reason codes dropped", V4, UnsubAck(1, (0x11,)), "b0 02 0001"),
    ("disconnect reason dropped", V4, Disconnect(0x8E), "e0 00"),
    ("will properties dropped", V4,
     Connect("a", protocol_level=4, will=Will("w", b"", properties=Properties(
         will_delay_interval=1))),
     "10 12 | 0004 4d515454 | 04 | 06 | 003c | 0001 61 | 0001 77 | 0000"),
]


@pytest.mark.parametrize(("level", "packet", "hex_text"), [row[1:] for row in ENCODE_ONLY],
                         ids=[row[0] for row in ENCODE_ONLY])
def test_encode_translates_for_old_versions(level: int, packet: Packet, hex_text: str) -> None:
    assert encode(packet, level) == hexbytes(hex_text)
