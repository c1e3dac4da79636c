"""Black-box: malformed and illegal input, as hand-built bytes, against one running broker.

Every row of `CASES` is sent on its own connection (after a valid CONNECT unless the row is
about the CONNECT itself or what comes before it), and the broker must answer as the spec
says: on MQTT 5 a CONNACK with the reason code when the error is in or before the CONNECT,
otherwise a DISCONNECT with the reason code, then the close; on 3.1.1 a close, or the CONNACK
return code where 3.1.1 has one (0x01 unsupported protocol, 0x02 identifier rejected).

Each row runs after the CONNACK and one byte per write; rows that follow a CONNECT also run
pipelined behind it in one write (so they are decoded before the CONNACK is sent). Hypothesis
then sends random bytes (after a CONNECT and as the first bytes) and mutated valid packets,
and the same checks apply.

All rows run against ONE broker (module scope). Around every row, a well-behaved subscriber
and a well-behaved publisher on that broker must round-trip a message (before and after), the
broker must be back to exactly those two connections and sessions, and nothing may have been
logged at ERROR level by the `edge_broker` or `asyncio` loggers (an ERROR there means an
internal exception, i.e. a bug, not a protocol error).

The broker runs with max_packet_size=1024 (the oversized-packet rows), receive_maximum=2 (the
Receive Maximum row) and topic_alias_maximum=10. Reason codes: 0x81 Malformed Packet, 0x82
Protocol Error, 0x90 Topic Name invalid, 0x93 Receive Maximum exceeded, 0x94 Topic Alias
invalid, 0x95 Packet too large. Spec references name their version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_broker.core.changes import Change
from edge_broker.store.base import DONE
from edge_broker.store.memory import MemoryStore
from tests.conftest import BrokerThread, broker_config
from tests.integration.wirebytes import (
    CONNACK,
    DISCONNECT,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    SUBACK,
    UNSUBACK,
    Frame,
    RawClient,
    connect,
    frame,
    h,
    publish,
    publish_fields,
    reason,
    subscribe,
    utf8,
)

MAX_PACKET_SIZE = 1024
RECEIVE_MAXIMUM = 2
TOPIC_ALIAS_MAXIMUM = 10
WATCH_TOPIC = "watch/7f3e9c2a/t"  # long and unlikely, so fuzzed bytes never publish to it
WATCH_SUB_ID = "watch-sub"
WATCH_PUB_ID = "watch-pub"

V4, V5 = 4, 5
PRE = 0  # before any CONNECT: the protocol version is not known yet
MALFORMED, PROTOCOL_ERROR = 0x81, 0x82
TOPIC_NAME_INVALID, RECEIVE_MAXIMUM_EXCEEDED, TOPIC_ALIAS_INVALID = 0x90, 0x93, 0x94
PACKET_TOO_LARGE, NO_MATCHING_SUBSCRIBERS = 0x95, 0x10

Answer = tuple[int, int | tuple[int, ...] | None]  # (packet type, reason code(s))


def connack(code: int) -> Answer:
    return (CONNACK, code)


def disconnect(code: int) -> Answer:
    return (DISCONNECT, code)


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    version: int  # 4 or 5: the valid CONNECT sent first (or the version of the bad CONNECT)
    data: bytes  # sent after the CONNECT/CONNACK exchange, or instead of the CONNECT
    expect: tuple[Answer, ...] = ()  # what the broker answers (after our CONNACK)
    handshake: bool = True  # send a valid CONNECT and wait for CONNACK 0 first
    closes: bool = True  # False: the connection must stay usable after the answer
    half_close: bool = False  # shut our sending side after `data` (a truncated packet at EOF)
    expect_trickled: tuple[Answer, ...] | None = None  # if one byte at a time differs


def C(version: int, *parts: bytes | str) -> bytes:
    """A CONNECT with the given body parts after the protocol name ("MQTT")."""
    return frame(0x10, utf8("MQTT"), bytes((version,)), *parts)


def cid(name: str) -> bytes:
    return utf8(f"bad-{name}")


def _v4_cases() -> list[Case]:
    return [
        # -- framing
        Case("v4-rl-5-bytes", "Remaining Length with 5 bytes (4 continuation bits)", V4,
             h("30 80 80 80 80 01 00")),
        Case("v4-rl-zero-publish", "PUBLISH with Remaining Length 0", V4, h("30 00")),
        Case("v4-rl-short", "Remaining Length 2 ends inside the topic name", V4,
             h("30 02 0001 74")),
        Case("v4-rl-long", "SUBSCRIBE Remaining Length 2 too long swallows a PINGREQ", V4,
             h("82 08 0001 0001 74 00 c0 00")),
        Case("v4-pingreq-body", "PINGREQ with Remaining Length 1", V4, h("c0 01 00")),
        Case("v4-connect-trailing", "CONNECT with a trailing byte", V4,
             C(4, "02 0000", cid("v4-trail"), "00"), handshake=False),
        # -- reserved fixed-header flags [MQTT-2.2.2-2] (3.1.1)
        Case("v4-pubrel-flags-0", "PUBREL with flags 0000", V4, h("60 02 0001")),
        Case("v4-subscribe-flags-0", "SUBSCRIBE with flags 0000", V4,
             h("80 06 0001 0001 74 00")),
        Case("v4-unsubscribe-flags-0", "UNSUBSCRIBE with flags 0000", V4,
             h("a0 05 0001 0001 74")),
        Case("v4-pingreq-flags", "PINGREQ with flags 0001", V4, h("c1 00")),
        Case("v4-puback-flags", "PUBACK with flags 0010", V4, h("42 02 0001")),
        Case("v4-connect-flags", "CONNECT with fixed-header flags 0001", V4,
             h("11") + C(4, "02 0000", cid("v4-cflags"))[1:], handshake=False),
        # -- packet types
        Case("v4-type-0", "reserved packet type 0", V4, h("00 00")),
        Case("v4-auth", "AUTH (type 15) does not exist in 3.1.1", V4, h("f0 00")),
        Case("v4-sends-connack", "client sends CONNACK", V4, h("20 02 00 00")),
        Case("v4-sends-suback", "client sends SUBACK", V4, h("90 03 0001 00")),
        Case("v4-sends-unsuback", "client sends UNSUBACK", V4, h("b0 02 0001")),
        Case("v4-sends-pingresp", "client sends PINGRESP", V4, h("d0 00")),
        Case("v4-second-connect", "a second CONNECT [MQTT-3.1.0-2] (3.1.1)", V4,
             C(4, "02 0000", cid("v4-second"))),
        # -- topic names [MQTT-3.3.2-2], [MQTT-1.5.3-1/2] (3.1.1)
        Case("v4-topic-plus", "'+' in a topic name", V4, frame(0x30, utf8("a/+"))),
        Case("v4-topic-hash", "'#' in a topic name", V4, frame(0x30, utf8("a/#"))),
        Case("v4-topic-empty", "empty topic name [MQTT-4.7.3-1]", V4, h("30 02 0000")),
        Case("v4-topic-bad-utf8", "0xFF in the topic name", V4, h("30 05 0003 61 ff 62")),
        Case("v4-topic-overlong", "overlong UTF-8 C0 AF in the topic name", V4,
             h("30 04 0002 c0 af")),
        Case("v4-topic-nul", "U+0000 in the topic name", V4, h("30 05 0003 61 00 62")),
        Case("v4-topic-surrogate", "UTF-16 surrogate ED A0 80 in the topic name", V4,
             h("30 05 0003 ed a0 80")),
        # -- PUBLISH flags and packet identifiers
        Case("v4-publish-qos3", "PUBLISH with QoS 3 [MQTT-3.3.1-4]", V4,
             h("36 05 0001 74 0001")),
        Case("v4-publish-qos0-dup", "QoS 0 PUBLISH with DUP [MQTT-3.3.1-2]", V4,
             h("38 03 0001 74")),
        Case("v4-publish-pid-0", "QoS 1 PUBLISH with packet id 0 [MQTT-2.3.1-1]", V4,
             h("32 05 0001 74 0000")),
        Case("v4-subscribe-pid-0", "SUBSCRIBE with packet id 0", V4,
             h("82 06 0000 0001 74 00")),
        Case("v4-unsubscribe-pid-0", "UNSUBSCRIBE with packet id 0", V4,
             h("a2 05 0000 0001 74")),
        # -- SUBSCRIBE / UNSUBSCRIBE payloads
        Case("v4-subscribe-no-filters", "SUBSCRIBE without a payload [MQTT-3.8.3-3]", V4,
             h("82 02 0001")),
        Case("v4-unsubscribe-no-filters", "UNSUBSCRIBE without a payload [MQTT-3.10.3-2]", V4,
             h("a2 02 0001")),
        Case("v4-subscribe-qos-reserved", "requested QoS byte 0x04 [MQTT-3-8.3-4]", V4,
             h("82 06 0001 0001 74 04")),
        Case("v4-subscribe-qos3", "requested QoS 3 [MQTT-3-8.3-4]", V4,
             h("82 06 0001 0001 74 03")),
        Case("v4-subscribe-empty-filter", "zero-length topic filter [MQTT-4.7.3-1]", V4,
             h("82 05 0001 0000 00")),
        Case("v4-subscribe-missing-options", "last topic filter without its options byte",
             V4, h("82 05 0001 0001 74")),
        Case("v4-subscribe-bad-filter", "topic filter a/#/b [MQTT-4.7.1-2]: close", V4,
             frame(0x82, "0001", utf8("a/#/b"), "00")),
        Case("v4-unsubscribe-bad-filter", "UNSUBSCRIBE a/+b: close", V4,
             frame(0xA2, "0001", utf8("a/+b"))),
        # -- illegal, but answered without closing
        Case("v4-pubrel-unknown-id", "PUBREL for a packet id never received -> PUBCOMP",
             V4, h("62 02 0007"), ((PUBCOMP, 0),), closes=False),
        Case("v4-data-after-disconnect", "PINGREQ after DISCONNECT: no PINGRESP", V4,
             h("e0 00 c0 00")),
        # -- size limits: refused from the fixed header, the body is never sent
        Case("v4-too-large", "2 KiB PUBLISH above max_packet_size 1024 (header only)", V4,
             h("32 80 10 0001 74 0001 78787878")),
        # -- truncated packet at end of stream: just clean up
        Case("v4-truncated-eof", "half a PUBLISH, then EOF", V4, h("30 0a 0001 74"),
             half_close=True),
        # -- CONNECT itself
        Case("v4-protocol-name", "protocol name MQTX -> CONNACK 0x01 [MQTT-3.1.2-1]", V4,
             frame(0x10, utf8("MQTX"), "04 02 0000", cid("v4-name")), (connack(1),),
             handshake=False),
        Case("v4-protocol-level-3", "name MQTT with level 3 -> CONNACK 0x01 [MQTT-3.1.2-2]",
             V4, C(3, "02 0000", cid("v4-l3")), (connack(1),), handshake=False),
        Case("v4-mqisdp-level-4", "name MQIsdp with level 4 -> CONNACK 0x01", V4,
             frame(0x10, utf8("MQIsdp"), "04 02 0000", cid("v4-mqisdp")), (connack(1),),
             handshake=False),
        Case("v4-connect-reserved-flag", "connect flags reserved bit [MQTT-3.1.2-3]", V4,
             C(4, "03 0000", cid("v4-rsv")), handshake=False),
        Case("v4-will-qos3", "will QoS 3 [MQTT-3.1.2-14]", V4,
             C(4, "1e 0000", cid("v4-wq3"), utf8("w/t"), "0001 78"), handshake=False),
        Case("v4-will-retain-no-will", "will retain 1 with will flag 0 [MQTT-3.1.2-15]", V4,
             C(4, "22 0000", cid("v4-wr")), handshake=False),
        Case("v4-will-qos-no-will", "will QoS 1 with will flag 0 [MQTT-3.1.2-13]", V4,
             C(4, "0a 0000", cid("v4-wq")), handshake=False),
        Case("v4-will-topic-wildcard", "will topic w/# [MQTT-3.1.3-11]: close", V4,
             C(4, "06 0000", cid("v4-wt"), utf8("w/#"), "0001 78"), handshake=False),
        Case("v4-password-no-username", "password flag without user name [MQTT-3.1.2-22]",
             V4, C(4, "42 0000", cid("v4-pw"), "0002 7077"), handshake=False),
        Case("v4-client-id-bad-utf8", "client identifier C0 AF", V4,
             C(4, "02 0000", "0002 c0 af"), handshake=False),
        Case("v4-empty-id-persistent",
             "empty client id with clean session 0 -> CONNACK 0x02 [MQTT-3.1.3-8]", V4,
             C(4, "00 0000", "0000"), (connack(2),), handshake=False),
        Case("v4-connect-too-large", "2 KiB CONNECT (header and name only)", V4,
             h("10 80 10 0004 4d515454 04 02 0000"), handshake=False),
    ]


def _v5_cases() -> list[Case]:
    wq3_props = "00"  # CONNECT properties, then will properties, both empty
    return [
        # -- framing
        Case("v5-rl-5-bytes", "Remaining Length with 5 bytes", V5,
             h("30 80 80 80 80 01 00"), (disconnect(MALFORMED),)),
        Case("v5-rl-zero-publish", "PUBLISH with Remaining Length 0", V5, h("30 00"),
             (disconnect(MALFORMED),)),
        Case("v5-rl-short", "Remaining Length 2 ends inside the topic name", V5,
             h("30 02 0001 74 00"), (disconnect(MALFORMED),)),
        Case("v5-rl-long", "SUBSCRIBE Remaining Length 2 too long swallows a PINGREQ", V5,
             h("82 09 0001 00 0001 74 00 c0 00"), (disconnect(MALFORMED),)),
        Case("v5-property-length-past-end", "PUBLISH Property Length 5, 2 bytes left", V5,
             h("30 06 0001 74 05 01 02"), (disconnect(MALFORMED),)),
        Case("v5-connect-trailing", "CONNECT with a trailing byte -> CONNACK 0x81", V5,
             C(5, "02 0000 00", cid("v5-trail"), "00"), (connack(MALFORMED),),
             handshake=False),
        # -- reserved fixed-header flags [MQTT-2.1.3-1] (5.0)
        Case("v5-pubrel-flags-0", "PUBREL with flags 0000", V5, h("60 02 0001"),
             (disconnect(MALFORMED),)),
        Case("v5-subscribe-flags-0", "SUBSCRIBE with flags 0000", V5,
             h("80 07 0001 00 0001 74 00"), (disconnect(MALFORMED),)),
        Case("v5-unsubscribe-flags-0", "UNSUBSCRIBE with flags 0000", V5,
             h("a0 06 0001 00 0001 74"), (disconnect(MALFORMED),)),
        Case("v5-pingreq-flags", "PINGREQ with flags 1000", V5, h("c8 00"),
             (disconnect(MALFORMED),)),
        Case("v5-disconnect-flags", "DISCONNECT with flags 0001", V5, h("e1 00"),
             (disconnect(MALFORMED),)),
        Case("v5-connect-flags", "CONNECT with fixed-header flags 0010 -> CONNACK 0x81", V5,
             h("12") + C(5, "02 0000 00", cid("v5-cflags"))[1:], (connack(MALFORMED),),
             handshake=False),
        # -- packet types
        Case("v5-type-0", "reserved packet type 0", V5, h("00 00"), (disconnect(MALFORMED),)),
        Case("v5-auth-without-method", "AUTH without an Authentication Method (4.12)", V5,
             h("f0 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-sends-connack", "client sends CONNACK", V5, h("20 03 00 00 00"),
             (disconnect(PROTOCOL_ERROR),)),
        Case("v5-sends-suback", "client sends SUBACK", V5, h("90 04 0001 00 00"),
             (disconnect(PROTOCOL_ERROR),)),
        Case("v5-sends-pingresp", "client sends PINGRESP", V5, h("d0 00"),
             (disconnect(PROTOCOL_ERROR),)),
        Case("v5-second-connect", "a second CONNECT [MQTT-3.1.0-2] (5.0)", V5,
             C(5, "02 0000 00", cid("v5-second")), (disconnect(PROTOCOL_ERROR),)),
        # -- topic names [MQTT-3.3.2-2], [MQTT-1.5.4-1/2] (5.0)
        Case("v5-topic-plus", "'+' in a topic name -> 0x90", V5,
             frame(0x30, utf8("a/+"), "00"), (disconnect(TOPIC_NAME_INVALID),)),
        Case("v5-topic-hash", "'#' in a topic name -> 0x90", V5,
             frame(0x30, utf8("a/#"), "00"), (disconnect(TOPIC_NAME_INVALID),)),
        Case("v5-topic-empty-no-alias", "empty topic without a Topic Alias (3.3.2.1)", V5,
             h("30 03 0000 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-topic-bad-utf8", "0xFF in the topic name", V5, h("30 06 0003 61 ff 62 00"),
             (disconnect(MALFORMED),)),
        Case("v5-topic-nul", "U+0000 in the topic name", V5, h("30 06 0003 61 00 62 00"),
             (disconnect(MALFORMED),)),
        Case("v5-topic-surrogate", "UTF-16 surrogate ED A0 80 in the topic name", V5,
             h("30 06 0003 ed a0 80 00"), (disconnect(MALFORMED),)),
        # -- PUBLISH flags and packet identifiers
        Case("v5-publish-qos3", "PUBLISH with QoS 3 [MQTT-3.3.1-4]", V5,
             h("36 06 0001 74 0001 00"), (disconnect(MALFORMED),)),
        Case("v5-publish-qos0-dup", "QoS 0 PUBLISH with DUP [MQTT-3.3.1-2]", V5,
             h("38 04 0001 74 00"), (disconnect(MALFORMED),)),
        Case("v5-publish-pid-0", "QoS 1 PUBLISH with packet id 0 [MQTT-2.2.1-3]", V5,
             h("32 06 0001 74 0000 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscribe-pid-0", "SUBSCRIBE with packet id 0", V5,
             h("82 07 0000 00 0001 74 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-unsubscribe-pid-0", "UNSUBSCRIBE with packet id 0", V5,
             h("a2 06 0000 00 0001 74"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-pubrel-bad-reason", "PUBREL with reason code 0x80 (3.6.2.1)", V5,
             h("62 03 0001 80"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-disconnect-bad-reason", "DISCONNECT with reason code 0x05 (3.14.2.1)", V5,
             h("e0 01 05"), (disconnect(PROTOCOL_ERROR),)),
        # -- properties (2.2.2 (5.0))
        Case("v5-property-unknown", "unknown property identifier 0x04 in PUBLISH", V5,
             h("30 06 0001 74 02 04 00"), (disconnect(MALFORMED),)),
        Case("v5-property-duplicate", "two Message Expiry Intervals (3.3.2.3.3)", V5,
             h("30 0e 0001 74 0a 02 0000000a 02 0000000a"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-property-not-allowed", "Session Expiry Interval in PUBLISH", V5,
             h("30 09 0001 74 05 11 0000000a"), (disconnect(MALFORMED),)),
        Case("v5-payload-format-2", "Payload Format Indicator 2 (3.3.2.3.2)", V5,
             h("30 06 0001 74 02 01 02"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-publish-subscription-id", "client PUBLISH with a Subscription Identifier "
             "[MQTT-3.3.4-6]", V5, h("30 06 0001 74 02 0b 01"),
             (disconnect(PROTOCOL_ERROR),)),
        Case("v5-topic-alias-0", "Topic Alias 0 [MQTT-3.3.2-8]", V5,
             h("30 07 0001 74 03 23 0000"), (disconnect(TOPIC_ALIAS_INVALID),)),
        Case("v5-topic-alias-above-max", "Topic Alias 11 > maximum 10 [MQTT-3.3.2-9]", V5,
             h("30 07 0001 74 03 23 000b"), (disconnect(TOPIC_ALIAS_INVALID),)),
        Case("v5-topic-alias-unknown", "empty topic with never-set Topic Alias 5", V5,
             h("30 06 0000 03 23 0005"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscription-id-twice", "two Subscription Identifiers in SUBSCRIBE", V5,
             h("82 0b 0001 04 0b 01 0b 02 0001 74 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscription-id-5-byte-varint", "Subscription Identifier of 5 bytes", V5,
             h("82 0d 0001 06 0b ff ff ff ff 01 0001 74 00"), (disconnect(MALFORMED),)),
        Case("v5-unsubscribe-property-not-allowed", "Subscription Identifier in UNSUBSCRIBE",
             V5, h("a2 08 0001 02 0b 01 0001 74"), (disconnect(MALFORMED),)),
        Case("v5-user-property-bad-utf8", "User Property name 0xFF", V5,
             h("30 0b 0001 74 07 26 0001 ff 0001 61"), (disconnect(MALFORMED),)),
        Case("v5-response-topic-wildcard", "Response Topic r/# [MQTT-3.3.2-14]", V5,
             frame(0x30, utf8("t"), "06 08", utf8("r/#")), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscription-id-0", "SUBSCRIBE with Subscription Identifier 0 (3.8.2.1.2)",
             V5, h("82 09 0001 02 0b 00 0001 74 00"), (disconnect(PROTOCOL_ERROR),)),
        # -- SUBSCRIBE / UNSUBSCRIBE payloads
        Case("v5-subscribe-no-filters", "SUBSCRIBE without a payload [MQTT-3.8.3-2]", V5,
             h("82 03 0001 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-unsubscribe-no-filters", "UNSUBSCRIBE without a payload [MQTT-3.10.3-2]", V5,
             h("a2 03 0001 00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscribe-options-reserved", "options reserved bit 0x40 [MQTT-3.8.3-5]", V5,
             h("82 07 0001 00 0001 74 40"), (disconnect(MALFORMED),)),
        Case("v5-subscribe-retain-handling-3", "Retain Handling 3 (3.8.3.1)", V5,
             h("82 07 0001 00 0001 74 30"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscribe-qos3", "Maximum QoS 3 (3.8.3.1)", V5,
             h("82 07 0001 00 0001 74 03"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-shared-no-local", "No Local on $share/g/t [MQTT-3.8.3-4]", V5,
             frame(0x82, "0001 00", utf8("$share/g/t"), "04"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-subscribe-missing-options", "last topic filter without its options byte",
             V5, h("82 06 0001 00 0001 74"), (disconnect(MALFORMED),)),
        # An ill-formed filter is a malformed packet, not a SUBACK 0x8F (which is for a
        # well-formed filter the server does not allow): [MQTT-4.7.1-1] (5.0).
        Case("v5-subscribe-bad-filter", "topic filter a/#/b [MQTT-4.7.1-1]", V5,
             frame(0x82, "0001 00", utf8("a/#/b"), "00"), (disconnect(MALFORMED),)),
        Case("v5-subscribe-mixed-filters", "ok/t QoS 1 and $share/g+/t [MQTT-4.8.2-2]", V5,
             frame(0x82, "0002 00", utf8("ok/t"), "01", utf8("$share/g+/t"), "00"),
             (disconnect(MALFORMED),)),
        Case("v5-subscribe-empty-share-name", "$share//t [MQTT-4.8.2-1]", V5,
             frame(0x82, "0001 00", utf8("$share//t"), "00"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-unsubscribe-bad-filter", "UNSUBSCRIBE a/+b [MQTT-4.7.1-2]", V5,
             frame(0xA2, "0003 00", utf8("a/+b")), (disconnect(MALFORMED),)),
        # -- illegal, but answered without closing
        Case("v5-pubrel-unknown-id", "PUBREL for a packet id never received -> PUBCOMP 0x92",
             V5, h("62 02 0007"), ((PUBCOMP, 0x92),), closes=False),
        Case("v5-data-after-disconnect", "PINGREQ after DISCONNECT: no PINGRESP", V5,
             h("e0 00 c0 00")),
        # -- flow control and size limits
        Case("v5-receive-maximum-exceeded",
             "3 QoS 2 PUBLISH without PUBREL, receive maximum 2 [MQTT-3.3.4-9]", V5,
             h("34 0b 0006 6261642f726d 0001 00  34 0b 0006 6261642f726d 0002 00"
               "  34 0b 0006 6261642f726d 0003 00"),
             ((PUBREC, NO_MATCHING_SUBSCRIBERS), (PUBREC, NO_MATCHING_SUBSCRIBERS),
              disconnect(RECEIVE_MAXIMUM_EXCEEDED))),
        Case("v5-too-large", "2 KiB PUBLISH above max_packet_size 1024 (header only)", V5,
             h("32 80 10 0001 74 0001 00 787878"), (disconnect(PACKET_TOO_LARGE),)),
        Case("v5-connect-too-large", "2 KiB CONNECT (header and name only) -> CONNACK 0x95",
             V5, h("10 80 10 0004 4d515454 05 02 0000"), (connack(PACKET_TOO_LARGE),),
             handshake=False,
             # Refused from the first 3 bytes, before the protocol level: the version is
             # unknown, so there is no CONNACK to give, only the close.
             expect_trickled=()),
        # -- DISCONNECT
        Case("v5-disconnect-session-expiry",
             "DISCONNECT Session Expiry 60 after CONNECT had 0 (3.14.2.2.2)", V5,
             h("e0 07 00 05 11 0000003c"), (disconnect(PROTOCOL_ERROR),)),
        Case("v5-truncated-eof", "half a PUBLISH, then EOF", V5, h("30 0a 0001 74"),
             half_close=True),
        # -- CONNECT itself
        Case("v5-protocol-name", "protocol name MQTX -> CONNACK 0x01 (3.1.1 form), close",
             V5, frame(0x10, utf8("MQTX"), "05 02 0000 00", cid("v5-name")), (connack(1),),
             handshake=False),
        Case("v5-protocol-level-6", "protocol level 6 -> CONNACK 0x01 [MQTT-3.1.2-2]", V5,
             C(6, "02 0000 00", cid("v5-l6")), (connack(1),), handshake=False),
        Case("v5-connect-reserved-flag", "connect flags reserved bit [MQTT-3.1.2-3]", V5,
             C(5, "03 0000 00", cid("v5-rsv")), (connack(MALFORMED),), handshake=False),
        Case("v5-will-qos3", "will QoS 3 (3.1.2.6)", V5,
             C(5, "1e 0000", wq3_props, cid("v5-wq3"), "00", utf8("w/t"), "0001 78"),
             (connack(MALFORMED),), handshake=False),
        Case("v5-will-retain-no-will", "will retain 1 with will flag 0 [MQTT-3.1.2-13]", V5,
             C(5, "22 0000 00", cid("v5-wr")), (connack(MALFORMED),), handshake=False),
        Case("v5-will-topic-wildcard", "will topic w/# -> CONNACK 0x90", V5,
             C(5, "06 0000 00", cid("v5-wt"), "00", utf8("w/#"), "0001 78"),
             (connack(TOPIC_NAME_INVALID),), handshake=False),
        Case("v5-client-id-bad-utf8", "client identifier C0 AF -> CONNACK 0x81", V5,
             C(5, "02 0000 00", "0002 c0 af"), (connack(MALFORMED),), handshake=False),
        Case("v5-receive-maximum-0", "CONNECT Receive Maximum 0 (3.1.2.11.3)", V5,
             C(5, "02 0000", "03 21 0000", cid("v5-rm0")), (connack(PROTOCOL_ERROR),),
             handshake=False),
        Case("v5-maximum-packet-size-0", "CONNECT Maximum Packet Size 0 (3.1.2.11.4)", V5,
             C(5, "02 0000", "05 27 00000000", cid("v5-mps0")), (connack(PROTOCOL_ERROR),),
             handshake=False),
        Case("v5-request-problem-info-2", "Request Problem Information 2 (3.1.2.11.7)", V5,
             C(5, "02 0000", "02 17 02", cid("v5-rpi")), (connack(PROTOCOL_ERROR),),
             handshake=False),
        Case("v5-auth-data-no-method", "Authentication Data without Method (3.1.2.11.10)",
             V5, C(5, "02 0000", "04 16 0001 00", cid("v5-ad")), (connack(PROTOCOL_ERROR),),
             handshake=False),
        Case("v5-connect-duplicate-property", "two Session Expiry Intervals in CONNECT", V5,
             C(5, "02 0000", "0a 11 0000000a 11 0000000a", cid("v5-dup")),
             (connack(PROTOCOL_ERROR),), handshake=False),
        Case("v5-connect-property-not-allowed", "Topic Alias in CONNECT", V5,
             C(5, "02 0000", "03 23 0001", cid("v5-ta")), (connack(MALFORMED),),
             handshake=False),
        Case("v5-will-property-not-allowed", "Topic Alias in the will properties", V5,
             C(5, "06 0000 00", cid("v5-wta"), "03 23 0001", utf8("w/t"), "0001 78"),
             (connack(MALFORMED),), handshake=False),
        Case("v5-will-response-topic-wildcard", "will Response Topic r/+ [MQTT-3.3.2-14]",
             V5, C(5, "06 0000 00", cid("v5-wrt"), "06 08", utf8("r/+"), utf8("w/t"),
                   "0001 78"), (connack(PROTOCOL_ERROR),), handshake=False),
        Case("v5-auth-method-unsupported", "Authentication Method SCRAM -> CONNACK 0x8C", V5,
             C(5, "02 0000", "08 15", utf8("SCRAM"), cid("v5-am")), (connack(0x8C),),
             handshake=False),
    ]


def _pre_connect_cases() -> list[Case]:
    # Before a CONNECT the version is unknown: there is no CONNACK to give, only a close.
    return [
        Case("pre-publish", "PUBLISH before CONNECT [MQTT-3.1.0-1]", PRE, h("30 03 0001 74"),
             handshake=False),
        Case("pre-subscribe", "SUBSCRIBE before CONNECT [MQTT-3.1.0-1]", PRE,
             h("82 06 0001 0001 74 00"), handshake=False),
        Case("pre-pingreq", "PINGREQ before CONNECT [MQTT-3.1.0-1]", PRE, h("c0 00"),
             handshake=False),
        Case("pre-connack", "CONNACK as the first packet", PRE, h("20 02 00 00"),
             handshake=False),
        Case("pre-type-0", "packet type 0 as the first packet", PRE, h("00 00"),
             handshake=False),
        Case("pre-http", "an HTTP request instead of MQTT", PRE,
             b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", handshake=False),
        Case("pre-truncated-connect", "half a CONNECT, then EOF", PRE, h("10 10 0004 4d51"),
             handshake=False, half_close=True),
    ]


CASES = _v4_cases() + _v5_cases() + _pre_connect_cases()


# --------------------------------------------------------------------------- environment


class ErrorLogGuard(logging.Handler):
    """Collects ERROR records of the broker's loggers, emitted on the threads of the brokers
    under test (so a stray record from another test module's leftovers, say an unretrieved
    future collected by the garbage collector, is not blamed on these brokers)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.threads: set[int] = set()

    def watch(self, broker: BrokerThread) -> None:
        self.threads.add(broker.call(threading.get_ident))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread in self.threads:
            self.records.append(record)

    def take(self) -> list[str]:
        records, self.records = self.records, []
        return [f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in records]


class Watchers:
    """The well-behaved pair: a 5.0 subscriber on WATCH_TOPIC and a 3.1.1 QoS 1 publisher."""

    def __init__(self, broker: BrokerThread) -> None:
        self.broker = broker
        self.sub = RawClient(broker.port, V5)
        self.sub.handshake(WATCH_SUB_ID)
        self.sub.send(subscribe(V5, 1, WATCH_TOPIC, 0))
        suback = self.sub.read()
        assert suback is not None and reason(suback, V5) == (0,)
        self.pub = RawClient(broker.port, V4)
        self.pub.handshake(WATCH_PUB_ID)
        self.broker_thread_id: int = broker.call(threading.get_ident)
        self.packet_id = 0
        self.count = 0

    def round_trip(self, tag: str) -> None:
        self.packet_id = self.packet_id % 65535 + 1
        self.count += 1
        payload = f"{self.count}:{tag}".encode()
        self.pub.send(publish(V4, WATCH_TOPIC, payload, qos=1, packet_id=self.packet_id))
        puback = self.pub.read()
        assert puback is not None and puback.type == PUBACK, f"publisher lost: {puback}"
        assert int.from_bytes(puback.body[:2], "big") == self.packet_id
        got = self.sub.read()
        assert got is not None and got.type == PUBLISH, f"subscriber lost: {got}"
        assert publish_fields(got, V5)[:2] == (WATCH_TOPIC, payload)

    def wait_only_watchers(self, timeout: float = 5.0, *, sessions: bool = True) -> None:
        """The broker is back to the two watcher connections and sessions: the bad
        connection was cleaned up (handler, client registry, session)."""
        app = self.broker.app
        assert app is not None
        expected = {WATCH_SUB_ID, WATCH_PUB_ID}
        deadline = time.monotonic() + timeout
        while True:
            state = self.broker.call(lambda: (
                len(app.connections), set(app.clients),
                set(app.core.sessions) if sessions else expected))
            if state == (2, expected, expected):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"broker state after the case: connections, clients, "
                                     f"sessions = {state}")
            time.sleep(0.01)


@pytest.fixture(scope="module")
def error_log() -> Iterator[ErrorLogGuard]:
    guard = ErrorLogGuard()
    loggers = [logging.getLogger("edge_broker"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(guard)
    yield guard
    for logger in loggers:
        logger.removeHandler(guard)


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory,
                  error_log: ErrorLogGuard) -> Iterator[BrokerThread]:
    tmp: Path = tmp_path_factory.mktemp("malformed")
    broker = BrokerThread(broker_config(tmp, max_packet_size=MAX_PACKET_SIZE,
                                        receive_maximum=RECEIVE_MAXIMUM,
                                        topic_alias_maximum=TOPIC_ALIAS_MAXIMUM)).start()
    error_log.watch(broker)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def watchers(module_broker: BrokerThread) -> Iterator[Watchers]:
    pair = Watchers(module_broker)
    pair.round_trip("start")
    yield pair
    pair.sub.close()
    pair.pub.close()


@pytest.fixture(autouse=True)
def _no_error_logs(error_log: ErrorLogGuard) -> Iterator[None]:
    error_log.take()
    yield
    errors = error_log.take()
    assert not errors, "the broker logged at ERROR level:\n" + "\n".join(errors)


# --------------------------------------------------------------------------- the table


def _read_n(client: RawClient, count: int) -> list[Frame]:
    frames = [client.read() for _ in range(count)]
    assert None not in frames, f"connection closed early: {frames}"
    return [f for f in frames if f is not None]


def _describe(frames: list[Frame], version: int) -> list[tuple[str, object]]:
    return [(f.name, reason(f, version)) for f in frames]


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60


# The same rows once more with the bad bytes in the same write as the CONNECT: they are then
# decoded before the CONNACK is sent (3.1.4 (5.0) lets a client pipeline), and the answer
# must be the same, after a CONNACK 0.
PIPELINED = [case for case in CASES if case.handshake]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed(case: Case, watchers: Watchers) -> None:
    run_case(case, watchers, pipelined=False)


@pytest.mark.parametrize("case", PIPELINED, ids=[f"{case.id}-pipelined" for case in PIPELINED])
def test_malformed_pipelined_after_connect(case: Case, watchers: Watchers) -> None:
    run_case(case, watchers, pipelined=True)


# And once more one byte per write: the decision must not depend on how the bytes arrive
# (habit 8), e.g. a too-large packet is refused as soon as its Remaining Length is complete.
@pytest.mark.parametrize("case", CASES, ids=[f"{case.id}-trickled" for case in CASES])
def test_malformed_one_byte_at_a_time(case: Case, watchers: Watchers) -> None:
    run_case(case, watchers, trickle=True)


def run_case(case: Case, watchers: Watchers, *, pipelined: bool = False,
             trickle: bool = False) -> None:
    watchers.round_trip(f"{case.id}:before")
    version = case.version or V5
    client = RawClient(watchers.broker.port, version)
    try:
        if pipelined:
            client.send(connect(version, f"bad-{case.id}") + case.data)
            first = client.read()
            assert first is not None and (first.type, reason(first, version)) == (CONNACK, 0)
        else:
            if case.handshake:
                client.handshake(f"bad-{case.id}")
            if trickle:
                client.send_slowly(case.data)
            else:
                client.send(case.data)
        if case.half_close:
            client.shutdown_write()
        frames = client.read_until_closed() if case.closes else _read_n(client, len(case.expect))
        expect = case.expect
        if trickle and case.expect_trickled is not None:
            expect = case.expect_trickled
        got = [(f.type, reason(f, version)) for f in frames]
        assert got == list(expect), (
            f"{case.description}: got {_describe(frames, version)}")
        if not case.closes:
            # Still a working connection: PINGREQ answered, then a clean DISCONNECT.
            client.send(h("c0 00"))
            pong = client.read()
            assert pong is not None and pong.type == PINGRESP
            client.send(h("e0 00"))
            assert client.read_until_closed() == []
    finally:
        client.close()
    watchers.wait_only_watchers()
    watchers.round_trip(f"{case.id}:after")


def test_bad_disconnect_publishes_the_will(watchers: Watchers) -> None:
    """A DISCONNECT that breaks a rule is not a normal DISCONNECT (3.14.2.2.2 (5.0)): the
    connection ends with 0x82 and the will is published to the watcher."""
    watchers.round_trip("will:before")
    client = RawClient(watchers.broker.port, V5)
    client.send(C(5, "06 0000 00", cid("will"), "00", utf8(WATCH_TOPIC), "0004 77696c6c"))
    connack_frame = client.read()
    assert connack_frame is not None and reason(connack_frame, V5) == 0
    client.send(h("e0 07 00 05 11 0000003c"))
    frames = client.read_until_closed()
    assert _describe(frames, V5) == [("DISCONNECT", PROTOCOL_ERROR)]
    client.close()
    will = watchers.sub.read()
    assert will is not None and publish_fields(will, V5)[:2] == (WATCH_TOPIC, b"will")
    watchers.wait_only_watchers()
    watchers.round_trip("will:after")


@pytest.mark.parametrize("version", [V4, V5])
def test_connect_publish_disconnect_in_one_write(version: int, watchers: Watchers) -> None:
    """Legal, and what a fire-and-forget device does: the answers to the CONNECT and the QoS 1
    PUBLISH are still sent although the DISCONNECT arrived before they could be (they wait
    for the commit): [MQTT-3.2.0-1] (3.1.1) / [MQTT-3.1.4-5] (5.0), then the close."""
    client = RawClient(watchers.broker.port, version)
    frames = _send_and_end(client, connect(version, f"bad-fire-{version}")
                           + publish(version, WATCH_TOPIC, b"fire", qos=1, packet_id=9)
                           + h("e0 00"))
    assert _describe(frames, version) == [("CONNACK", 0), ("PUBACK", 0)]
    assert int.from_bytes(frames[1].body[:2], "big") == 9
    got = watchers.sub.read()
    assert got is not None and publish_fields(got, V5)[:2] == (WATCH_TOPIC, b"fire")
    watchers.wait_only_watchers()
    watchers.round_trip("fire:after")


def test_error_fits_the_clients_maximum_packet_size(watchers: Watchers) -> None:
    """The DISCONNECT's Reason String is left out when the DISCONNECT would exceed the
    client's Maximum Packet Size (3.1.2.11.4 / [MQTT-3.1.2-25] (5.0))."""
    client = RawClient(watchers.broker.port, V5)
    client.send(C(5, "02 0000", "05 27 00000018", cid("small-mps")))  # 24 bytes
    first = client.read()
    assert first is not None and reason(first, V5) == 0
    assert 2 + len(first.body) <= 24
    client.send(h("00 00"))
    frames = client.read_until_closed()
    assert _describe(frames, V5) == [("DISCONNECT", MALFORMED)]
    assert 2 + len(frames[0].body) <= 24
    client.close()
    watchers.wait_only_watchers()
    watchers.round_trip("small-mps:after")


def test_oversized_publish_is_refused_from_its_header(watchers: Watchers) -> None:
    """Only the 3-byte fixed header of a 2 KiB PUBLISH is sent: the answer cannot have
    waited for the body."""
    client = RawClient(watchers.broker.port, V5)
    client.handshake("bad-header-only")
    client.send(h("30 80 10"))
    assert _describe(client.read_until_closed(), V5) == [("DISCONNECT", PACKET_TOO_LARGE)]
    client.close()
    watchers.wait_only_watchers()
    watchers.round_trip("header-only:after")


# --------------------------------------------------------------------------- fuzzing

SERVER_TO_CLIENT = {CONNACK, PUBLISH, PUBACK, PUBREC, 6, 7, SUBACK, UNSUBACK, PINGRESP,
                    DISCONNECT}


def _check_fuzz_answer(frames: list[Frame], version: int) -> None:
    for index, frame_ in enumerate(frames):
        assert frame_.type in SERVER_TO_CLIENT, frames
        if frame_.type == DISCONNECT:
            assert version == V5, f"a DISCONNECT to a 3.1.1 client: {frames}"
            assert index == len(frames) - 1, f"packets after DISCONNECT: {frames}"
            code = reason(frame_, version)
            assert isinstance(code, int) and code >= 0x80, frames


FUZZ_EXAMPLES = int(os.environ.get("EDGE_BROKER_FUZZ_EXAMPLES", "50"))
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


def _no_error_records(caplog: pytest.LogCaptureFixture, watchers: Watchers) -> None:
    errors = [r for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.startswith(("edge_broker", "asyncio"))
              and r.thread == watchers.broker_thread_id]
    assert not errors, [f"{r.name}: {r.getMessage()} {r.exc_text}" for r in errors]


def _send_and_end(client: RawClient, data: bytes) -> list[Frame]:
    """Send, end our side (an incomplete packet must be cleaned up at EOF too), read all."""
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send(data)  # the broker may close before it has read everything
        client.shutdown_write()
        return client.read_until_closed()
    finally:
        client.close()


@fuzz_settings
@given(garbage=st.binary(min_size=1, max_size=300), version=st.sampled_from([V4, V5]),
       pipelined=st.booleans())
def test_fuzz_after_connect(garbage: bytes, version: int, pipelined: bool, watchers: Watchers,
                            caplog: pytest.LogCaptureFixture) -> None:
    client = RawClient(watchers.broker.port, version)
    if pipelined:
        frames = _send_and_end(client, connect(version, "fuzz") + garbage)
        assert frames and (frames[0].type, reason(frames[0], version)) == (CONNACK, 0), frames
        frames = frames[1:]
    else:
        client.handshake("fuzz")
        frames = _send_and_end(client, garbage)
    _check_fuzz_answer(frames, version)
    watchers.wait_only_watchers()
    watchers.round_trip("fuzz-after-connect")
    _no_error_records(caplog, watchers)


@fuzz_settings
@given(garbage=st.binary(min_size=1, max_size=300))
def test_fuzz_first_bytes(garbage: bytes, watchers: Watchers,
                          caplog: pytest.LogCaptureFixture) -> None:
    frames = _send_and_end(RawClient(watchers.broker.port, V5), garbage)
    # The version is unknown: a CONNACK may come in either form, nothing else but a close
    # (unless the bytes happen to start with a valid CONNECT).
    if frames and frames[0].type == CONNACK:
        frames = frames[1:]
    assert all(f.type in SERVER_TO_CLIENT for f in frames), frames
    watchers.wait_only_watchers()
    watchers.round_trip("fuzz-first-bytes")
    _no_error_records(caplog, watchers)


# Valid packets to mutate: random bytes rarely get past the fixed header, these reach the
# decoders of every field. (version, bytes sent after CONNECT)
SEEDS: list[tuple[int, bytes]] = [
    (V5, frame(0x33, utf8("fz/a"), "0007",
               "16 02 0000003c 03", utf8("text"), "23 0001 26", utf8("k"), utf8("v"), "7061")),
    (V5, frame(0x34, utf8("fz/b"), "0008", "00", "7061796c6f6164")),
    (V5, frame(0x82, "0009", "02 0b 05", utf8("fz/+"), "15", utf8("$share/g/fz/#"), "01")),
    (V5, frame(0xA2, "000a 00", utf8("fz/+"), utf8("fz/x"))),
    (V5, frame(0x62, "0007 92", "05 1f", utf8("no"))),
    (V5, frame(0xE0, "04 08 1f", utf8("bye!!"))),
    (V5, frame(0x30, utf8("fz/c"), "10 08", utf8("fz/reply"), "09 0002 abcd", "6869")),
    (V4, frame(0x32, utf8("fz/d"), "0003", "7061796c6f6164")),
    (V4, frame(0x82, "0004", utf8("fz/#"), "01", utf8("fz/+/x"), "02")),
    (V4, frame(0xA2, "0005", utf8("fz/#"))),
    (V4, frame(0x62, "0006")),
]
CONNECT_SEEDS: list[bytes] = [
    C(5, "ee 003c", "10 11 0000000a 21 0010 27 00000800 22 0005", cid("fz5"),
      "05 18 00000001", utf8("fz/will"), "0002 6f6b", utf8("user"), "0002 7077"),
    C(4, "f6 003c", cid("fz4"), utf8("fz/will"), "0002 6f6b", utf8("user"), "0002 7077"),
]

_mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                      max_size=4)


def _mutate(data: bytes, mutations: list[tuple[int, int]], cut: int | None) -> bytes:
    mutated = bytearray(data)
    for position, value in mutations:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut])


@fuzz_settings
@given(seed=st.sampled_from(SEEDS), mutations=_mutations,
       cut=st.none() | st.integers(1, 60))
def test_fuzz_mutated_packets(seed: tuple[int, bytes], mutations: list[tuple[int, int]],
                              cut: int | None, watchers: Watchers,
                              caplog: pytest.LogCaptureFixture) -> None:
    version, data = seed
    client = RawClient(watchers.broker.port, version)
    client.handshake("fuzz")
    _check_fuzz_answer(_send_and_end(client, _mutate(data, mutations, cut)), version)
    watchers.wait_only_watchers()
    watchers.round_trip("fuzz-mutated")
    _no_error_records(caplog, watchers)


@fuzz_settings
@given(seed=st.sampled_from(CONNECT_SEEDS), mutations=_mutations,
       cut=st.none() | st.integers(1, 60))
def test_fuzz_mutated_connect(seed: bytes, mutations: list[tuple[int, int]], cut: int | None,
                              watchers: Watchers, caplog: pytest.LogCaptureFixture) -> None:
    frames = _send_and_end(RawClient(watchers.broker.port, V5), _mutate(seed, mutations, cut))
    assert all(f.type in SERVER_TO_CLIENT for f in frames), frames
    # A mutation may make a valid persistent session (clean start 0): only the connection
    # must be gone.
    watchers.wait_only_watchers(sessions=False)
    watchers.round_trip("fuzz-mutated-connect")
    _no_error_records(caplog, watchers)


# --------------------------------------------------------------------------- acks and commits


class GatedStore(MemoryStore):
    """A store whose commits complete only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.pending: list[asyncio.Future[None]] = []

    def apply(self, changes: Sequence[Change]) -> Awaitable[None]:
        super().apply(changes)
        if not self.hold and not self.pending:
            return DONE
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(future)  # resolves with every earlier batch, as `apply` promises
        return future

    def release(self) -> None:
        self.hold = False
        for future in self.pending:
            if not future.done():
                future.set_result(None)
        self.pending.clear()


def _read_for(client: RawClient, seconds: float) -> list[Frame]:
    """Whatever arrives within `seconds` (the connection may close meanwhile)."""
    deadline = time.monotonic() + seconds
    while not client.eof and client._fill(deadline):
        pass
    frames, client.frames = client.frames, []
    return frames


def test_no_puback_before_commit_when_a_bad_packet_follows(
        make_broker: Callable[..., BrokerThread], error_log: ErrorLogGuard) -> None:
    """Principle 4: a PUBACK leaves only after the commit of what it acknowledges, also when
    the packet after the PUBLISH (in the same read) is malformed and closes the connection."""
    store = GatedStore()
    broker = make_broker(store=store)
    error_log.watch(broker)
    sub = RawClient(broker.port, V5)
    sub.send(C(5, "02 0000", "05 11 0000012c", cid("dur-sub")))  # session expiry 300 s
    first = sub.read()
    assert first is not None and reason(first, V5) == 0
    sub.send(subscribe(V5, 1, "dur/t", 1))
    suback = sub.read()
    assert suback is not None and reason(suback, V5) == (1,)
    pub = RawClient(broker.port, V5)
    pub.handshake("bad-dur-pub")

    # The control: a lone QoS 1 PUBLISH is acknowledged only once the gate opens.
    broker.call(lambda: setattr(store, "hold", True))
    pub.send(publish(V5, "dur/t", b"one", qos=1, packet_id=1))
    assert _read_for(pub, 0.3) == []
    broker.call(store.release)
    puback = pub.read()
    assert puback is not None and puback.type == PUBACK
    delivery = sub.read()
    assert delivery is not None and publish_fields(delivery, V5)[1] == b"one"
    delivery_id = publish_fields(delivery, V5)[3]
    assert delivery_id is not None
    sub.send(frame(0x40, delivery_id.to_bytes(2, "big")))  # PUBACK

    # The case: PUBLISH + a packet of type 0 in one write, while the commit is pending.
    broker.call(lambda: setattr(store, "hold", True))
    pub.send(publish(V5, "dur/t", b"two", qos=1, packet_id=2) + h("00 00"))
    early = _read_for(pub, 0.3)
    assert PUBACK not in [f.type for f in early], (
        f"PUBACK sent before the commit: {_describe(early, V5)}")
    assert _read_for(sub, 0.1) == [], "delivered before the commit"
    broker.call(store.release)
    rest = early + pub.read_until_closed()
    assert [f.type for f in rest][-1:] == [DISCONNECT]
    assert reason(rest[-1], V5) == MALFORMED
    delivery = sub.read()
    assert delivery is not None and publish_fields(delivery, V5)[1] == b"two"
    pub.close()
    sub.close()
