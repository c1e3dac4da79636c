"""Which upstream address an MQTT bridge tries first, and how often it checks the first one
(bridge/mqtt_servers.py). The moves themselves, against real servers:
test_gateway_mqtt_servers.py."""

from __future__ import annotations

import socket

import pytest

from edge_broker.bridge.mqtt_servers import ServerChoice, answers

SERVERS = ("mqtt://a:1", "mqtt://b:1", "mqtt://c:1")


def test_without_round_robin_every_attempt_starts_at_the_first_address() -> None:
    choice = ServerChoice(SERVERS, round_robin=False, primary_retry_s=5)
    assert choice.order() == [0, 1, 2]
    choice.connected(2)
    assert choice.checks_first
    assert choice.order() == [0, 1, 2]
    choice.connected(0)
    assert not choice.checks_first


def test_round_robin_starts_after_the_last_address_and_never_checks_the_first() -> None:
    choice = ServerChoice(SERVERS, round_robin=True, primary_retry_s=5)
    assert choice.order() == [0, 1, 2]
    choice.connected(1)
    assert choice.order() == [2, 0, 1]
    assert not choice.checks_first
    choice.connected(2)
    assert choice.order() == [0, 1, 2]


def test_a_first_address_that_keeps_refusing_the_bridge_is_checked_less_often() -> None:
    # It takes TCP connections (the check passes) but the bridge ends up on a backup again
    # after each move: the interval doubles up to 64 x primary_retry, and a connection to
    # the first sets it back.
    choice = ServerChoice(SERVERS, round_robin=False, primary_retry_s=5)
    choice.connected(1)
    seen = []
    for _ in range(8):
        choice.moving_back = True
        choice.connected(1)
        seen.append(choice.interval)
    assert seen == [10, 20, 40, 80, 160, 320, 320, 320]
    choice.connected(1)  # lost and back on a backup, no move: unchanged
    assert choice.interval == 320
    choice.moving_back = True
    choice.connected(0)
    assert choice.interval == 5


@pytest.mark.asyncio
async def test_the_check_is_a_tcp_connect() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert await answers("127.0.0.1", port, 2.0)
    assert not await answers("127.0.0.1", port, 2.0)  # closed: refused
