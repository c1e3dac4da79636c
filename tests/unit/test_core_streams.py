"""The core's side of named streams (core/streams.py): offsets and LogAppended records, the
acknowledgement code of a message only a stream takes, SUBACK codes of `$stream/` filters, and
the seam between a replayed history (pages the server hands in) and live messages."""

from __future__ import annotations

from edge_broker.core.broker import BrokerCore, CoreSettings
from edge_broker.core.changes import LogAppended, Message, Snapshot
from edge_broker.core.replay import EncodedPublish
from edge_broker.core.streams import PAGE_SIZE, parse_stream_filter
from edge_broker.mqtt.codec import decode, split_frame
from edge_broker.mqtt.packets import Publish, Subscribe, Subscription
from edge_broker.mqtt.properties import Properties
from edge_broker.mqtt.types import ReasonCode
from tests.unit.test_core_broker import V311, commit, connect, pub


def core_with_stream(last_offset: int = 0) -> BrokerCore:
    core = BrokerCore(CoreSettings())
    core.set_streams([("t", "sensors/#")])
    core.restore(Snapshot([], [], {}, [], {}, [], log_last_offset=last_offset), now=0.0)
    return core


def subscribe(core: BrokerCore, client_id: str, topic_filter: str, qos: int = 1,
              position: str | None = None) -> tuple[int, ...]:
    props = (Properties(user_properties=(("stream-offset", position),)) if position
             else Properties())
    return core.subscribe(client_id, Subscribe(1, (Subscription(topic_filter, qos),), props),
                          now=0.0)


def sent(packet: object, level: int = 5) -> Publish:
    """The PUBLISH as the subscriber receives it: a replayed QoS 0 message comes encoded by
    the core (core/replay.py); its bytes are decoded, and must be what `as_publish()` is."""
    if isinstance(packet, EncodedPublish):
        first, start, end = split_frame(packet.data, 0, 1 << 28)
        assert end == len(packet.data)
        decoded = decode(first, packet.data[start:end], level)
        assert isinstance(decoded, Publish) and decoded == packet.as_publish()
        return decoded
    assert isinstance(packet, Publish)
    return packet


def offsets(packets: list[object]) -> list[int]:
    return [int(dict(sent(packet).properties.user_properties)["stream-offset"])
            for packet in packets]


def test_offsets_follow_the_log_and_every_stream_message_is_appended_once() -> None:
    core = core_with_stream(last_offset=41)
    connect(core, "pub")
    assert pub(core, "pub", "sensors/a", qos=0) == ReasonCode.SUCCESS  # no subscriber
    assert pub(core, "pub", "other", qos=1) == ReasonCode.NO_MATCHING_SUBSCRIBERS
    assert pub(core, "pub", "sensors/b", qos=1, packet_id=2) == ReasonCode.SUCCESS
    appended = [c.message for c in core.drain().changes if isinstance(c, LogAppended)]
    assert [(m.topic, m.offset) for m in appended] == [("sensors/a", 42), ("sensors/b", 43)]


def test_suback_codes_of_stream_filters() -> None:
    core = core_with_stream()
    connect(core, "v5")
    connect(core, "v3", level=V311)
    assert subscribe(core, "v5", "$stream/nope") == (ReasonCode.TOPIC_FILTER_INVALID,)
    assert subscribe(core, "v5", "$share/g/$stream/t") == (
        ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,)
    assert subscribe(core, "v5", "$stream/t", position="soon") == (
        ReasonCode.TOPIC_FILTER_INVALID,)
    assert subscribe(core, "v5", "$stream/t/sensors/+", 2) == (2,)
    assert subscribe(core, "v3", "$stream/t@bad") == (ReasonCode.UNSPECIFIED_ERROR,)
    assert subscribe(core, "v3", "$stream/t@12") == (1,)


def test_parse_stream_filter() -> None:
    parsed = parse_stream_filter("$stream/t@2026-12-01T08:00:00Z/a/+")
    assert parsed is not None and parsed.name == "t" and parsed.topic_filter == "a/+"
    assert isinstance(parsed.position, float)
    assert parse_stream_filter("$stream/t@7") == parse_stream_filter("$stream/t@7")
    assert parse_stream_filter("$stream/t/a#") is None


def test_history_pages_then_live_without_gap_or_duplicate() -> None:
    core = core_with_stream(last_offset=10)  # offsets 1..10 are in the store
    connect(core, "pub")
    connect(core, "dev", receive_maximum=3)
    assert subscribe(core, "dev", "$stream/t", position="earliest") == (1,)
    pub(core, "pub", "sensors/live", qos=1, packet_id=5)  # offset 11: live
    assert core.take_stream_fetches() == []  # not before the SUBSCRIBE's batch committed
    commit(core)
    (fetch,) = core.take_stream_fetches()
    assert (fetch.position, fetch.until) == ("earliest", 10)
    assert core.pull("dev", now=0.0) == []  # the live message waits behind the history
    rows = [Message(0, f"sensors/{n}", b"h", 1, False, offset=n) for n in range(1, 11)]
    core.stream_page(fetch, rows[:4], 4, now=0.0)
    first = core.pull("dev", now=0.0)
    assert offsets(first) == [1, 2, 3]  # Receive Maximum 3
    for packet in first:
        assert isinstance(packet, Publish) and packet.packet_id is not None
        core.puback("dev", packet.packet_id, now=0.0)
    assert offsets(core.pull("dev", now=0.0)) == [4]
    (fetch,) = core.take_stream_fetches()  # the buffer ran low: the next page
    assert (fetch.position, fetch.after) == (None, 4)
    assert core.take_stream_fetches() == []  # one page in flight at most
    core.stream_page(fetch, rows[4:], 10, now=0.0)
    sent = []
    while True:
        packets = core.pull("dev", now=0.0)
        if not packets:
            break
        sent += offsets(packets)
        for packet in packets:
            assert isinstance(packet, Publish) and packet.packet_id is not None
            core.puback("dev", packet.packet_id, now=0.0)
    assert sent == [5, 6, 7, 8, 9, 10, 11]


def test_a_v311_subscriber_gets_no_properties() -> None:
    core = core_with_stream()
    connect(core, "pub")
    connect(core, "v3", level=V311)
    subscribe(core, "v3", "$stream/t")
    pub(core, "pub", "sensors/a", qos=0)
    commit(core)
    (packet,) = core.pull("v3", now=0.0)
    assert isinstance(packet, Publish) and packet.topic == "sensors/a"
    assert packet.properties.user_properties == ()  # 3.1.1 has no properties


def test_sending_a_page_down_to_the_refill_mark_asks_for_the_next_one() -> None:
    """A page that arrives while more than a page is buffered asks for nothing; the ask must
    come when sending brings the buffer down (else the replay waits for an unrelated commit)."""
    core = core_with_stream(last_offset=3 * PAGE_SIZE)
    asked: list[int] = []
    core.stream_refill = lambda: asked.append(1)
    connect(core, "pub")
    connect(core, "dev")
    assert subscribe(core, "dev", "$stream/t", qos=0, position="earliest") == (0,)
    commit(core)
    rows = [Message(0, f"sensors/{n}", b"h", 0, False, offset=n)
            for n in range(1, 3 * PAGE_SIZE + 1)]
    (fetch,) = core.take_stream_fetches()
    core.stream_page(fetch, rows[:PAGE_SIZE], PAGE_SIZE, now=0.0)
    (fetch,) = core.take_stream_fetches()  # a page buffered: the next is read meanwhile
    core.stream_page(fetch, rows[PAGE_SIZE:2 * PAGE_SIZE], 2 * PAGE_SIZE, now=0.0)
    assert core.take_stream_fetches() == []  # two pages buffered: nothing more yet
    assert offsets(core.pull("dev", now=0.0, limit=PAGE_SIZE - 1)) == list(range(1, PAGE_SIZE))
    assert asked == []  # still more than a page buffered
    core.pull("dev", now=0.0, limit=1)
    assert asked  # down to a page: the server is told to fetch
    (fetch,) = core.take_stream_fetches()
    assert fetch.after == 2 * PAGE_SIZE


def test_replayed_qos0_history_is_sent_as_the_stored_message_with_its_offset() -> None:
    """What a QoS 0 replay puts on the wire (encoded from the stored row, core/replay.py):
    original topic, payload, retain as published, the publisher's properties, the
    subscription identifier and `stream-offset`; no properties at all for 3.1.1. A message
    with an expiry, or sent at QoS 1, goes out as a packet with its remaining interval."""
    core = core_with_stream(last_offset=4)
    connect(core, "v5")
    connect(core, "v3", level=V311)
    props = Properties(content_type="text/plain", user_properties=(("k", "v"), ("k", "w")),
                       correlation_data=b"\x00\x01")
    core.subscribe("v5", Subscribe(1, (Subscription("$stream/t", 0, retain_as_published=True),),
                                   Properties(subscription_identifiers=(300,),
                                              user_properties=(("stream-offset", "earliest"),))),
                   now=0.0)
    subscribe(core, "v3", "$stream/t@earliest", qos=0)
    commit(core)
    rows = [Message(0, "sensors/é", b"x" * 200, 1, True, props, offset=1),
            Message(0, "sensors/b", b"", 0, False, offset=2),
            Message(0, "sensors/c", b"y", 0, False, expires_at=100.0, offset=3),
            Message(0, "sensors/b", b"z", 2, False, offset=4)]
    for fetch in core.take_stream_fetches():
        core.stream_page(fetch, rows, 4, now=10.0)
    v5 = [sent(p) for p in core.pull("v5", now=10.0)]
    assert [(p.topic, p.payload, p.retain, p.qos) for p in v5] == [
        ("sensors/é", b"x" * 200, True, 0), ("sensors/b", b"", False, 0),
        ("sensors/c", b"y", False, 0), ("sensors/b", b"z", False, 0)]
    assert v5[0].properties.content_type == "text/plain"
    assert v5[0].properties.correlation_data == b"\x00\x01"
    assert v5[0].properties.user_properties == (("k", "v"), ("k", "w"), ("stream-offset", "1"))
    assert all(p.properties.subscription_identifiers == (300,) for p in v5)
    assert v5[2].properties.message_expiry_interval == 90
    assert offsets(v5) == [1, 2, 3, 4]
    v3 = [sent(p, V311) for p in core.pull("v3", now=10.0)]
    assert [(p.topic, p.payload, p.retain) for p in v3] == [
        ("sensors/é", b"x" * 200, False), ("sensors/b", b"", False),
        ("sensors/c", b"y", False), ("sensors/b", b"z", False)]
    assert all(p.properties == Properties() for p in v3)


def test_a_buffered_history_goes_out_in_the_version_of_the_new_connection() -> None:
    """A persistent session's history read while it was connected with MQTT 5 and sent after
    it reconnected with 3.1.1: no properties on the wire (3.1.1 has none)."""
    core = core_with_stream(last_offset=2)
    epoch = connect(core, "dev", clean=False, expiry=3600)
    subscribe(core, "dev", "$stream/t", qos=0, position="earliest")
    commit(core)
    (fetch,) = core.take_stream_fetches()
    core.disconnect("dev", epoch, now=0.0)
    core.stream_page(fetch, [Message(0, "sensors/a", b"h", 0, False, offset=n)
                             for n in (1, 2)], 2, now=0.0)
    connect(core, "dev", level=V311, clean=False)
    commit(core)
    packets = [sent(p, V311) for p in core.pull("dev", now=0.0)]
    assert [(p.topic, p.payload) for p in packets] == [("sensors/a", b"h")] * 2
    assert all(p.properties == Properties() for p in packets)
