"""The uplink's own HPUB encoding (bridge/jetstream_frames.py) is byte for byte what nats-py
would send for the same publish, for every kind of message the log hands to a bridge."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from nats.aio.client import Client

from edge_broker.bridge.base import NATS_MSG_ID, BridgeMessage, message_id
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
    mid = message_id(gateway, STORE_ID, message.offset)
    headers = message.headers(mid)
    headers[NATS_MSG_ID] = mid
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
