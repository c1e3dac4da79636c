"""Full storage refuses only what would have to be stored (docs/configuration.md,
`max_store_bytes`): while the store is full, a QoS 1/2 PUBLISH that writes nothing - between
clean sessions, or matching no subscription - is accepted and delivered as usual; one that
would be stored (for a persistent session, or retained) is refused (5.0: 0x97; 3.1.1: not
acknowledged).

The store is made full as in tests/system/test_full_storage.py (`Traffic.fill`).
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.rawclient import (
    PUBCOMP,
    PUBREC,
    PUBREL,
    connect,
    props,
    subscriber,
    unique_id,
)
from tests.system.test_full_storage import (
    QUOTA_EXCEEDED,
    MakeBroker,
    Traffic,
    storage_config,
    v311_publish,
)

NO_MATCHING_SUBSCRIBERS = 0x10


def test_a_full_store_still_accepts_qos1_and_qos2_that_need_no_storage(
        tmp_path: Path, make_broker: MakeBroker) -> None:
    broker = make_broker(config=storage_config(tmp_path, max_store_bytes=256 * 1024))
    traffic = Traffic(broker)
    traffic.fill(2048)
    assert broker.call(lambda: broker.app.store.full)
    clean_v5 = subscriber(broker.port, unique_id("clean5"), ("clean/#", 2), version=5)
    clean_v311 = subscriber(broker.port, unique_id("clean311"), ("clean/#", 2), version=4)

    # Between clean sessions: nothing to write, so accepted and delivered.
    assert traffic.v5.publish_acked("clean/v5", b"q1 from v5", qos=1) == 0
    assert v311_publish(traffic.v311, "clean/v311", b"q1 from 3.1.1")
    packet_id = traffic.v5.publish("clean/v5", b"q2 from v5", qos=2)
    rec = traffic.v5.expect(PUBREC)
    assert (rec.packet_id, rec.reason_code) == (packet_id, 0)
    traffic.v5.ack(PUBREL, packet_id or 0)
    assert traffic.v5.expect(PUBCOMP).packet_id == packet_id
    for client in (clean_v5, clean_v311):
        got = sorted(client.expect_publish().payload for _ in range(3))
        assert got == [b"q1 from 3.1.1", b"q1 from v5", b"q2 from v5"]
        client.ping()
    # No subscriber at all: nothing to write either (and MQTT 5 hears the truth).
    assert traffic.v5.publish_acked("nobody/t", b"x", qos=1) == NO_MATCHING_SUBSCRIBERS

    # What would be written is still refused: a retained message, a persistent subscriber's
    # delivery.
    assert traffic.v5.publish_acked("clean/r", b"keep me", qos=1,
                                    retain=True) == QUOTA_EXCEEDED
    assert traffic.v5.publish_acked("fill/v5", b"for the slow one", qos=1) == QUOTA_EXCEEDED
    assert not v311_publish(traffic.v311, "fill/v311", b"refused",
                            packet_id=traffic.v311.next_id())
    # A persistent (stored) publisher's QoS 2 id would be written: refused too.
    durable = connect(broker.port, unique_id("durable"), version=5, clean=False,
                      properties=props(session_expiry_interval=600))
    packet_id = durable.publish("clean/v5", b"q2 from a stored session", qos=2)
    rec = durable.expect(PUBREC)
    assert (rec.packet_id, rec.reason_code) == (packet_id, QUOTA_EXCEEDED)
    for client in (clean_v5, clean_v311):
        client.expect_nothing()
