"""Retained messages, one per topic, looked up by topic filter.

A filter with wildcards is matched against a tree of topic levels, not against every
retained topic: its cost follows the topics it matches (and the `+` levels it fans out on),
not how many are retained. A SUBSCRIBE of many such filters with tens of thousands of
retained messages scanned them all per filter, holding up every other client. The matches
come in the order their topics were first retained, as before.
"""

from __future__ import annotations

from collections.abc import Iterator

from .changes import Message


def _has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class _Level:
    """One topic level of the tree: its child levels by name, and its retained topic if a
    retained topic ends here."""

    __slots__ = ("children", "topic")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.topic: str | None = None


class RetainStore:
    def __init__(self) -> None:
        self._by_topic: dict[str, Message] = {}
        self._order: dict[str, int] = {}  # topic -> when it was first retained
        self._next = 0
        self._root = _Level()

    def __len__(self) -> int:
        return len(self._by_topic)

    def set(self, message: Message) -> None:
        topic = message.topic
        if topic not in self._by_topic:
            node = self._root
            for name in topic.split("/"):
                child = node.children.get(name)
                if child is None:
                    child = node.children[name] = _Level()
                node = child
            node.topic = topic
            self._order[topic] = self._next
            self._next += 1
        self._by_topic[topic] = message

    def clear(self, topic: str) -> bool:
        if self._by_topic.pop(topic, None) is None:
            return False
        del self._order[topic]
        path = [self._root]
        names = topic.split("/")
        for name in names:
            path.append(path[-1].children[name])
        path[-1].topic = None
        for depth in range(len(names), 0, -1):  # drop the levels left empty
            node = path[depth]
            if node.children or node.topic is not None:
                break
            del path[depth - 1].children[names[depth - 1]]
        return True

    def get(self, topic: str) -> Message | None:
        return self._by_topic.get(topic)

    def matching(self, topic_filter: str) -> Iterator[Message]:
        """Retained messages whose topic matches the filter (expired ones included)."""
        if not _has_wildcard(topic_filter):
            message = self._by_topic.get(topic_filter)
            if message is not None:
                yield message
            return
        topics = self._match(topic_filter.split("/"))
        order = self._order
        topics.sort(key=lambda topic: order[topic])
        by_topic = self._by_topic
        for topic in topics:
            message = by_topic.get(topic)  # cleared meanwhile: skipped
            if message is not None:
                yield message

    def _match(self, levels: list[str]) -> list[str]:
        found: list[str] = []
        last = len(levels)
        stack: list[tuple[_Level, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.topic is not None:
                    found.append(node.topic)
                continue
            level = levels[depth]
            if level == "#":
                # The parent level itself ("a/#" matches "a"), then everything below it;
                # neither '#' nor '+' first matches a topic starting with '$' [MQTT-4.7.2-1].
                if depth and node.topic is not None:
                    found.append(node.topic)
                self._below(node, depth == 0, found)
            elif level == "+":
                for name, child in node.children.items():
                    if depth or not name.startswith("$"):
                        stack.append((child, depth + 1))
            else:
                named = node.children.get(level)
                if named is not None:
                    stack.append((named, depth + 1))
        return found

    @staticmethod
    def _below(node: _Level, top: bool, found: list[str]) -> None:
        """Every retained topic under `node` (at the top level, none starting with '$')."""
        stack = [child for name, child in node.children.items()
                 if not (top and name.startswith("$"))]
        while stack:
            child = stack.pop()
            if child.topic is not None:
                found.append(child.topic)
            stack.extend(child.children.values())

    def expired(self, now: float) -> list[str]:
        return [t for t, m in self._by_topic.items()
                if m.expires_at is not None and m.expires_at <= now]

    def messages(self) -> Iterator[Message]:
        return iter(self._by_topic.values())
