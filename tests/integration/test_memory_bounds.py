"""A broker-wide bound on bytes buffered for unfinished packets (issue 7, item 6).

Each connection may send packets up to max_packet_size, but many connections each parking an
unfinished large PUBLISH would otherwise hold that much each. `[mqtt] max_incomplete_bytes`
bounds the total: beyond it the connections holding the most are closed, MQTT 5 ones with
DISCONNECT 0x97 Quota exceeded (3.14.2.1 (5.0)); everyone else is still served.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.conftest import BrokerThread
from tests.integration.rawclient import (
    DISCONNECT,
    NO_PROPS,
    RawClient,
    connect,
    utf8,
    varint,
)

LIMIT = 1024 * 1024
ANNOUNCED = 900_000  # each client announces a PUBLISH this long...
SENT = 300_000  # ...and sends only this much of it
CLIENTS = 8
QUOTA_EXCEEDED = 0x97


def unfinished_publish() -> bytes:
    return b"\x30" + varint(ANNOUNCED) + utf8("big") + NO_PROPS + b"x" * SENT


def closed_or_disconnected(client: RawClient, reasons: list[int]) -> bool:
    """Whether the broker closed `client` (recording a DISCONNECT's reason code)."""
    try:
        packet = client.read(0.05)
    except EOFError:
        return True
    if packet is not None:
        assert packet.packet_type == DISCONNECT, packet
        reasons.append(packet.reason_code)
        return client.is_closed(5.0)
    return False


def test_unfinished_packets_beyond_the_bound_close_the_largest_holders(
        make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(max_incomplete_bytes=LIMIT)
    clients = [connect(broker.port, f"big-{i}", version=5) for i in range(CLIENTS)]
    for client in clients:
        client.send(unfinished_publish())
    must_close = CLIENTS - LIMIT // SENT  # 3 fit under the bound
    closed: set[int] = set()
    reasons: list[int] = []
    deadline = time.monotonic() + 15.0
    while len(closed) < must_close:
        assert time.monotonic() < deadline, f"only {len(closed)} closed: {reasons}"
        for i, client in enumerate(clients):
            if i not in closed and closed_or_disconnected(client, reasons):
                closed.add(i)
    assert reasons and all(code == QUOTA_EXCEEDED for code in reasons), reasons
    assert broker.call(lambda: broker.app.incomplete_bytes) <= LIMIT
    # The others keep their connection (and the half-sent packet).
    for i, client in enumerate(clients):
        if i not in closed:
            client.expect_nothing()
    # Everyone else is served.
    control = connect(broker.port, "control", version=5)
    control.ping()
    control.disconnect()
    for client in clients:
        client.close()


def test_bytes_are_released_when_packets_complete_or_connections_close(
        make_broker: Callable[..., BrokerThread]) -> None:
    broker = make_broker(max_incomplete_bytes=LIMIT)
    client = connect(broker.port, "one", version=5)
    client.send(unfinished_publish())
    client.send(b"x" * (ANNOUNCED - SENT - len(utf8("big")) - 1))  # the rest of it
    client.ping()
    assert broker.call(lambda: broker.app.incomplete_bytes) == 0
    other = connect(broker.port, "two", version=5)
    other.send(unfinished_publish())
    other.close()
    deadline = time.monotonic() + 10.0
    while broker.call(lambda: broker.app.incomplete_bytes) != 0:
        assert time.monotonic() < deadline, "bytes of a closed connection still counted"
        time.sleep(0.02)  # polling interval, bounded by the deadline
    client.disconnect()
