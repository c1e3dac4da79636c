"""A `max_backlog_bytes` drop that skips a message the uplink has in flight (sent, stored by
the remote side, its acknowledgement not back yet): acknowledged later, it counts as
forwarded and not also as dropped; given up instead (the connection is lost: it is not sent
again, the stored cursor being past it), it counts as dropped, once (server/bridge_drops.py,
server/bridge_log.py `skipped`).

Before the fix a drop counted every row it skipped as dropped at once, so a message in
flight that was then acknowledged counted in both, and forwarded + dropped exceeded what was
published. Both uplinks: in the broker, and in a process of its own. A TCP proxy between the
bridge and a real nats-server holds what the server sends back (its acknowledgements) while
the device publishes past the bound.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from edge_broker.bridge.config import parse_bridges
from tests.bridge.gateway import ThreadedProxy, stream_count, wait_until
from tests.bridge.servers import HOST, NatsServer
from tests.bridge.test_bridge_drop_counts import (
    FIGURES,
    SIZE,
    _publish,
    _publish_one_at_a_time,
    _status,
    _stored,
)
from tests.conftest import BrokerThread, broker_config

BOUND = 4 * SIZE
FIRST = 2  # forwarded before the hold
MORE = 8  # published while the third message is in flight: the bound drops some


def _config(tmp_path: Path, url: str, separate: bool) -> Any:
    base = broker_config(tmp_path)
    bridges = parse_bridges([{
        "name": "central", "kind": "jetstream", "servers": [url], "uplink": ["sensors/#"],
        "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE",
        "separate_process": separate, "max_backlog_bytes": BOUND, "ack_timeout": "60s",
        "backoff_initial": "1s", "backoff_max": "1s"}], file="test.toml", gateway_id="gw7")
    storage = dataclasses.replace(base.storage, persistence="sqlite", durability="os")
    return dataclasses.replace(base, bridges=bridges, storage=storage)


def _figures(status: dict[str, Any]) -> dict[str, Any]:
    return {k: status[k] for k in FIGURES}


def _one_in_flight_then_dropped(broker: BrokerThread, proxy: ThreadedProxy,
                                nats: NatsServer) -> int:
    """Message FIRST + 1 sent and stored upstream, its acknowledgement held; then MORE
    messages, over the bound: the drops skip it and some after it. Returns the messages
    published."""
    _publish_one_at_a_time(broker, FIRST)  # the stream exists, the uplink is connected
    proxy.hold_replies()
    _publish(broker, FIRST, 1)
    wait_until(lambda: stream_count(nats.url) == FIRST + 1, 20, "the third message upstream")
    _publish(broker, FIRST + 1, MORE)
    total = FIRST + 1 + MORE
    # The drops are done (the backlog is within the bound, the message in flight skipped)
    # and settled: it is still in flight, so it counts neither as forwarded nor as dropped
    # (before the fix: as dropped, and this sum never came out one short).
    deadline = time.monotonic() + 20
    while True:
        status = _status(broker)
        if (status["backlog_bytes"] <= BOUND and status["cursor"] > FIRST + 1
                and status["forwarded"] + status["dropped"] + status["backlog_messages"]
                == total - 1):
            break
        assert time.monotonic() < deadline, _figures(status)
        time.sleep(0.05)  # polling interval, bounded by the deadline
    assert status["forwarded"] == FIRST, _figures(status)
    return total


def _stored_dropped(broker: BrokerThread) -> int:
    return _stored(broker)[1]


def _settled(broker: BrokerThread, total: int) -> dict[str, Any]:
    """The figures once the backlog is forwarded, every message counted once, and the
    store's count of drops is the one shown (the acknowledged cursor stored)."""
    deadline = time.monotonic() + 30
    while True:
        status = _status(broker)
        if (status["backlog_messages"] == 0
                and status["forwarded"] + status["dropped"] == total
                and _stored_dropped(broker) == status["dropped"]):
            return status
        assert time.monotonic() < deadline, (total, _figures(status), _stored_dropped(broker))
        time.sleep(0.05)  # polling interval, bounded by the deadline


@pytest.mark.parametrize("acknowledged", [True, False], ids=["acknowledged", "given-up"])
@pytest.mark.parametrize("separate", [False, True], ids=["in-broker", "process"])
def test_a_skipped_message_in_flight_counts_once(nats_server: NatsServer, tmp_path: Path,
                                                 separate: bool, acknowledged: bool) -> None:
    proxy = ThreadedProxy(HOST, nats_server.port)
    broker = BrokerThread(_config(tmp_path, f"nats://{proxy.address}", separate)).start()
    try:
        total = _one_in_flight_then_dropped(broker, proxy, nats_server)
        dropped = _status(broker)["dropped"]
        if acknowledged:
            proxy.release()  # its acknowledgement arrives: it was forwarded
        else:
            proxy.cut()  # the connection is lost with the acknowledgement: not sent again
        status = _settled(broker, total)
        # Every message forwarded is upstream, and nothing counted dropped is, but the one
        # given up: it reached the remote side all the same (the gateway cannot know).
        assert status["dropped"] == dropped + (0 if acknowledged else 1), _figures(status)
        assert status["forwarded"] == stream_count(nats_server.url) - (
            0 if acknowledged else 1), _figures(status)
    finally:
        broker.stop(timeout=30)
        proxy.close()
