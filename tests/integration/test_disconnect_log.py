"""The log tells how a connection ended, as mosquitto's does ("Client x disconnected." for a
DISCONNECT, "Client x closed its connection." without one), and whether the will goes out.
An operator reading why a device's will fired needs that line. Before, every end was
"client x disconnected"."""

from __future__ import annotations

import logging
import time

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import RawWill, connect, props, unique_id


def line_for(caplog: pytest.LogCaptureFixture, client_id: str) -> str:
    deadline = time.monotonic() + 5
    while True:
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith(f"client {client_id}")
                 and "disconnect" in r.getMessage().lower()]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, f"no line for {client_id}"
        time.sleep(0.02)  # polling interval, bounded by the deadline


def test_the_log_tells_a_disconnect_from_a_lost_connection_and_names_the_will(
        broker: BrokerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_broker")
    will = RawWill("status/dev", b"offline")
    delayed = RawWill("status/dev", b"offline", properties=props(will_delay_interval=30))

    clean = unique_id("clean")
    connect(broker.port, clean, will=will).disconnect()
    assert line_for(caplog, clean) == f"client {clean} disconnected"

    lost = unique_id("lost")
    connect(broker.port, lost, will=will).close()
    assert line_for(caplog, lost) == (f"client {lost}: connection closed without DISCONNECT; "
                                      "its will is published")

    quiet = unique_id("quiet")
    connect(broker.port, quiet).close()
    assert line_for(caplog, quiet) == f"client {quiet}: connection closed without DISCONNECT"

    asked = unique_id("asked")
    connect(broker.port, asked, version=5, will=delayed,
            properties=props(session_expiry_interval=60)).disconnect(0x04)
    assert line_for(caplog, asked) == (f"client {asked} disconnected with reason 0x04; its "
                                       "will goes out within 30 s unless it reconnects")
