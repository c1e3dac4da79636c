"""Issue 9, S1 with every message uplinked: a QoS 0 message that a bridge's uplink records
in the log does not make its subscribers (or its publisher) wait for that record's commit.

Nothing acknowledged depends on the record (QoS 0 has no acknowledgement; the bridge
forwards only what is committed), so the subscriber gets the message while the store's
group commit is still held (server/app.py `_submit`, docs/architecture.md "The commit
watermark"). Before, every such batch waited for the commit like a QoS 1 one.
"""

from __future__ import annotations

import threading
import time
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


def test_log_readers_see_a_qos0_record_only_after_its_commit(
        make_broker: Callable[..., BrokerThread], tmp_path: Path,
        held_commits: threading.Event) -> None:
    # The deliveries go out before the commit, but what log readers (a bridge's uplink, a
    # stream's subscribers, a resuming session's backlog) may read is what is in the file: the
    # core's committed log offset must not pass records still waiting for their commit, or a
    # reader would page over the missing rows and skip them; once committed, it moves on
    # without waiting for another batch.
    broker = make_broker(config_with(tmp_path, {**JS_TABLE, "downlink": []}))
    subscriber = connect(broker.port, "sub")
    subscriber.subscribe("sensors/#")
    publisher = connect(broker.port, "dev")
    for n in range(3):
        publisher.publish("sensors/t1", b"%d" % n)
    assert [subscriber.expect_publish(timeout=5).payload for _ in range(3)] == [b"0", b"1", b"2"]
    assert broker.app is not None
    core = broker.app.core
    last = core._next_offset - 1
    assert last >= 3
    assert core._log_committed < last  # held: not in the file yet
    held_commits.set()
    deadline = time.monotonic() + 10
    while core._log_committed < last and time.monotonic() < deadline:
        time.sleep(0.01)  # polling with a deadline: no event to wait on across threads
    assert core._log_committed >= last
