"""Issue 9, S1 with every message uplinked: a QoS 0 message that a bridge's uplink records
in the log does not make its subscribers (or its publisher) wait for that record's commit.

Nothing acknowledged depends on the record (QoS 0 has no acknowledgement; the bridge
forwards only what is committed), so the subscriber gets the message while the store's
group commit is still held (server/app.py `_submit`, docs/architecture.md "The commit
watermark"). Before, every such batch waited for the commit like a QoS 1 one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_broker.store.sqlite import SqliteStore
from tests.bridge.test_broker_downlink import JS_TABLE, config_with
from tests.conftest import BrokerThread
from tests.integration.rawclient import connect


@pytest.fixture
def held_commits() -> Iterator[threading.Event]:
    """Group commits wait (on the store's thread, before COMMIT) until the event is set."""
    release = threading.Event()

    def hold(_number: int) -> None:
        release.wait(20)

    SqliteStore.before_commit = hold
    try:
        yield release
    finally:
        release.set()
        del SqliteStore.before_commit  # back to Writer's None


def test_a_qos0_message_uplinked_goes_out_before_its_commit(
        make_broker: Callable[..., BrokerThread], tmp_path: Path,
        held_commits: threading.Event) -> None:
    # A JetStream bridge whose remote does not answer: only the log record is left to do.
    broker = make_broker(config_with(tmp_path, {**JS_TABLE, "downlink": []}))
    subscriber = connect(broker.port, "sub")
    subscriber.subscribe("sensors/#")
    publisher = connect(broker.port, "dev")
    for n in range(3):
        publisher.publish("sensors/t1", b"%d" % n)  # QoS 0, recorded for the bridge
    got = [subscriber.expect_publish(timeout=5).payload for _ in range(3)]
    assert got == [b"0", b"1", b"2"]
    held_commits.set()
