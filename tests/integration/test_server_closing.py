"""How the server ends a connection it refuses (issue 7, items 7 and 10).

- A reply that cannot be encoded (an MQTT 5 client announced a Maximum Packet Size smaller
  than the CONNACK) closes that connection quietly: no traceback, no "Fatal error on
  transport" in the log, and other clients are served.
- After the broker sends a DISCONNECT with a reason code (or a refusing CONNACK), a client
  that is still writing must be able to read it: the broker half-closes and discards input
  for a short linger instead of closing with unread input (which sends a TCP reset that makes
  the client's kernel drop the reason code).
"""

from __future__ import annotations

import logging
import socket

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    CONNACK,
    DISCONNECT,
    PINGREQ_BYTES,
    RawClient,
    connect,
    connect_packet,
    props,
)

BAD_PUBLISH = b"\x36\x03\x00\x01a"  # QoS 3: malformed [MQTT-3.3.1-4] (3.1.1, 5.0)


def test_a_reply_that_cannot_be_encoded_closes_quietly(
        broker: BrokerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = RawClient(broker.port, 5)
    client.send(connect_packet("tiny", version=5, properties=props(maximum_packet_size=5))
                + BAD_PUBLISH)
    assert client.is_closed(5.0)
    client.close()
    control = connect(broker.port, "control", version=5)
    control.ping()
    control.disconnect()
    problems = [record for record in caplog.records
                if record.levelno >= logging.WARNING or record.exc_info]
    assert not problems, [record.getMessage() for record in problems]
    assert any("tiny" in record.getMessage() or "cannot" in record.getMessage()
               for record in caplog.records if record.name.startswith("edge_broker"))


def keep_writing_after_the_reply(client: RawClient) -> None:
    """Wait until the broker's reply has arrived (unread), then write as a busy client does:
    every write must succeed, the broker is lingering, not resetting the connection."""
    client.sock.settimeout(5.0)
    assert client.sock.recv(1, socket.MSG_PEEK), "no reply from the broker"
    chunk = PINGREQ_BYTES * 512
    for _ in range(4000):  # 4 MB, far more than the broker's socket buffers hold
        client.sock.sendall(chunk)  # raises on a reset connection


def test_v5_client_still_writing_reads_the_disconnect_reason(broker: BrokerThread) -> None:
    client = connect(broker.port, "writer", version=5)
    client.send(BAD_PUBLISH)
    keep_writing_after_the_reply(client)
    disconnect = client.expect(DISCONNECT)
    assert disconnect.reason_code == 0x81  # Malformed Packet
    assert client.is_closed(5.0)
    client.close()


def test_v311_client_still_writing_reads_the_refusing_connack(broker: BrokerThread) -> None:
    client = RawClient(broker.port, 4)
    # An empty client id without clean session: CONNACK 0x02 [MQTT-3.1.3-8] (3.1.1).
    client.send(connect_packet("", version=4, clean=False))
    keep_writing_after_the_reply(client)
    assert client.expect_raw(CONNACK) == b"\x20\x02\x00\x02"
    assert client.is_closed(5.0)
    client.close()
