"""In-memory stores: `MemoryStore` keeps every record (contract tests, restarts inside one
process); `NullStore` keeps nothing (persistence = "memory", where the core is the state).

`MemoryStore` survives a restart of the broker object inside one process, not a restart of
the process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

from ..core.changes import (
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
from .base import DONE


class MemoryStore:
    full = False

    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.subscriptions: dict[tuple[str, str], SubscriptionRecord] = {}
        self.messages: dict[int, Message] = {}
        self.deliveries: dict[tuple[str, int], DeliveryRecord] = {}
        self.retained: dict[str, int] = {}
        self.incoming_qos2: set[tuple[str, int]] = set()

    async def open(self) -> Snapshot:
        self._prune_messages()
        return Snapshot(
            sessions=list(self.sessions.values()),
            subscriptions=list(self.subscriptions.values()),
            messages=dict(self.messages),
            deliveries=sorted(self.deliveries.values(), key=lambda d: d.delivery_id),
            retained=dict(self.retained),
            incoming_qos2=sorted(self.incoming_qos2),
        )

    def apply(self, changes: Sequence[Change]) -> Awaitable[None]:
        for change in changes:
            self._apply_one(change)
        return DONE

    async def close(self) -> None:
        return None

    def _apply_one(self, change: Change) -> None:
        match change:
            case SessionSaved(record):
                self.sessions[record.client_id] = record
            case SessionDeleted(client_id):
                self.sessions.pop(client_id, None)
                for key in [k for k in self.subscriptions if k[0] == client_id]:
                    del self.subscriptions[key]
                for dkey in [k for k in self.deliveries if k[0] == client_id]:
                    del self.deliveries[dkey]
                self.incoming_qos2 = {q for q in self.incoming_qos2 if q[0] != client_id}
            case SubscriptionSaved(record):
                self.subscriptions[(record.client_id, record.topic_filter)] = record
            case SubscriptionDeleted(client_id, topic_filter):
                self.subscriptions.pop((client_id, topic_filter), None)
            case MessageSaved(message):
                self.messages[message.id] = message
            case DeliverySaved(record):
                self.deliveries[(record.client_id, record.delivery_id)] = record
            case DeliveryDeleted(client_id, delivery_id):
                self.deliveries.pop((client_id, delivery_id), None)
            case Qos2Received(client_id, packet_id):
                self.incoming_qos2.add((client_id, packet_id))
            case Qos2Released(client_id, packet_id):
                self.incoming_qos2.discard((client_id, packet_id))
            case RetainedSaved(topic, message_id):
                self.retained[topic] = message_id
            case RetainedDeleted(topic):
                self.retained.pop(topic, None)

    def _prune_messages(self) -> None:
        """Drop bodies no delivery and no retained entry refers to."""
        used = {d.message_id for d in self.deliveries.values()} | set(self.retained.values())
        for message_id in [m for m in self.messages if m not in used]:
            del self.messages[message_id]


class NullStore:
    """persistence = "memory": the core's own state is all there is; nothing is recorded."""

    full = False

    async def open(self) -> Snapshot:
        return Snapshot.empty()

    def apply(self, changes: Sequence[Change]) -> Awaitable[None]:
        return DONE

    async def close(self) -> None:
        return None
