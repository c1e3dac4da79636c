"""Black-box, hand-built bytes: will messages, including the MQTT 5 will delay.

The will-delay tests wait for the broker's real clock (it has no other); the waits are short
(1-2 s) and every read has a deadline.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import BrokerThread
from tests.integration.rawclient import RawWill, connect, props, subscriber, unique_id

both_versions = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


@both_versions
def test_will_is_published_when_the_connection_drops(broker: BrokerThread,
                                                     version: int) -> None:
    watcher = subscriber(broker.port, unique_id(), ("will/#", 1), version=version)
    will = RawWill("will/drop", b"gone", qos=1)
    client = connect(broker.port, unique_id(), version=version, will=will)
    client.ping()
    client.close()  # no DISCONNECT [MQTT-3.1.2-8] (3.1.1), 3.1.2.5 (5.0)
    message = watcher.expect_publish()
    assert (message.topic, message.payload, message.qos) == ("will/drop", b"gone", 1)


@both_versions
def test_no_will_after_a_normal_disconnect(broker: BrokerThread, version: int) -> None:
    watcher = subscriber(broker.port, unique_id(), "will/#", version=version)
    client = connect(broker.port, unique_id(), version=version,
                     will=RawWill("will/normal", b"should not"))
    # [MQTT-3.1.2-10] (3.1.1), [MQTT-3.1.2-10] (5.0): DISCONNECT (0x00) deletes the will.
    client.disconnect(reason_code=0x00 if version == 5 else None)
    watcher.expect_nothing()


def test_v5_disconnect_with_will_message_publishes_the_will(broker: BrokerThread) -> None:
    watcher = subscriber(broker.port, unique_id(), "will/#", version=5)
    client = connect(broker.port, unique_id(), version=5, will=RawWill("will/04", b"asked"))
    client.disconnect(reason_code=0x04)  # 3.14.2.1 (5.0): Disconnect with Will Message
    assert watcher.expect_publish().payload == b"asked"


def test_will_with_retain_flag_becomes_the_retained_message(broker: BrokerThread) -> None:
    watcher = subscriber(broker.port, unique_id(), "will/ret")
    client = connect(broker.port, unique_id(), will=RawWill("will/ret", b"last", retain=True))
    client.close()
    assert watcher.expect_publish().payload == b"last"
    # [MQTT-3.1.2-17] (3.1.1): a will with Will Retain 1 is published as a retained message.
    late = subscriber(broker.port, unique_id(), "will/ret")
    message = late.expect_publish()
    assert (message.payload, message.retain) == (b"last", True)


def test_v5_will_delay_interval(broker: BrokerThread) -> None:
    watcher = subscriber(broker.port, unique_id(), "will/#", version=5)
    will = RawWill("will/delayed", b"late", properties=props(will_delay_interval=2))
    client = connect(broker.port, unique_id(), version=5, clean=False, will=will,
                     properties=props(session_expiry_interval=10))
    client.ping()
    client.close()
    started = time.monotonic()
    watcher.expect_nothing(1.0)  # 3.1.3.2.2 (5.0): not before the delay has passed
    assert watcher.expect_publish(timeout=3.0).payload == b"late"
    elapsed = time.monotonic() - started
    assert 1.6 <= elapsed <= 3.5, elapsed


def test_v5_will_goes_when_the_session_ends_before_the_delay(broker: BrokerThread) -> None:
    watcher = subscriber(broker.port, unique_id(), "will/#", version=5)
    will = RawWill("will/expired", b"session over", properties=props(will_delay_interval=60))
    client = connect(broker.port, unique_id(), version=5, clean=False, will=will,
                     properties=props(session_expiry_interval=1))
    client.ping()
    client.close()
    started = time.monotonic()
    # 3.1.3.2.2 (5.0): the will goes at the end of the delay or of the session, whichever
    # comes first.
    assert watcher.expect_publish(timeout=3.0).payload == b"session over"
    elapsed = time.monotonic() - started
    assert 0.7 <= elapsed <= 2.5, elapsed


def test_v5_reconnect_within_the_will_delay_cancels_the_will(broker: BrokerThread) -> None:
    watcher = subscriber(broker.port, unique_id(), "will/#", version=5)
    client_id = unique_id()
    will = RawWill("will/cancelled", b"no", properties=props(will_delay_interval=1))
    session = props(session_expiry_interval=10)
    client = connect(broker.port, client_id, version=5, clean=False, will=will,
                     properties=session)
    client.ping()
    client.close()
    # [MQTT-3.1.3-9] (5.0): a new connection for the session before the delay elapses:
    # the will is not sent.
    again = connect(broker.port, client_id, version=5, clean=False, properties=session)
    assert again.last_raw[2] == 1
    watcher.expect_nothing(1.5)  # past the 1 s delay
