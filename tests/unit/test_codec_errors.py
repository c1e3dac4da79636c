"""Malformed and rule-breaking packets: each row names the reason code the codec must give."""

from __future__ import annotations

import pytest

from edge_broker.mqtt.codec import decode, encode, frame_bounds, split_frame
from edge_broker.mqtt.errors import LocalProtocolError, RemoteProtocolError
from edge_broker.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Packet,
    PubAck,
    Publish,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.types import ReasonCode

M = ReasonCode.MALFORMED_PACKET
P = ReasonCode.PROTOCOL_ERROR
U = ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
V4, V5 = 4, 5

# A CONNECT header for 3.1.1 / 5.0 up to and including the protocol level.
C4 = "0004 4d515454 04"
C5 = "0004 4d515454 05"

ERRORS: list[tuple[str, int, str, ReasonCode]] = [
    # fixed header
    ("packet type 0", V4, "00 00", M),
    ("packet type 0 on 5.0", V5, "00 00", M),
    ("AUTH on 3.1.1", V4, "f0 00", M),
    ("PUBREL flags 0", V4, "60 02 0001", M),
    ("SUBSCRIBE flags 0", V4, "80 06 0001 0001 61 00", M),
    ("UNSUBSCRIBE flags 0", V5, "a0 06 0001 00 0001 61", M),
    ("PUBACK flags 2", V5, "42 02 0001", M),
    ("PINGREQ flags 1", V4, "c1 00", M),
    ("CONNECT flags 1", V4, f"11 0d {C4} 02 003c 0001 61", M),
    ("DISCONNECT flags 8", V5, "e8 00", M),
    ("PUBLISH QoS 3", V4, "36 05 0001 74 0001", M),
    ("PUBLISH QoS 0 with DUP", V4, "38 03 0001 74", M),
    # lengths and trailing bytes
    ("PUBLISH topic runs past the end", V4, "30 02 0005", M),
    ("PUBLISH without topic length", V4, "30 01 00", M),
    ("PUBLISH QoS 1 without packet id", V4, "32 03 0001 74", M),
    ("PINGREQ with a body", V4, "c0 01 00", M),
    ("PINGRESP with a body", V5, "d0 01 00", M),
    ("PUBACK trailing byte on 3.1.1", V4, "40 03 0001 00", M),
    ("PUBACK one byte", V5, "40 01 00", M),
    ("PUBREC properties run past the end", V5, "50 04 0001 00 05", M),
    ("PUBCOMP trailing bytes after properties", V5, "70 05 0001 00 00 00", M),
    ("DISCONNECT with a body on 3.1.1", V4, "e0 01 00", M),
    ("DISCONNECT trailing bytes", V5, "e0 03 00 00 00", M),
    ("UNSUBACK with a payload on 3.1.1", V4, "b0 03 0001 00", M),
    ("CONNACK short", V4, "20 01 00", M),
    ("CONNACK trailing byte on 3.1.1", V4, "20 03 00 00 00", M),
    ("CONNECT trailing byte", V4, f"10 0e {C4} 02 003c 0001 61 00", M),
    ("CONNECT client id runs past the end", V4, f"10 0d {C4} 02 003c 0005 61", M),
    ("CONNECT without keep alive", V4, f"10 08 {C4} 02", M),
    ("CONNECT will payload missing", V4, f"10 10 {C4} 06 003c 0001 61 0001 77", M),
    # strings
    ("invalid UTF-8", V4, "30 03 0001 ff", M),
    ("U+0000 in a topic", V4, "30 03 0001 00", M),
    ("UTF-16 surrogate in a topic", V4, "30 05 0003 eda080", M),
    ("overlong UTF-8", V4, "30 04 0002 c0af", M),
    ("truncated UTF-8 sequence", V5, "30 04 0001 e2 00", M),
    ("U+0000 in a user property", V5, "40 0b 0001 00 07 26 0001 00 0001 61", M),
    # CONNECT flags
    ("CONNECT reserved flag", V4, f"10 0d {C4} 03 003c 0001 61", M),
    ("CONNECT reserved flag on 5.0", V5, f"10 0e {C5} 03 003c 00 0001 61", M),
    ("will QoS 3", V4, f"10 0d {C4} 1e 003c 0001 61", M),
    ("will retain without will flag", V4, f"10 0d {C4} 22 003c 0001 61", M),
    ("will QoS without will flag", V5, f"10 0e {C5} 0a 003c 00 0001 61", M),
    ("password without user name on 3.1.1", V4, f"10 10 {C4} 42 003c 0001 61 0001 70", M),
    # CONNACK
    ("CONNACK reserved flags on 5.0", V5, "20 03 02 00 00", M),
    ("CONNACK reserved flags on 3.1.1", V4, "20 02 02 00", M),
    ("CONNACK return code 6", V4, "20 02 00 06", P),
    ("CONNACK reason code 0x01 on 5.0", V5, "20 03 00 01 00", P),
    # SUBSCRIBE / UNSUBSCRIBE
    ("SUBSCRIBE empty topic filter", V4, "82 05 0001 0000 00", M),
    ("SUBSCRIBE 3.1.1 options upper bits", V4, "82 06 0001 0001 61 04", M),
    ("SUBSCRIBE 3.1.1 QoS 3", V4, "82 06 0001 0001 61 03", M),
    ("SUBSCRIBE 5.0 reserved option bits", V5, "82 07 0001 00 0001 61 40", M),
    ("SUBSCRIBE 5.0 QoS 3", V5, "82 07 0001 00 0001 61 03", P),
    ("SUBSCRIBE 5.0 retain handling 3", V5, "82 07 0001 00 0001 61 30", P),
    ("SUBSCRIBE without options byte", V4, "82 05 0001 0001 61", M),
    ("SUBSCRIBE without topic filters", V4, "82 02 0001", P),
    ("SUBSCRIBE 5.0 without topic filters", V5, "82 03 0001 00", P),
    ("UNSUBSCRIBE empty topic filter", V4, "a2 04 0001 0000", M),
    ("UNSUBSCRIBE without topic filters", V4, "a2 02 0001", P),
    ("UNSUBSCRIBE 5.0 without topic filters", V5, "a2 03 0001 00", P),
    ("SUBACK without reason codes", V4, "90 02 0001", P),
    ("SUBACK 5.0 without reason codes", V5, "90 03 0001 00", P),
    ("UNSUBACK 5.0 without reason codes", V5, "b0 03 0001 00", P),
    # packet identifier 0, [MQTT-2.2.1-3] (5.0)
    ("PUBLISH packet id 0", V4, "32 05 0001 74 0000", P),
    ("PUBACK packet id 0", V5, "40 02 0000", P),
    ("PUBREL packet id 0", V4, "62 02 0000", P),
    ("SUBSCRIBE packet id 0", V4, "82 06 0000 0001 61 00", P),
    ("SUBACK packet id 0", V4, "90 03 0000 00", P),
    ("UNSUBSCRIBE packet id 0", V4, "a2 05 0000 0001 61", P),
    ("UNSUBACK packet id 0", V4, "b0 02 0000", P),
    # reason codes a packet may not carry
    ("PUBACK reason 0x05", V5, "40 03 0001 05", P),
    ("PUBREL reason 0x10", V5, "62 03 0001 10", P),
    ("PUBCOMP reason 0x80", V5, "70 03 0001 80", P),
    ("SUBACK 5.0 reason 0x03", V5, "90 04 0001 00 03", P),
    ("SUBACK 3.1.1 return code 0x87", V4, "90 03 0001 87", P),
    ("UNSUBACK reason 0x01", V5, "b0 04 0001 00 01", P),
    ("DISCONNECT reason 0x01", V5, "e0 01 01", P),
    ("AUTH reason 0x01", V5, "f0 02 01 00", P),
    # properties
    ("unknown property 0x00", V5, "30 05 0001 74 01 00", M),
    ("unknown property 0x04", V5, "30 06 0001 74 02 04 00", M),
    ("property not allowed in PUBLISH", V5, "30 09 0001 74 05 11 00000001", M),
    ("property not allowed in the will", V5,
     f"10 19 {C5} 06 003c 00 0001 61 05 11 00000001 0001 77 0000", M),
    ("topic alias not allowed in CONNECT", V5, f"10 11 {C5} 02 003c 03 2300 01 0001 61", M),
    ("property length runs past the end", V5, "30 04 0001 74 05", M),
    ("property value runs past the property length", V5, "30 06 0001 74 02 02 00", M),
    ("property identifier longer than four bytes", V5, "30 09 0001 74 05 8080808001", M),
    ("duplicate message expiry", V5, "30 0e 0001 74 0a 02 00000001 02 00000002", P),
    ("duplicate reason string", V5, "40 0c 0001 80 08 1f 0001 61 1f 0001 62", P),
    ("subscription identifier 0", V5, "82 09 0001 02 0b 00 0001 61 00", P),
    ("subscription identifier twice in SUBSCRIBE", V5, "82 0b 0001 04 0b 01 0b 02 0001 61 00",
     P),
    ("receive maximum 0", V5, f"10 11 {C5} 02 003c 03 21 0000 0001 61", P),
    ("maximum packet size 0", V5, "20 08 00 00 05 27 00000000", P),
    ("request problem information 2", V5, f"10 10 {C5} 02 003c 02 17 02 0001 61", P),
    ("request response information 2", V5, f"10 10 {C5} 02 003c 02 19 02 0001 61", P),
    ("payload format indicator 2", V5, "30 06 0001 74 02 01 02", P),
    ("maximum QoS 2", V5, "20 05 00 00 02 24 02", P),
    ("retain available 2", V5, "20 05 00 00 02 25 02", P),
    ("wildcard subscription available 2", V5, "20 05 00 00 02 28 02", P),
    ("subscription identifier available 2", V5, "20 05 00 00 02 29 02", P),
    ("shared subscription available 2", V5, "20 05 00 00 02 2a 02", P),
    # protocol name / level
    ("MQTT level 3", V4, "10 0d 0004 4d515454 03 02 003c 0001 61", U),
    ("MQTT level 6", V4, "10 0d 0004 4d515454 06 02 003c 0001 61", U),
    ("MQIsdp level 4", V4, "10 0f 0006 4d5149736470 04 02 003c 0001 61", U),
    ("lower case name", V4, "10 0d 0004 6d717474 04 02 003c 0001 61", U),
]


def decode_all(data: bytes, level: int) -> Packet:
    frame = split_frame(data, 0, len(data))
    assert frame is not None
    first, body_start, body_end = frame
    assert body_end == len(data), "the row's remaining length is wrong"
    return decode(first, data[body_start:body_end], level)


@pytest.mark.parametrize(("level", "hex_text", "reason"), [row[1:] for row in ERRORS],
                         ids=[row[0] for row in ERRORS])
def test_decode_error(level: int, hex_text: str, reason: ReasonCode) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(bytes.fromhex(hex_text), level)
    assert info.value.reason_code == reason, info.value.message


def test_remaining_length_longer_than_four_bytes() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        split_frame(bytes.fromhex("30 ff ff ff ff 01"), 0, 1 << 30)
    assert info.value.reason_code == M


def test_remaining_length_four_continuation_bytes_fails_before_the_fifth() -> None:
    with pytest.raises(RemoteProtocolError):
        split_frame(bytes.fromhex("30 80 80 80 80"), 0, 1 << 30)


def test_too_large_is_detected_from_the_header_alone() -> None:
    # 1 + 1 + 127 = 129 bytes > 100, with none of the body present.
    with pytest.raises(RemoteProtocolError) as info:
        split_frame(bytes.fromhex("30 7f"), 0, 100)
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    # Exactly at the limit is fine (and incomplete here).
    assert split_frame(bytes.fromhex("30 7f"), 0, 129) is None


def test_split_frame_needs_more() -> None:
    assert split_frame(b"", 0, 100) is None
    assert split_frame(b"\x30", 0, 100) is None
    assert split_frame(b"\x30\x80", 0, 1000) is None
    assert split_frame(b"\x30\x03\x00\x01", 0, 100) is None
    assert split_frame(b"xx\xc0\x00", 2, 100) == (0xC0, 4, 4)


def test_frame_bounds_is_split_frame_without_the_first_byte() -> None:
    # What Connection reads a packet with: (0, 0) while incomplete, the same errors.
    assert frame_bounds(bytearray(b"\x30\x80"), 0, 1000) == (0, 0)
    assert frame_bounds(bytearray(b"\x30\x03\x00\x01"), 0, 100) == (0, 0)
    assert frame_bounds(bytearray(b"xx\xc0\x00"), 2, 100) == (4, 4)
    assert frame_bounds(bytearray(b"\x30\x80\x01" + bytes(128)), 0, 1 << 30) == (3, 131)
    with pytest.raises(RemoteProtocolError) as info:
        frame_bounds(bytearray(b"\x30\x7f"), 0, 100)
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE


# Encoding what cannot be put on the wire is the caller's bug.
LOCAL_ERRORS: list[tuple[str, int, Packet]] = [
    ("AUTH on 3.1.1", V4, Auth()),
    ("publish QoS 3", V5, Publish("t", qos=3, packet_id=1)),
    ("publish QoS 1 without packet id", V4, Publish("t", qos=1)),
    ("publish QoS 0 with packet id", V4, Publish("t", packet_id=1)),
    ("publish packet id 0", V4, Publish("t", qos=1, packet_id=0)),
    ("publish packet id 65536", V4, Publish("t", qos=1, packet_id=65536)),
    ("publish QoS 0 with DUP", V4, Publish("t", dup=True)),
    ("publish empty topic on 3.1.1", V4, Publish("")),
    ("publish empty topic without alias", V5, Publish("")),
    ("publish topic with U+0000", V5, Publish("a\x00")),
    ("publish topic with a surrogate", V5, Publish("a\ud800")),
    ("publish topic too long", V4, Publish("a" * 65536)),
    ("property not allowed", V5, Publish("t", properties=Properties(receive_maximum=5))),
    ("receive maximum 0", V5, Connect("a", properties=Properties(receive_maximum=0))),
    ("maximum QoS 2", V5, ConnAck(properties=Properties(maximum_qos=2))),
    ("two subscription identifiers in SUBSCRIBE", V5,
     Subscribe(1, (Subscription("a"),), Properties(subscription_identifiers=(1, 2)))),
    ("subscription identifier 0", V5,
     Publish("t", properties=Properties(subscription_identifiers=(0,)))),
    ("u16 property out of range", V5, Connect("a", properties=Properties(
        receive_maximum=65536))),
    ("password without user name on 3.1.1", V4, Connect("a", protocol_level=4, password=b"")),
    ("will QoS 3", V4, Connect("a", protocol_level=4, will=Will("w", b"", qos=3))),
    ("protocol level 6", V5, Connect("a", protocol_level=6)),
    ("CONNACK refusal with session present", V5, ConnAck(True, 0x80)),
    ("CONNACK reason 0x10 on 3.1.1", V4, ConnAck(reason_code=0x10)),
    ("CONNACK reason 0x10 on 5.0", V5, ConnAck(reason_code=0x10)),
    ("PUBACK reason 0x92", V5, PubAck(1, 0x92)),
    ("PUBREL reason 0x80 with properties", V5,
     PubRel(1, 0x80, Properties(reason_string="x"))),
    ("SUBACK 3.1.1 code 3", V4, SubAck(1, (3,))),
    ("SUBACK empty", V5, SubAck(1, ())),
    ("SUBSCRIBE empty", V5, Subscribe(1, ())),
    ("SUBSCRIBE empty filter", V5, Subscribe(1, (Subscription(""),))),
    ("SUBSCRIBE retain handling 3", V5, Subscribe(1, (Subscription("a", retain_handling=3),))),
    ("UNSUBSCRIBE empty", V5, Unsubscribe(1, ())),
    ("UNSUBACK 5.0 without reason codes", V5, UnsubAck(1)),
    ("AUTH reason 0x80", V5, Auth(0x80)),
]


@pytest.mark.parametrize(("level", "packet"), [row[1:] for row in LOCAL_ERRORS],
                         ids=[row[0] for row in LOCAL_ERRORS])
def test_encode_error(level: int, packet: Packet) -> None:
    with pytest.raises(LocalProtocolError):
        encode(packet, level)
