"""Model-based test of sessions, end to end: random publish / subscribe / unsubscribe / ack (or
no ack: the message stays in flight) / disconnect / reconnect / broker restart / stream
retention sequences against the REAL broker (a `BrokerApp` on a free loopback port with a
SQLite data directory, restarted gracefully on the same directory) and against a plain model
of per-session queues written below. Every subscriber must receive exactly the packets the
model predicts, in order: the same messages to the same sessions, at the same QoS, resends of
unacknowledged in-flight messages with DUP and their original packet id on reconnect
[MQTT-4.4.0-1] (3.1.1, 5.0), PUBREL again for a QoS 2 message already PUBREC'd, and never a
second copy of a QoS 2 message [MQTT-4.3.3-*] (5.0).

The model is the documented behaviour (docs/configuration.md "Queue bounds", `[mqtt]`
`max_inflight_messages`, `max_queued_messages`, `queue_qos0_messages`; docs/architecture.md):

- a message goes once to each session with a matching subscription, at the lower of the
  message's QoS and the highest QoS of the matching subscriptions [MQTT-3.3.5-1] (3.1.1);
- a session's deliveries form one FIFO queue; QoS 1/2 deliveries leave it only while fewer
  than the in-flight window (`max_inflight_messages`, lowered by a v5 Receive Maximum) are
  unacknowledged, QoS 0 ones as soon as they reach its head;
- at most `max_queued_messages` wait in the queue (in-flight ones excluded); at the bound the
  default `queue_full_policy = "drop-oldest"` drops the session's oldest queued message;
- an offline persistent session queues QoS 1/2 deliveries only (`queue_qos0_messages =
  false`), and the QoS 0 ones still queued when it goes offline are dropped;
- a clean session (3.1.1 clean session 1, v5 Session Expiry Interval 0) ends with its
  connection; a persistent one (3.1.1 clean session 0, v5 clean start 0 with an expiry)
  keeps its subscriptions, queue and in-flight messages across disconnects and restarts;
- on reconnect every in-flight delivery goes again first, in order: PUBLISH with DUP set and
  the original packet id, or PUBREL when its PUBREC had arrived.

A `[[streams]]` stream records the `t/#` topics with a tiny `max_bytes`, so its retention
deletes messages that offline sessions still have queued: the `retention` rule waits (by
replaying the stream over MQTT) until retention has trimmed the stream, and the sessions'
deliveries must be unaffected. It also checks what replay returns: a contiguous, ordered tail
of what was published to the stream, within `max_bytes`.

Synchronisation is by protocol, never by sleeping: a QoS 1/2 PUBLISH waits for its PUBACK /
PUBCOMP, a QoS 0 one for a PINGRESP on the publisher's connection; then each online
subscriber reads (with a deadline) until the packets the model expects arrived, and a PING
round trip shows that nothing else was sent before it. A disconnect is a DISCONNECT packet
followed by the broker closing the connection (it detaches the session before it closes).
Not covered: a connection lost without DISCONNECT (the test cannot tell when the broker noticed,
and a takeover meanwhile keeps queued QoS 0 messages that a detach drops), retained messages,
shared subscriptions, message expiry.

Checked to fail (each caught within the default run): drop-newest instead of drop-oldest at
the bound (core/queues.py), and no DUP flag on a resent PUBLISH after a reconnect.

Cost: MAX_EXAMPLES (40) sequences of up to STEPS (50) steps each (a publish step sends 1 to 8
messages), about 25-30 s on the loaded 2-core machine (three runs: 26, 25, 28 s). A failure
shrinks slowly (each example starts a broker): expect minutes. Set EDGE_SESSION_MODEL_EXAMPLES
to run a longer campaign.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from edge_broker.config import Config, StreamConfig
from edge_broker.mqtt.packets import Publish, PubRel, SubAck
from edge_broker.mqtt.topics import topic_matches
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import (
    DISCONNECT,
    PINGREQ_BYTES,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBREC,
    RawClient,
    connect,
    props,
    subscribe_packet,
)

MAX_EXAMPLES = int(os.environ.get("EDGE_SESSION_MODEL_EXAMPLES", "40"))
STEPS = 50
DEADLINE_S = 10.0  # for any one expected packet; generous for a loaded machine

INFLIGHT = 3  # [mqtt] max_inflight_messages
QUEUE_BOUND = 5  # [mqtt] max_queued_messages, queue_full_policy "drop-oldest" (the default)
SESSION_EXPIRY = 3600  # v5 persistent sessions
SERVER_SHUTTING_DOWN = 0x8B

TOPICS = ("t/a", "t/b", "u/a")
FILTERS = ("t/a", "t/+", "t/#", "+/a", "u/#")
STREAM = StreamConfig("s", "t/#", max_age_s=None, max_bytes=40)


@dataclasses.dataclass(frozen=True)
class Kind:
    version: int  # 4 = MQTT 3.1.1, 5 = MQTT 5
    persistent: bool
    receive_maximum: int | None = None  # v5 only

    @property
    def window(self) -> int:
        return min(INFLIGHT, self.receive_maximum or INFLIGHT)


SUBSCRIBERS = {
    "p4": Kind(4, True),
    "p5": Kind(5, True, receive_maximum=2),
    "c4": Kind(4, False),
    "c5": Kind(5, False),
}


@dataclasses.dataclass(frozen=True)
class Msg:
    number: int
    topic: str
    qos: int

    @property
    def payload(self) -> bytes:
        return b"m%05d" % self.number


@dataclasses.dataclass(eq=False)
class Flight:
    """A QoS 1/2 delivery sent and not yet completely acknowledged."""

    msg: Msg
    qos: int
    state: str = "ack"  # "ack": waits for PUBACK/PUBREC; "comp": PUBREL sent, waits for PUBCOMP
    packet_id: int | None = None  # learnt from the first PUBLISH the broker sends
    pubrel_seen: bool = False  # on this connection


@dataclasses.dataclass(frozen=True)
class Expect:
    """A packet the broker must send next: a PUBLISH of `msg`, or a PUBREL of `flight`."""

    kind: str  # "publish" or "pubrel"
    msg: Msg
    qos: int
    dup: bool = False
    flight: Flight | None = None


class ModelSession:
    def __init__(self) -> None:
        self.subs: dict[str, int] = {}
        self.queue: deque[tuple[Msg, int]] = deque()
        self.inflight: list[Flight] = []


class Subscriber:
    def __init__(self, name: str, kind: Kind) -> None:
        self.name = name
        self.kind = kind
        self.client: RawClient | None = None
        self.session: ModelSession | None = None  # what the broker should hold for it
        self.expected: deque[Expect] = deque()

    @property
    def online(self) -> bool:
        return self.client is not None


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="session-model-"))
        base = broker_config(self.dir, max_inflight_messages=INFLIGHT,
                             max_queued_messages=QUEUE_BOUND)
        assert base.mqtt.queue_full_policy == "drop-oldest"  # the documented default
        assert not base.mqtt.queue_qos0_messages
        self.config: Config = dataclasses.replace(base, streams=(STREAM,))
        self.broker = BrokerThread(self.config).start()
        self.subscribers = {name: Subscriber(name, kind) for name, kind in SUBSCRIBERS.items()}
        self.published = 0
        self.stream: list[Msg] = []  # every message published to the stream's topics
        self.probes = 0
        self.publishers: dict[int, RawClient] = {}
        self._connect_publishers()

    def teardown(self) -> None:
        try:
            for sub in self.subscribers.values():
                if sub.client is not None:
                    sub.client.close()
            for client in self.publishers.values():
                client.close()
            self.broker.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _connect_publishers(self) -> None:
        self.publishers = {v: connect(self.broker.port, f"pub{v}", version=v) for v in (4, 5)}

    # -- the model ------------------------------------------------------------------------

    def _deliver(self, sub: Subscriber, msg: Msg, qos: int) -> None:
        session = sub.session
        assert session is not None
        if not sub.online and qos == 0:
            return  # queue_qos0_messages = false
        while len(session.queue) >= QUEUE_BOUND:
            session.queue.popleft()  # drop-oldest
            event("a queue bound dropped the oldest")
        if not sub.online:
            event(f"queued for an offline session (QoS {qos})")
        session.queue.append((msg, qos))
        self._pump(sub)

    def _pump(self, sub: Subscriber) -> None:
        """What the broker sends from the queue now, in order, within the in-flight window."""
        session = sub.session
        if not sub.online or session is None:
            return
        while session.queue:
            msg, qos = session.queue[0]
            if qos and len(session.inflight) >= sub.kind.window:
                break
            session.queue.popleft()
            if qos == 0:
                sub.expected.append(Expect("publish", msg, 0))
            else:
                flight = Flight(msg, qos)
                session.inflight.append(flight)
                sub.expected.append(Expect("publish", msg, qos, False, flight))

    def _went_offline(self, sub: Subscriber) -> None:
        sub.client = None
        session = sub.session
        assert session is not None
        if not sub.kind.persistent:
            sub.session = None
            return
        session.queue = deque((m, q) for m, q in session.queue if q)
        for flight in session.inflight:
            flight.pubrel_seen = False

    # -- the real side: reading what subscribers receive ----------------------------------

    def _check(self, sub: Subscriber, packet: object) -> None:
        assert sub.expected, f"{sub.name}: unexpected {packet!r}"
        want = sub.expected.popleft()
        where = f"{sub.name} ({sub.kind}): expected {want}, got {packet!r}"
        if want.kind == "pubrel":
            assert isinstance(packet, PubRel), where
            assert want.flight is not None and packet.packet_id == want.flight.packet_id, where
            want.flight.pubrel_seen = True
            return
        assert isinstance(packet, Publish), where
        assert (packet.topic, packet.payload, packet.qos, packet.dup, packet.retain) == (
            want.msg.topic, want.msg.payload, want.qos, want.dup, False), where
        flight = want.flight
        if flight is None:
            return
        assert packet.packet_id is not None, where
        if flight.packet_id is None:  # first send: a packet id no other in-flight one has
            session = sub.session
            assert session is not None
            assert packet.packet_id not in [f.packet_id for f in session.inflight], where
            flight.packet_id = packet.packet_id
        else:
            assert packet.packet_id == flight.packet_id, where  # [MQTT-4.4.0-1] (5.0)

    def _sync(self, sub: Subscriber) -> None:
        """Read until every expected packet arrived, then a PING round trip: nothing else may
        come before the PINGRESP."""
        client = sub.client
        if client is None:
            assert not sub.expected
            return
        deadline = time.monotonic() + DEADLINE_S
        while sub.expected:
            packet = client.read(max(0.0, deadline - time.monotonic()))
            assert packet is not None, (
                f"{sub.name}: still expecting {list(sub.expected)} after {DEADLINE_S} s")
            self._check(sub, packet)
        client.send(PINGREQ_BYTES)
        while True:
            packet = client.read(DEADLINE_S)
            assert packet is not None, f"{sub.name}: no PINGRESP"
            if packet.packet_type == PINGRESP:
                return
            self._check(sub, packet)  # fails: nothing more was expected

    def _sync_all(self) -> None:
        for sub in self.subscribers.values():
            self._sync(sub)

    # -- rules ----------------------------------------------------------------------------

    def _online(self) -> list[str]:
        return [name for name, sub in self.subscribers.items() if sub.online]

    def _offline(self) -> list[str]:
        return [name for name, sub in self.subscribers.items() if not sub.online]

    @initialize(filters=st.lists(st.sampled_from(FILTERS), min_size=len(SUBSCRIBERS),
                                 max_size=len(SUBSCRIBERS)),
                qos=st.lists(st.integers(0, 2), min_size=len(SUBSCRIBERS),
                             max_size=len(SUBSCRIBERS)))
    def everyone_subscribed(self, filters: list[str], qos: list[int]) -> None:
        """Start with every subscriber connected to one filter: most sequences then route."""
        for sub, topic_filter, level in zip(self.subscribers.values(), filters, qos, strict=True):
            self._connect(sub)
            self._subscribe(sub, topic_filter, level)

    @precondition(lambda self: self._offline())
    @rule(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        self._connect(self.subscribers[data.draw(st.sampled_from(self._offline()),
                                                 label="connect")])

    def _connect(self, sub: Subscriber) -> None:
        kind = sub.kind
        if kind.version == 5:
            extra: dict[str, int] = {}
            if kind.persistent:
                extra["session_expiry_interval"] = SESSION_EXPIRY
            if kind.receive_maximum:
                extra["receive_maximum"] = kind.receive_maximum
            properties = props(**extra)
            client = connect(self.broker.port, sub.name, version=5,
                             clean=not kind.persistent, properties=properties)
        else:
            client = connect(self.broker.port, sub.name, version=4, clean=not kind.persistent)
        assert client.connack is not None
        present = sub.session is not None
        assert client.connack.session_present == present, sub.name  # [MQTT-3.2.2-2] (3.1.1)
        sub.client = client
        if sub.session is None:
            sub.session = ModelSession()
        else:
            if sub.session.inflight:
                event("in-flight messages resent on reconnect")
            for flight in sub.session.inflight:  # [MQTT-4.4.0-1] (3.1.1, 5.0)
                if flight.state == "ack":
                    sub.expected.append(Expect("publish", flight.msg, flight.qos, True, flight))
                else:
                    sub.expected.append(Expect("pubrel", flight.msg, flight.qos, False, flight))
            self._pump(sub)
        self._sync(sub)

    @precondition(lambda self: self._online())
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        sub = self.subscribers[data.draw(st.sampled_from(self._online()), label="disconnect")]
        assert sub.client is not None
        sub.client.disconnect()  # DISCONNECT, then the broker closes (after detaching)
        self._went_offline(sub)

    @precondition(lambda self: self._online())
    @rule(data=st.data(), topic_filter=st.sampled_from(FILTERS), qos=st.integers(0, 2))
    def subscribe(self, data: st.DataObject, topic_filter: str, qos: int) -> None:
        self._subscribe(self.subscribers[data.draw(st.sampled_from(self._online()),
                                                   label="subscribe")], topic_filter, qos)

    def _subscribe(self, sub: Subscriber, topic_filter: str, qos: int) -> None:
        assert sub.client is not None and sub.session is not None
        client = sub.client
        packet_id = client.next_id()
        client.send(subscribe_packet(packet_id, [(topic_filter, qos)], version=sub.kind.version))
        packet = client.read(DEADLINE_S)
        assert isinstance(packet, SubAck) and packet.packet_id == packet_id, packet
        assert packet.reason_codes == (qos,)
        sub.session.subs[topic_filter] = qos
        self._sync(sub)

    @precondition(lambda self: any(self.subscribers[n].session
                                   and self.subscribers[n].session.subs  # type: ignore[union-attr]
                                   for n in self._online()))
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        names = [n for n in self._online() if self.subscribers[n].session.subs]  # type: ignore[union-attr]
        sub = self.subscribers[data.draw(st.sampled_from(names), label="unsubscribe")]
        assert sub.client is not None and sub.session is not None
        topic_filter = data.draw(st.sampled_from(sorted(sub.session.subs)), label="filter")
        sub.client.unsubscribe(topic_filter)  # queued deliveries stay queued
        del sub.session.subs[topic_filter]
        self._sync(sub)

    @rule(messages=st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 2),
                                      st.sampled_from([4, 5])), min_size=1, max_size=8))
    def publish(self, messages: list[tuple[str, int, int]]) -> None:
        """A few messages, one at a time: each is routed, and every online subscriber got what
        it should, before the next (so the broker's queues are the model's)."""
        for topic, qos, version in messages:
            self._publish(topic, qos, version)

    def _publish(self, topic: str, qos: int, version: int) -> None:
        self.published += 1
        msg = Msg(self.published, topic, qos)
        publisher = self.publishers[version]
        if qos:
            reason = publisher.publish_acked(topic, msg.payload, qos=qos)
            assert reason < 0x80, hex(reason)
        else:
            publisher.publish(topic, msg.payload)
            publisher.ping()  # the broker routed it before it answered the PINGREQ
        for sub in self.subscribers.values():
            session = sub.session
            if session is None:
                continue
            granted = [q for f, q in session.subs.items() if topic_matches(f, topic)]
            if granted:
                self._deliver(sub, msg, min(qos, max(granted)))
        if topic_matches(STREAM.filter, topic):
            self.stream.append(msg)
        self._sync_all()

    @precondition(lambda self: any(self._ackable(self.subscribers[n]) for n in self._online()))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        names = [n for n in self._online() if self._ackable(self.subscribers[n])]
        sub = self.subscribers[data.draw(st.sampled_from(names), label="ack")]
        flight = data.draw(st.sampled_from(self._ackable(sub)), label="flight")
        assert sub.client is not None and sub.session is not None
        assert flight.packet_id is not None
        if flight.state == "comp":
            sub.client.ack(PUBCOMP, flight.packet_id)
            sub.session.inflight.remove(flight)
            self._pump(sub)
        elif flight.qos == 1:
            sub.client.ack(PUBACK, flight.packet_id)
            sub.session.inflight.remove(flight)
            self._pump(sub)
        else:
            sub.client.ack(PUBREC, flight.packet_id)
            flight.state = "comp"
            sub.expected.append(Expect("pubrel", flight.msg, flight.qos, False, flight))
        self._sync(sub)

    def _ackable(self, sub: Subscriber) -> list[Flight]:
        if sub.session is None:
            return []
        return [f for f in sub.session.inflight
                if f.packet_id is not None and (f.state == "ack" or f.pubrel_seen)]

    @rule()
    def restart(self) -> None:
        """A graceful stop (SIGTERM) and a new broker on the same data directory."""
        self._sync_all()
        if any(s.session and (s.session.queue or s.session.inflight)
               for s in self.subscribers.values()):
            event("restart with queued or in-flight messages")
        self.broker.stop()
        for sub in self.subscribers.values():
            client = sub.client
            if client is None:
                continue
            if sub.kind.version == 5:  # 3.14 (5.0): told why the connection ends
                packet = client.read(DEADLINE_S)
                assert packet is not None and packet.packet_type == DISCONNECT, packet
                assert packet.reason_code == SERVER_SHUTTING_DOWN  # type: ignore[attr-defined]
            client.expect_closed()
            client.close()
            self._went_offline(sub)
        for publisher in self.publishers.values():
            publisher.close()
        self.broker = BrokerThread(self.config).start()
        self._connect_publishers()

    @precondition(lambda self: self.stream)
    @rule()
    def retention(self) -> None:
        """Wait until the stream's retention trimmed it to `max_bytes` (as replay from
        `earliest` shows it); then the sessions' deliveries must go on as the model says."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            history = self._replay()
            numbers = [m.number for m in self.stream]
            tail = numbers[len(numbers) - len(history):]
            assert history == tail, f"replay {history} is not the stream's tail {numbers}"
            size = sum(len(m.topic) + len(m.payload) for m in self.stream[-len(history):])
            assert STREAM.max_bytes is not None
            if size <= STREAM.max_bytes:
                break
            assert time.monotonic() < deadline, (
                f"stream still holds {size} bytes (max_bytes {STREAM.max_bytes})")
        kept = set(history)
        if any(m.number not in kept and topic_matches(STREAM.filter, m.topic)
               for s in self.subscribers.values() if s.session
               for m in [*(m for m, _ in s.session.queue), *(f.msg for f in s.session.inflight)]):
            event("retention deleted messages a session still has queued or in flight")
        self._sync_all()

    def _replay(self) -> list[int]:
        """The message numbers `$stream/s` replays from `earliest`, up to the newest one."""
        self.probes += 1
        probe = connect(self.broker.port, f"probe{self.probes}", version=5)
        probe.send(subscribe_packet(1, [(f"$stream/{STREAM.name}", 0)], version=5,
                                    properties=props([("stream-offset", "earliest")])))
        newest = self.stream[-1].payload
        got: list[int] = []
        offsets: list[int] = []
        subacked = False
        deadline = time.monotonic() + DEADLINE_S
        while not (subacked and got and got[-1] == self.stream[-1].number):
            packet = probe.read(max(0.0, deadline - time.monotonic()))
            assert packet is not None, f"replay: got {got}, waiting for {newest!r}"
            if isinstance(packet, SubAck):
                assert packet.reason_codes == (0,)
                subacked = True
                continue
            assert isinstance(packet, Publish), packet
            got.append(int(packet.payload[1:]))
            offsets.extend(int(v) for k, v in packet.properties.user_properties
                           if k == "stream-offset")
        assert offsets == sorted(set(offsets)) and len(offsets) == len(got), offsets
        probe.disconnect()
        return got


SessionMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSessionModel = SessionMachine.TestCase
