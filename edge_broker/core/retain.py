"""Retained messages, one per topic, looked up by topic filter.

A filter with wildcards is matched against a tree of topic levels, not against every
retained topic: its cost follows the topics it matches (and the `+` levels it fans out on),
not how many are retained. A SUBSCRIBE of many such filters with tens of thousands of
retained messages scanned them all per filter, holding up every other client. The matches
come in the order their topics were first retained, as before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from .changes import Message


def _has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def _seq(node: _Level) -> int:
    return node.seq


class _Level:
    """One topic level of the tree: its child levels (None: none; one: a (name, level) pair;
    more: a dict by name - most levels have one child, and a dict each would cost several
    times what the tree saves), and its retained topic with when it was first retained, if a
    retained topic ends here."""

    __slots__ = ("children", "seq", "topic")

    def __init__(self) -> None:
        self.children: dict[str, _Level] | tuple[str, _Level] | None = None
        self.topic: str | None = None
        self.seq = 0

    def child(self, name: str) -> _Level | None:
        children = self.children
        if children is None:
            return None
        if isinstance(children, tuple):
            return children[1] if children[0] == name else None
        return children.get(name)

    def items(self) -> list[tuple[str, _Level]]:
        children = self.children
        if children is None:
            return []
        if isinstance(children, tuple):
            return [children]
        return list(children.items())

    def add(self, name: str, child: _Level) -> None:
        children = self.children
        if children is None:
            self.children = (sys.intern(name), child)
        elif isinstance(children, tuple):
            self.children = {children[0]: children[1], sys.intern(name): child}
        else:
            children[sys.intern(name)] = child

    def remove(self, name: str) -> None:
        children = self.children
        if isinstance(children, tuple):
            self.children = None
        elif children is not None:
            del children[name]
            if len(children) == 1:
                self.children = next(iter(children.items()))


class RetainStore:
    def __init__(self) -> None:
        self._by_topic: dict[str, Message] = {}
        self._next = 0
        self._root = _Level()

    def __len__(self) -> int:
        return len(self._by_topic)

    def set(self, message: Message) -> None:
        topic = message.topic
        if topic not in self._by_topic:
            node = self._root
            for name in topic.split("/"):
                child = node.child(name)
                if child is None:
                    child = _Level()
                    node.add(name, child)
                node = child
            node.topic = topic
            node.seq = self._next
            self._next += 1
        self._by_topic[topic] = message

    def clear(self, topic: str) -> bool:
        if self._by_topic.pop(topic, None) is None:
            return False
        path = [self._root]
        names = topic.split("/")
        for name in names:
            child = path[-1].child(name)
            assert child is not None
            path.append(child)
        path[-1].topic = None
        for depth in range(len(names), 0, -1):  # drop the levels left empty
            node = path[depth]
            if node.children is not None or node.topic is not None:
                break
            path[depth - 1].remove(names[depth - 1])
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
        found = self._match(topic_filter.split("/"))
        found.sort(key=_seq)
        by_topic = self._by_topic
        for node in found:
            topic = node.topic
            message = by_topic.get(topic) if topic is not None else None
            if message is not None:  # (cleared meanwhile: skipped)
                yield message

    def _match(self, levels: list[str]) -> list[_Level]:
        found: list[_Level] = []
        last = len(levels)
        stack: list[tuple[_Level, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.topic is not None:
                    found.append(node)
                continue
            level = levels[depth]
            if level == "#":
                # The parent level itself ("a/#" matches "a"), then everything below it;
                # neither '#' nor '+' first matches a topic starting with '$' [MQTT-4.7.2-1].
                if depth and node.topic is not None:
                    found.append(node)
                self._below(node, depth == 0, found)
            elif level == "+":
                for name, child in node.items():
                    if depth or not name.startswith("$"):
                        stack.append((child, depth + 1))
            else:
                named = node.child(level)
                if named is not None:
                    stack.append((named, depth + 1))
        return found

    @staticmethod
    def _below(node: _Level, top: bool, found: list[_Level]) -> None:
        """Every retained topic under `node` (at the top level, none starting with '$')."""
        stack = [child for name, child in node.items() if not (top and name.startswith("$"))]
        while stack:
            child = stack.pop()
            if child.topic is not None:
                found.append(child)
            if child.children is not None:
                stack.extend(level for _, level in child.items())

    def expired(self, now: float) -> list[str]:
        return [t for t, m in self._by_topic.items()
                if m.expires_at is not None and m.expires_at <= now]

    def messages(self) -> Iterator[Message]:
        return iter(self._by_topic.values())
