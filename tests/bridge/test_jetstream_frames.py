"""The uplink's own HPUB encoding (bridge/jetstream_frames.py) is byte for byte what nats-py
would send for the same publish, for every kind of message the log hands to a bridge."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from nats.aio.client import Client

from edge_broker.bridge.base import NATS_MSG_ID, BridgeMessage, format_time, message_id
from edge_broker.bridge.jetstream_frames import FrameBuilder
from edge_broker.bridge.topic_map import topic_to_subject

STORE_ID = "5eed0000000000a1"
PREFIX = "site1.gw7"


def nats_py_bytes(subject: str, reply: str, message: BridgeMessage, gateway: str) -> bytes:
    """What nats-py's publish hands to its connection (captured, no server needed)."""
    client = Client()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    headers = message.headers(message_id(gateway, STORE_ID, message.offset), NATS_MSG_ID)
    asyncio.run(client._send_publish(subject, reply, message.payload, len(message.payload),
                                     headers))
    (command,) = sent
    return command


MESSAGES = [
    BridgeMessage(offset=1, topic="sensors/t1", payload=b"21.5", qos=1,
                  publish_time=1_765_000_000.0, client_id="dev1"),
    BridgeMessage(offset=2, topic="sensors/t1", payload=b"", qos=0,
                  publish_time=1_765_000_000.0004, client_id=""),
    BridgeMessage(offset=987654321, topic=" room 1/temp\u00e9rature\n", payload=b"\r\n\x00",
                  qos=2, retain=True, publish_time=1_765_000_001.9996, client_id="dev 1",
                  content_type="application/json; charset=utf-8", payload_utf8=True,
                  user_properties=(("a", "1"), ("a", " 2\r\n"), ("\u00e9", ""),
                                   ('"q"', "\\"))),
    BridgeMessage(offset=4, topic="/a//b/", payload=b"x" * 5000, qos=1,
                  publish_time=1_765_000_002.5, client_id="dev1", payload_utf8=True),
    BridgeMessage(offset=5, topic="a.b/*/>", payload=b"y", qos=1,
                  publish_time=1_765_000_002.5, client_id="dev1",
                  user_properties=(("k", "v"),)),
]


@pytest.mark.parametrize("gateway", ["gw7", "gw-7.site_x"])
def test_frames_are_what_nats_py_would_send(gateway: str) -> None:
    builder = FrameBuilder(gateway, STORE_ID, lambda m: topic_to_subject(PREFIX, m.topic))
    for round_ in range(2):  # the second round comes from the caches
        for n, message in enumerate(MESSAGES):
            reply = f"_INBOX.abc.{round_ * 100 + n}"
            subject = topic_to_subject(PREFIX, message.topic)
            assert builder.frame(message, reply) == nats_py_bytes(subject, reply, message,
                                                                  gateway), message


def test_a_gateway_id_with_whitespace_is_not_framed_here() -> None:
    with pytest.raises(ValueError):
        FrameBuilder("gw 7", STORE_ID, lambda m: m.topic)
    with pytest.raises(ValueError):
        FrameBuilder("gw7", "not-an-id", lambda m: m.topic)


def test_the_id_is_sent_once_as_nats_msg_id_first() -> None:
    """JetStream keeps the id in `Nats-Msg-Id` only (docs/bridges.md "Headers"): the
    `edge-message-id` that repeated it was 44 of the ~365 bytes stored per message."""
    builder = FrameBuilder("gw7", STORE_ID, lambda m: topic_to_subject(PREFIX, m.topic))
    frame = builder.frame(MESSAGES[0], "_INBOX.abc.1")
    head, _, rest = frame.partition(b"\r\n")
    block = rest[:int(head.split()[-2])]
    assert block == (b"NATS/1.0\r\nNats-Msg-Id: gw7-5eed0000000000a1-1\r\n"
                     b"mqtt-topic: sensors/t1\r\nmqtt-qos: 1\r\nmqtt-client-id: dev1\r\n"
                     b"mqtt-publish-time: 2025-12-06T05:46:40.000Z\r\n\r\n")
    assert b"edge-message-id" not in frame


def test_the_publish_time_follows_every_message() -> None:
    """The time is formatted again only when it changes: each message still gets its own,
    also around millisecond and second boundaries and back in time."""
    builder = FrameBuilder("gw7", STORE_ID, lambda m: m.topic)
    base = 1_765_000_000.0
    times = [base + step for step in (0.0, 0.0001, 0.0004996, 0.0009994, 0.0009996, 0.001,
                                      0.9994, 0.99949, 0.9995, 0.9999996, 1.0, 0.5, 0.5,
                                      -0.0000004, 2.123456)]
    for offset, at in enumerate(times, 1):
        message = BridgeMessage(offset=offset, topic="t", payload=b"", qos=0,
                                publish_time=at)
        frame = builder.frame(message, "r")
        assert f"mqtt-publish-time: {format_time(at)}\r\n".encode() in frame, at
