"""The store contract (store/base.py, core/changes.py), one suite for every SessionStore.

Each test runs against MemoryStore and SqliteStore. "Reopen" means what a restart means for
the store: the same object for MemoryStore, a new SqliteStore on the same file. Snapshots are
compared after sorting, since the contract fixes only the order of deliveries.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_broker.core.changes import (
    AWAIT_ACK,
    AWAIT_COMP,
    EXPIRY_NEVER,
    QUEUED,
    Change,
    DeliveryDeleted,
    DeliveryRecord,
    DeliverySaved,
    Message,
    MessageSaved,
    Qos2Received,
    Qos2Released,
    RetainedDeleted,
    RetainedSaved,
    SessionDeleted,
    SessionRecord,
    SessionSaved,
    Snapshot,
    SubscriptionDeleted,
    SubscriptionRecord,
    SubscriptionSaved,
)
from edge_broker.mqtt.packets import Will
from edge_broker.mqtt.properties import (
    NO_PROPERTIES,
    PROPERTY_TABLE,
    WILL,
    Properties,
    PropertyType,
)
from edge_broker.store.base import SessionStore
from edge_broker.store.memory import MemoryStore
from edge_broker.store.sqlite import SqliteStore, validate

# --------------------------------------------------------------------------- helpers


def normalized(snapshot: Snapshot) -> tuple[Any, ...]:
    return (
        sorted(snapshot.sessions, key=lambda s: s.client_id),
        sorted(snapshot.subscriptions, key=lambda s: (s.client_id, s.topic_filter)),
        dict(sorted(snapshot.messages.items())),
        sorted(snapshot.deliveries, key=lambda d: (d.delivery_id, d.client_id)),
        dict(sorted(snapshot.retained.items())),
        sorted(snapshot.incoming_qos2),
    )


class Backend:
    """A store under test, and how to restart it and peek at what it has committed."""

    def __init__(self, kind: str, directory: Path, durability: str = "fsync") -> None:
        self.kind = kind
        self.path = directory / "store.db"
        self.durability = durability
        self.store: SessionStore = self._new()

    def _new(self) -> SessionStore:
        if self.kind == "memory":
            return MemoryStore()
        return SqliteStore(self.path, durability=self.durability)

    async def open(self) -> Snapshot:
        return await self.store.open()

    async def reopen(self) -> Snapshot:
        if self.kind == "memory":
            return await self.store.open()
        await self.store.close()
        self.store = self._new()
        return await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    def committed_sessions(self) -> set[str]:
        """Client ids of the sessions committed so far, read synchronously from outside."""
        if isinstance(self.store, MemoryStore):
            return set(self.store.sessions)
        uri = f"file:{self.path}?mode=ro"
        with sqlite3.connect(uri, uri=True) as db:
            return {row[0] for row in db.execute("SELECT client_id FROM sessions")}


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path)
    await b.open()
    yield b
    await b.close()


async def apply_all(store: SessionStore, batches: Sequence[Sequence[Change]]) -> None:
    """Hand every batch over without waiting in between, then wait for all of them."""
    waiters = [store.apply(batch) for batch in batches]
    for waiter in waiters:
        await waiter


def message(mid: int, topic: str = "t", payload: bytes = b"p", **kw: Any) -> Message:
    return Message(mid, topic, payload, kw.pop("qos", 1), kw.pop("retain", False), **kw)


def delivery(client_id: str, did: int, mid: int, **kw: Any) -> DeliveryRecord:
    return DeliveryRecord(client_id, did, mid, kw.pop("qos", 1), kw.pop("retain", False), **kw)


def session(client_id: str, **kw: Any) -> SessionRecord:
    return SessionRecord(client_id, kw.pop("protocol_level", 5),
                         kw.pop("expiry_interval", 3600), **kw)


# What a store keeps: a message's pass-through properties (core.broker._pass_through) and
# every property a will may have (3.1.3.2 (5.0)): together every value type stored. Other
# properties do not belong in a stored row; store/sqlite/validate.py quarantines a row
# that has them.
MESSAGE_PROPERTIES = Properties(
    payload_format_indicator=1,
    content_type="application/json; charset=utf-8 \u00e9\u4e2d\U0001f600",
    response_topic="reply/\u00fc",
    correlation_data=b"\x00\x01\xff\xfe binary \x00",
    user_properties=(("k", "v"), ("k", "v"), ("", ""), ("\u00e4", "\U0001f600"), ("k", "w")),
)
WILL_PROPERTIES = replace(MESSAGE_PROPERTIES, message_expiry_interval=0xFFFFFFFF,
                          will_delay_interval=30)


def test_every_will_property_is_set() -> None:
    """WILL_PROPERTIES has every property a will may carry (so the round trip covers them),
    and MESSAGE_PROPERTIES every pass-through one."""
    for spec in PROPERTY_TABLE.values():
        if WILL in spec.allowed_in:
            assert getattr(WILL_PROPERTIES, spec.attribute) not in (None, ()), spec.attribute
    for attribute in validate.MESSAGE_PROPERTIES:
        assert getattr(MESSAGE_PROPERTIES, attribute) not in (None, ()), attribute


# --------------------------------------------------------------------------- contract tests


async def test_fresh_store_is_empty(backend: Backend) -> None:
    assert normalized(await backend.reopen()) == normalized(Snapshot.empty())


async def test_batches_survive_a_restart(backend: Backend) -> None:
    m1, m2 = message(1, "a/b", b"one"), message(2, "a/c", b"two", qos=2)
    batches: list[list[Change]] = [
        [SessionSaved(session("c1")), SubscriptionSaved(SubscriptionRecord("c1", "a/#", 1)),
         SessionSaved(session("c2", protocol_level=4, expiry_interval=EXPIRY_NEVER))],
        [MessageSaved(m1), DeliverySaved(delivery("c1", 1, 1)),
         MessageSaved(m2), DeliverySaved(delivery("c2", 2, 2, qos=2))],
        [DeliverySaved(delivery("c1", 1, 1, packet_id=5, state=AWAIT_ACK)),
         Qos2Received("c2", 9), RetainedSaved("a/c", 2)],
    ]
    await apply_all(backend.store, batches)
    expected = Snapshot(
        sessions=[session("c1"), session("c2", protocol_level=4, expiry_interval=EXPIRY_NEVER)],
        subscriptions=[SubscriptionRecord("c1", "a/#", 1)],
        messages={1: m1, 2: m2},
        deliveries=[delivery("c1", 1, 1, packet_id=5, state=AWAIT_ACK),
                    delivery("c2", 2, 2, qos=2)],
        retained={"a/c": 2},
        incoming_qos2=[("c2", 9)],
    )
    assert normalized(await backend.reopen()) == normalized(expected)
    # And again: reopening does not change anything.
    assert normalized(await backend.reopen()) == normalized(expected)


async def test_deliveries_come_back_in_delivery_id_order(backend: Backend) -> None:
    changes: list[Change] = [MessageSaved(message(1))]
    for did in (5, 3, 9, 1, 7):
        changes.append(DeliverySaved(delivery("c", did, 1)))
    await apply_all(backend.store, [changes])
    snapshot = await backend.reopen()
    assert [d.delivery_id for d in snapshot.deliveries] == [1, 3, 5, 7, 9]


async def test_session_deleted_cascades(backend: Backend) -> None:
    await apply_all(backend.store, [
        [SessionSaved(session("gone")), SessionSaved(session("kept")),
         SubscriptionSaved(SubscriptionRecord("gone", "x/#", 1)),
         SubscriptionSaved(SubscriptionRecord("kept", "x/#", 1)),
         MessageSaved(message(1)), MessageSaved(message(2)),
         DeliverySaved(delivery("gone", 1, 1)), DeliverySaved(delivery("gone", 2, 2)),
         DeliverySaved(delivery("kept", 3, 2)),
         Qos2Received("gone", 1), Qos2Received("kept", 1)],
    ])
    await apply_all(backend.store, [[SessionDeleted("gone")]])
    snapshot = await backend.reopen()
    assert [s.client_id for s in snapshot.sessions] == ["kept"]
    assert [s.client_id for s in snapshot.subscriptions] == ["kept"]
    assert [(d.client_id, d.delivery_id) for d in snapshot.deliveries] == [("kept", 3)]
    assert snapshot.incoming_qos2 == [("kept", 1)]
    assert set(snapshot.messages) == {2}  # body 1 lost its only reference


async def test_session_deleted_then_recreated_in_one_batch(backend: Backend) -> None:
    await apply_all(backend.store, [
        [SessionSaved(session("c")), SubscriptionSaved(SubscriptionRecord("c", "old", 1)),
         MessageSaved(message(1)), DeliverySaved(delivery("c", 1, 1)), Qos2Received("c", 4)],
    ])
    await apply_all(backend.store, [
        [SubscriptionSaved(SubscriptionRecord("c", "older", 0)),
         SessionDeleted("c"),
         SessionSaved(session("c", expiry_interval=10)),
         SubscriptionSaved(SubscriptionRecord("c", "new", 2)),
         MessageSaved(message(2)), DeliverySaved(delivery("c", 2, 2))],
    ])
    snapshot = await backend.reopen()
    assert snapshot.sessions == [session("c", expiry_interval=10)]
    assert snapshot.subscriptions == [SubscriptionRecord("c", "new", 2)]
    assert snapshot.deliveries == [delivery("c", 2, 2)]
    assert snapshot.incoming_qos2 == []
    assert set(snapshot.messages) == {2}


async def test_later_records_win_within_a_batch(backend: Backend) -> None:
    await apply_all(backend.store, [[
        SessionSaved(session("c", expiry_interval=1)),
        SessionSaved(session("c", expiry_interval=2, disconnected_at=5.5)),
        SubscriptionSaved(SubscriptionRecord("c", "f", 0)),
        SubscriptionDeleted("c", "f"),
        SubscriptionSaved(SubscriptionRecord("c", "f", 2, no_local=True)),
        SubscriptionSaved(SubscriptionRecord("c", "g", 1)),
        SubscriptionDeleted("c", "g"),
        MessageSaved(message(1, payload=b"first")),
        MessageSaved(message(1, payload=b"second")),
        MessageSaved(message(2)),
        DeliverySaved(delivery("c", 1, 1)),
        DeliverySaved(delivery("c", 1, 1, qos=2, packet_id=3, state=AWAIT_ACK)),
        DeliverySaved(delivery("c", 1, 1, qos=2, packet_id=3, state=AWAIT_COMP, dup=True)),
        DeliverySaved(delivery("c", 2, 2)),
        DeliveryDeleted("c", 2),  # saved and deleted: never there
        Qos2Received("c", 1), Qos2Released("c", 1), Qos2Received("c", 2),
        RetainedSaved("r", 1), RetainedSaved("r", 2), RetainedDeleted("r"),
        RetainedSaved("s", 2), RetainedDeleted("s"), RetainedSaved("s", 1),
    ]])
    snapshot = await backend.reopen()
    assert snapshot.sessions == [session("c", expiry_interval=2, disconnected_at=5.5)]
    assert snapshot.subscriptions == [SubscriptionRecord("c", "f", 2, no_local=True)]
    assert snapshot.deliveries == [
        delivery("c", 1, 1, qos=2, packet_id=3, state=AWAIT_COMP, dup=True)]
    assert snapshot.messages == {1: message(1, payload=b"second")}
    assert snapshot.incoming_qos2 == [("c", 2)]
    assert snapshot.retained == {"s": 1}


async def test_later_batches_win_across_batches(backend: Backend) -> None:
    batches: list[list[Change]] = [
        [MessageSaved(message(1)), DeliverySaved(delivery("c", 1, 1))],
        [DeliverySaved(delivery("c", 1, 1, packet_id=1, state=AWAIT_ACK))],
        [DeliveryDeleted("c", 1), MessageSaved(message(2)), DeliverySaved(delivery("c", 2, 2))],
        [Qos2Received("c", 7)],
        [Qos2Released("c", 7)],
    ]
    await apply_all(backend.store, batches)
    snapshot = await backend.reopen()
    assert snapshot.deliveries == [delivery("c", 2, 2)]
    assert set(snapshot.messages) == {2}
    assert snapshot.incoming_qos2 == []


async def test_saving_a_stored_body_again_replaces_it(backend: Backend) -> None:
    await apply_all(backend.store, [[MessageSaved(message(1)), DeliverySaved(delivery("c", 1, 1)),
                                     MessageSaved(message(2)), DeliverySaved(delivery("c", 2, 2))]])
    # Saved again in later groups, with nothing new referring to them.
    await apply_all(backend.store, [[MessageSaved(message(2, payload=b"new 2"))]])
    await apply_all(backend.store, [[MessageSaved(message(1, payload=b"new 1"))]])
    snapshot = await backend.reopen()
    assert snapshot.messages == {1: message(1, payload=b"new 1"), 2: message(2, payload=b"new 2")}


async def test_repointed_delivery_whose_old_body_is_already_going(backend: Backend) -> None:
    """Regression: two ways of dropping the same body's references in one transaction."""
    await apply_all(backend.store, [[MessageSaved(message(1)), MessageSaved(message(2)),
                                     DeliverySaved(delivery("c", 1, 1)),
                                     DeliverySaved(delivery("c", 2, 1)),
                                     DeliverySaved(delivery("c", 3, 1)),
                                     DeliverySaved(delivery("c", 4, 2))]])
    await apply_all(backend.store, [[DeliveryDeleted("c", 1),
                                     DeliverySaved(delivery("c", 2, 2)),
                                     DeliverySaved(delivery("c", 3, 2))]])
    snapshot = await backend.reopen()
    assert snapshot.deliveries == [delivery("c", 2, 2), delivery("c", 3, 2),
                                   delivery("c", 4, 2)]
    assert set(snapshot.messages) == {2}


async def test_shared_body_pruned_after_last_reference(backend: Backend) -> None:
    body = message(1, payload=b"x" * 1000)
    await apply_all(backend.store, [[MessageSaved(body), DeliverySaved(delivery("a", 1, 1)),
                                     DeliverySaved(delivery("b", 2, 1))]])
    await apply_all(backend.store, [[DeliveryDeleted("a", 1)]])
    snapshot = await backend.reopen()
    assert snapshot.messages == {1: body}
    assert snapshot.deliveries == [delivery("b", 2, 1)]
    await apply_all(backend.store, [[DeliveryDeleted("b", 2)]])
    snapshot = await backend.reopen()
    assert snapshot.messages == {}
    assert snapshot.retained == {}
    assert snapshot.deliveries == []


async def test_body_referenced_again_in_the_same_group_survives(backend: Backend) -> None:
    """The last reference dropped and a new one made in later batches of the same group."""
    await apply_all(backend.store, [[MessageSaved(message(1)), DeliverySaved(delivery("a", 1, 1))]])
    await apply_all(backend.store, [
        [DeliveryDeleted("a", 1), DeliverySaved(delivery("b", 2, 1))],
        [SessionDeleted("b"), DeliverySaved(delivery("c", 3, 1))],
    ])
    snapshot = await backend.reopen()
    assert snapshot.deliveries == [delivery("c", 3, 1)]
    assert snapshot.messages == {1: message(1)}


async def test_retained_keeps_its_body(backend: Backend) -> None:
    m1, m2 = message(1, "r/1", b"v1", retain=True), message(2, "r/1", b"v2", retain=True)
    await apply_all(backend.store, [[MessageSaved(m1), RetainedSaved("r/1", 1)]])
    assert (await backend.reopen()).retained == {"r/1": 1}
    assert (await backend.reopen()).messages == {1: m1}
    # Replacing the retained message drops the old body, keeps the new one.
    await apply_all(backend.store, [[MessageSaved(m2), RetainedSaved("r/1", 2)]])
    snapshot = await backend.reopen()
    assert snapshot.retained == {"r/1": 2}
    assert snapshot.messages == {2: m2}
    # A retained body that a delivery also uses survives clearing the retained entry.
    await apply_all(backend.store, [[DeliverySaved(delivery("c", 1, 2, retain=True))]])
    await apply_all(backend.store, [[RetainedDeleted("r/1")]])
    snapshot = await backend.reopen()
    assert snapshot.retained == {}
    assert snapshot.messages == {2: m2}
    await apply_all(backend.store, [[DeliveryDeleted("c", 1)]])
    assert (await backend.reopen()).messages == {}


async def test_incoming_qos2(backend: Backend) -> None:
    await apply_all(backend.store, [
        [Qos2Received("a", 1), Qos2Received("a", 65535), Qos2Received("b", 1)],
        [Qos2Received("a", 1)],  # again: still once
    ])
    assert (await backend.reopen()).incoming_qos2 == [("a", 1), ("a", 65535), ("b", 1)]
    await apply_all(backend.store, [[Qos2Released("a", 1), Qos2Released("c", 3)]])
    assert (await backend.reopen()).incoming_qos2 == [("a", 65535), ("b", 1)]


async def test_properties_and_wills_round_trip_exactly(backend: Backend) -> None:
    wills = {
        "full": Will("will/\u00e9", b"\x00bye\xff", 2, True, WILL_PROPERTIES),
        "bare": Will("w", b"", 0, False),
        "user": Will("w2", b"x", 1, False, Properties(user_properties=(("a", "b"),))),
    }
    messages = [
        message(1, "m/\U0001f600", b"\x00\x01\x02", qos=2, retain=True,
                properties=MESSAGE_PROPERTIES, received_at=1_700_000_000.123456,
                expires_at=1_700_003_600.5, origin="publisher-\u00e9"),
        message(2, "m/empty", b"", qos=0, properties=Properties(correlation_data=b""),
                received_at=0.0, expires_at=None, origin=""),
        message(3, "m", b"p", properties=Properties(content_type="")),
    ]
    changes: list[Change] = [SessionSaved(session(cid, will=will, disconnected_at=12.25))
                             for cid, will in wills.items()]
    changes += [MessageSaved(m) for m in messages]
    changes += [
        DeliverySaved(delivery("full", 1, 1, qos=2, retain=True, subscription_ids=(1, 268_435_455),
                               packet_id=65535, state=AWAIT_COMP, dup=True)),
        DeliverySaved(delivery("bare", 2, 2, qos=0, state=QUEUED)),
        DeliverySaved(delivery("user", 3, 3, subscription_ids=(7,), packet_id=1,
                               state=AWAIT_ACK)),
        SubscriptionSaved(SubscriptionRecord("full", "$share/g/a/+/#", 2, no_local=True,
                                             retain_as_published=True, retain_handling=2,
                                             subscription_id=268_435_455)),
        SubscriptionSaved(SubscriptionRecord("bare", "#", 0)),
    ]
    await apply_all(backend.store, [changes])
    snapshot = await backend.reopen()
    assert {s.client_id: s.will for s in snapshot.sessions} == wills
    assert all(s.disconnected_at == 12.25 for s in snapshot.sessions)
    assert snapshot.messages == {m.id: m for m in messages}
    assert snapshot.messages[1].properties == MESSAGE_PROPERTIES
    assert snapshot.messages[2].properties.correlation_data == b""
    assert snapshot.messages[3].properties.content_type == ""
    assert snapshot.messages[2].properties.content_type is None
    assert normalized(snapshot)[3] == sorted(
        (c.record for c in changes if isinstance(c, DeliverySaved)),
        key=lambda d: d.delivery_id)
    assert sorted(snapshot.subscriptions, key=lambda s: s.client_id) == [
        SubscriptionRecord("bare", "#", 0),
        SubscriptionRecord("full", "$share/g/a/+/#", 2, True, True, 2, 268_435_455)]
    # Types, not only equality: bytes stay bytes, tuples stay tuples, bools stay bools.
    full = snapshot.messages[1]
    assert type(full.payload) is bytes and type(full.retain) is bool
    assert type(full.properties.user_properties) is tuple
    assert all(type(p) is tuple for p in full.properties.user_properties)
    assert type(full.properties.subscription_identifiers) is tuple


async def test_futures_resolve_in_order_and_after_commit(backend: Backend) -> None:
    resolved: list[tuple[int, bool]] = []

    def on_done(index: int, _: object) -> None:
        resolved.append((index, f"c{index}" in backend.committed_sessions()))

    futures = []
    for i in range(30):
        batch: list[Change] = [SessionSaved(session(f"c{i}"))]
        if i % 3 == 0:
            batch += [MessageSaved(message(i + 1, payload=bytes(2000))),
                      DeliverySaved(delivery(f"c{i}", i + 1, i + 1))]
        future = asyncio.ensure_future(backend.store.apply(batch))
        future.add_done_callback(functools.partial(on_done, i))
        futures.append(future)
    await asyncio.gather(*futures)  # our callbacks were added first, so they have run
    assert [i for i, _ in resolved] == list(range(30))
    assert all(committed for _, committed in resolved)


async def test_empty_batch_waits_for_pending_batches(backend: Backend) -> None:
    order: list[str] = []
    big: list[Change] = [SessionSaved(session("big"))]
    for i in range(1, 200):
        big += [MessageSaved(message(i, payload=bytes(500))), DeliverySaved(delivery("big", i, i))]
    first = asyncio.ensure_future(backend.store.apply(big))
    empty = asyncio.ensure_future(backend.store.apply([]))
    first.add_done_callback(lambda _: order.append("first"))
    empty.add_done_callback(
        lambda _: order.append("empty" if "big" in backend.committed_sessions() else "EARLY"))
    await asyncio.gather(first, empty)
    assert order == ["first", "empty"]
    # With nothing pending, an empty batch resolves at once.
    await asyncio.wait_for(_awaited(backend.store.apply([])), 5)


async def _awaited(waiter: Awaitable[None]) -> None:
    await waiter


# --------------------------------------------------------------------------- property test
#
# Random sequences of valid change batches, applied to MemoryStore and to SqliteStore (with
# and without waiting between batches, so groups of different sizes are coalesced), give the
# same snapshot. "Valid" is the contract's one rule about bodies: a delivery or retained entry
# refers to a body saved in the same batch or referenced at the end of the previous batch.

# MQTT strings: no surrogates, no U+0000 [MQTT-1.5.4-1], [MQTT-1.5.4-2] (5.0).
_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                max_size=6)
_topic = st.sampled_from(["t", "t/1", "a/b/\u00e9", "$SYS/x", "/"])
_INT_RANGES = {
    PropertyType.BYTE: (0, 1),  # every byte property is 0 or 1, e.g. 3.3.2.3.2 (5.0)
    PropertyType.TWO_BYTE_INTEGER: (0, 65535),
    PropertyType.FOUR_BYTE_INTEGER: (0, 0xFFFFFFFF),
    PropertyType.VARIABLE_BYTE_INTEGER: (1, 268_435_455),
}


def _property_value(ptype: PropertyType, attribute: str) -> st.SearchStrategy[Any]:
    if attribute == "subscription_identifiers":
        return st.lists(st.integers(1, 268_435_455), max_size=3).map(tuple)
    if attribute == "user_properties":
        return st.lists(st.tuples(_text, _text), max_size=3).map(tuple)
    if ptype is PropertyType.BINARY_DATA:
        return st.none() | st.binary(max_size=8)
    if ptype is PropertyType.UTF8_STRING:
        return st.none() | _text
    low, high = _INT_RANGES[ptype]
    return st.none() | st.integers(low, high)


def _properties(allowed: Iterable[str]) -> st.SearchStrategy[Properties]:
    return st.just(NO_PROPERTIES) | st.builds(
        Properties, **{spec.attribute: _property_value(spec.type, spec.attribute)
                       for spec in PROPERTY_TABLE.values() if spec.attribute in allowed})


properties_strategy = _properties(validate.MESSAGE_PROPERTIES)
_time = st.floats(min_value=0, max_value=4e9, allow_nan=False)
will_strategy = st.none() | st.builds(Will, _topic, st.binary(max_size=8), st.integers(0, 2),
                                      st.booleans(), _properties(validate.WILL_PROPERTIES))

CLIENTS = ["a", "b", "c"]
TOPICS = ["t/1", "t/2"]


@dataclass
class _Model:
    deliveries: dict[tuple[str, int], int] = field(default_factory=dict)  # key -> message id
    retained: dict[str, int] = field(default_factory=dict)
    next_message: int = 1
    next_delivery: int = 1

    def live(self) -> set[int]:
        return set(self.deliveries.values()) | set(self.retained.values())


@st.composite
def change_batches(draw: st.DrawFn) -> list[list[Change]]:
    model = _Model()
    batches: list[list[Change]] = []
    for _ in range(draw(st.integers(1, 8))):
        usable = model.live()
        batch: list[Change] = []
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(st.sampled_from([
                "message", "message", "resave", "delivery", "delivery", "update", "delete",
                "delete", "session", "session_delete", "subscribe", "unsubscribe",
                "qos2", "qos2_release", "retain", "unretain"]))
            cid = draw(st.sampled_from(CLIENTS))
            if kind == "message" or (kind == "resave" and usable):
                if kind == "message":
                    mid = model.next_message
                    model.next_message += 1
                else:
                    mid = draw(st.sampled_from(sorted(usable)))
                batch.append(MessageSaved(Message(
                    mid, draw(_topic), draw(st.binary(max_size=16)), draw(st.integers(0, 2)),
                    draw(st.booleans()), draw(properties_strategy), draw(_time),
                    draw(st.none() | _time), draw(_text))))
                usable.add(mid)
            elif kind in ("delivery", "update") and usable:
                if kind == "update" and model.deliveries:
                    cid, did = draw(st.sampled_from(sorted(model.deliveries)))
                elif draw(st.booleans()):
                    did = model.next_delivery
                    model.next_delivery += 1
                else:  # any id: the key is (client, id), ids need not grow
                    did = draw(st.integers(1, model.next_delivery))
                mid = draw(st.sampled_from(sorted(usable)))
                # As the core writes them: a sent state only at QoS 1/2 (PUBREL sent only at
                # QoS 2), one packet id per inflight delivery of a client.
                qos = draw(st.integers(0, 2))
                state = draw(st.integers(0, qos)) if qos else QUEUED
                packet_id = did % 65535 + 1 if state != QUEUED or draw(st.booleans()) else None
                batch.append(DeliverySaved(DeliveryRecord(
                    cid, did, mid, qos, draw(st.booleans()),
                    draw(st.lists(st.integers(1, 268_435_455), max_size=2).map(tuple)),
                    packet_id if qos else None, state, draw(st.booleans()))))
                model.deliveries[(cid, did)] = mid
            elif kind == "delete":
                existing = draw(st.booleans())
                if model.deliveries and existing:
                    cid, did = draw(st.sampled_from(sorted(model.deliveries)))
                else:
                    did = draw(st.integers(1, model.next_delivery + 1))
                batch.append(DeliveryDeleted(cid, did))
                model.deliveries.pop((cid, did), None)
            elif kind == "session":
                batch.append(SessionSaved(SessionRecord(
                    cid, draw(st.sampled_from([3, 4, 5])),
                    draw(st.integers(0, EXPIRY_NEVER)), draw(will_strategy),
                    draw(st.none() | _time))))
            elif kind == "session_delete":
                batch.append(SessionDeleted(cid))
                model.deliveries = {k: v for k, v in model.deliveries.items() if k[0] != cid}
            elif kind == "subscribe":
                batch.append(SubscriptionSaved(SubscriptionRecord(
                    cid, draw(st.sampled_from(["#", "a/+", "$share/g/x"])),
                    draw(st.integers(0, 2)), draw(st.booleans()), draw(st.booleans()),
                    draw(st.integers(0, 2)), draw(st.none() | st.integers(1, 268_435_455)))))
            elif kind == "unsubscribe":
                batch.append(SubscriptionDeleted(cid, draw(st.sampled_from(["#", "a/+"]))))
            elif kind == "qos2":
                batch.append(Qos2Received(cid, draw(st.integers(1, 3))))
            elif kind == "qos2_release":
                batch.append(Qos2Released(cid, draw(st.integers(1, 3))))
            elif kind == "retain" and usable:
                topic = draw(st.sampled_from(TOPICS))
                mid = draw(st.sampled_from(sorted(usable)))
                batch.append(RetainedSaved(topic, mid))
                model.retained[topic] = mid
            elif kind == "unretain":
                topic = draw(st.sampled_from(TOPICS))
                batch.append(RetainedDeleted(topic))
                model.retained.pop(topic, None)
        batches.append(batch)
    return batches


async def _run_both(batches: list[list[Change]], waits: list[bool], reopen_at: int) -> None:
    memory = MemoryStore()
    await memory.open()
    for batch in batches:
        await memory.apply(batch)
    expected = normalized(await memory.open())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.db"
        store = SqliteStore(path, durability="os", ballast_bytes=0)
        try:
            await store.open()
            pending: list[Awaitable[None]] = []
            for i, (batch, wait) in enumerate(zip(batches, waits, strict=False)):
                if i == reopen_at:  # a restart in the middle
                    for waiter in pending:
                        await waiter
                    pending = []
                    await store.close()
                    store = SqliteStore(path, durability="os", ballast_bytes=0)
                    await store.open()
                pending.append(store.apply(batch))
                if wait:
                    for waiter in pending:
                        await waiter
                    pending = []
            for waiter in pending:
                await waiter
            await store.close()
            store = SqliteStore(path, durability="os", ballast_bytes=0)
            got = normalized(await store.open())
        finally:
            await store.close()  # also after a failure: no leaked thread or open file
    assert got == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=change_batches(), waits=st.lists(st.booleans(), min_size=8, max_size=8),
       reopen_at=st.integers(0, 10))
def test_random_changes_give_the_same_snapshot_as_memory(
        batches: list[list[Change]], waits: list[bool], reopen_at: int) -> None:
    asyncio.run(_run_both(batches, waits + [False] * len(batches), reopen_at))

