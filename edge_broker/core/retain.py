"""Retained messages, one per topic, looked up by topic filter."""

from __future__ import annotations

from collections.abc import Iterator

from ..mqtt.topics import topic_matches
from .changes import Message


def _has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class RetainStore:
    def __init__(self) -> None:
        self._by_topic: dict[str, Message] = {}

    def __len__(self) -> int:
        return len(self._by_topic)

    def set(self, message: Message) -> None:
        self._by_topic[message.topic] = message

    def clear(self, topic: str) -> bool:
        return self._by_topic.pop(topic, None) is not None

    def get(self, topic: str) -> Message | None:
        return self._by_topic.get(topic)

    def matching(self, topic_filter: str) -> Iterator[Message]:
        """Retained messages whose topic matches the filter (expired ones included)."""
        if not _has_wildcard(topic_filter):
            message = self._by_topic.get(topic_filter)
            if message is not None:
                yield message
            return
        for topic, message in list(self._by_topic.items()):
            if topic_matches(topic_filter, topic):
                yield message

    def expired(self, now: float) -> list[str]:
        return [t for t, m in self._by_topic.items()
                if m.expires_at is not None and m.expires_at <= now]

    def messages(self) -> Iterator[Message]:
        return iter(self._by_topic.values())
