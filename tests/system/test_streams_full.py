"""A full store and named streams: a QoS 1 message that only a stream takes is refused like
any message that must be stored (MQTT 5: 0x97), and QoS 0 stream traffic is not recorded,
counted, and never blocks the publisher or its subscribers."""

from __future__ import annotations

import dataclasses
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_broker.config import StreamConfig
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import connect, subscriber, unique_id

QUOTA_EXCEEDED = 0x97
PUBLISH_LIMIT = 2000


def test_a_full_store_refuses_stream_qos1_and_counts_dropped_qos0(
        tmp_path: Path, make_broker: Callable[..., BrokerThread]) -> None:
    base = broker_config(tmp_path)
    config = dataclasses.replace(
        base, storage=dataclasses.replace(base.storage, max_store_bytes=256 * 1024),
        http=dataclasses.replace(base.http, port=0),
        streams=(StreamConfig("fill", "fill/#"),))
    broker = make_broker(config=config)
    listener = subscriber(broker.port, unique_id("listener"), ("fill/#", 0), version=5)
    publisher = connect(broker.port, unique_id("pub"), version=5)
    accepted = 0
    for n in range(PUBLISH_LIMIT):
        reason = publisher.publish_acked("fill/x", b"%06d" % n + b"x" * 2042, qos=1)
        if reason == QUOTA_EXCEEDED:
            break
        assert reason == 0, hex(reason)  # taken by the stream alone: 0x00
        accepted += 1
    else:
        raise AssertionError(f"never full after {PUBLISH_LIMIT} messages")
    assert accepted >= 40
    for _ in range(accepted):  # the listener got every accepted one (QoS 0)
        listener.expect_publish()

    def dropped() -> int:
        assert broker.app is not None
        return broker.app.core.stats.stream_dropped

    before = broker.call(dropped)
    for i in range(20):
        publisher.publish("fill/q0", b"qos0-%d" % i)
    got = [listener.expect_publish().payload for _ in range(20)]
    assert got == [b"qos0-%d" % i for i in range(20)]  # delivered, not recorded
    assert broker.call(dropped) - before == 20
    publisher.ping()
    listener.ping()
    assert broker.app is not None and broker.app.http_address is not None
    host, port = broker.app.http_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines()
                if x.startswith('edge_broker_dropped_messages_total{reason="stream_store_full"}'))
    assert float(line.split()[-1]) == broker.call(dropped) >= 20
