"""The subscription trie.

Theory of operation: a topic filter is split on "/" and walked down a trie of levels; the node
at the end holds the subscribers of that exact filter (client id -> subscription record) and
the shared-subscription groups on it (group name -> `SharedGroup`). `match(topic)` walks the
topic's levels with a small frontier of nodes: at each level a node contributes its literal
child and its "+" child to the next frontier, and its "#" child matches at once. Topics
starting with "$" are not matched by a "+" or "#" in the first level [MQTT-4.7.2-1]. A "#"
also matches the parent level ("sport/#" matches "sport") [MQTT-4.7.1-2] (3.1.1 numbering).

Publishing is far more frequent than subscribing, and gateways see the same topics again and
again, so `match` results are cached per topic; any subscribe or unsubscribe clears the cache.
Callers must treat the returned lists as read-only.

The router knows nothing of sessions: choosing a member of a shared group is the core's job,
which passes in who is online.
"""

from __future__ import annotations

from collections.abc import Callable

from .changes import SubscriptionRecord


class SharedGroup:
    """The members of one `$share/{name}/{filter}` group, picked round-robin."""

    __slots__ = ("_next", "members", "name", "topic_filter")

    def __init__(self, name: str, topic_filter: str) -> None:
        self.name = name
        self.topic_filter = topic_filter
        self.members: dict[str, SubscriptionRecord] = {}
        self._next = 0

    def pick(self, is_online: Callable[[str], bool]) -> SubscriptionRecord | None:
        """Next member in rotation, preferring online members; None for an empty group."""
        members = list(self.members.values())
        count = len(members)
        if count == 0:
            return None
        start = self._next % count
        for step in range(count):
            candidate = members[(start + step) % count]
            if is_online(candidate.client_id):
                self._next = start + step + 1
                return candidate
        # Nobody online: queue in the next persistent member's session.
        self._next = start + 1
        return members[start]


class _Node:
    __slots__ = ("children", "shared", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: dict[str, SubscriptionRecord] = {}
        self.shared: dict[str, SharedGroup] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.subscribers or self.shared)


MATCH_CACHE_SIZE = 4096  # topics whose match results are kept between subscription changes
# ... and the subscriptions those results hold in all: a topic that thousands of filters match
# (one client can hold them) would otherwise keep thousands of references per cached topic.
MATCH_CACHE_RECORDS = 1 << 18

Matches = tuple[list[SubscriptionRecord], list[SharedGroup]]
# A topic's non-shared subscriptions merged per client (`Router.merged`): client id, highest
# QoS, retain as published by any, every subscription identifier.
Merged = list[tuple[str, int, bool, tuple[int, ...]]]


class Router:
    def __init__(self) -> None:
        self._root = _Node()
        self.count = 0  # subscriptions held, shared members included
        self.shared_count = 0  # ... of which shared ($share/...) members
        self._cache: dict[str, Matches] = {}
        self._cached_records = 0  # subscriptions and groups the cached results hold
        self.last_match_size = 0  # of the last `match`: what a publish to it costs (fairness)
        # topic -> (the `match` list it was merged from, the merge or None): `merged`
        self._merged: dict[str, tuple[list[SubscriptionRecord], Merged | None]] = {}

    def subscribe(self, record: SubscriptionRecord, topic_filter: str,
                  group: str | None = None) -> bool:
        """Add or replace a subscription. `topic_filter` excludes any `$share/{group}/` prefix.

        Returns True when the client already had this subscription (it is replaced).
        """
        self._cache.clear()
        self._cached_records = 0
        self._merged.clear()
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if group is None:
            holders = node.subscribers
        else:
            shared = node.shared.get(group)
            if shared is None:
                shared = node.shared[group] = SharedGroup(group, topic_filter)
            holders = shared.members
        existed = record.client_id in holders
        holders[record.client_id] = record
        if not existed:
            self.count += 1
            if group is not None:
                self.shared_count += 1
        return existed

    def unsubscribe(self, client_id: str, topic_filter: str, group: str | None = None) -> bool:
        """Remove a subscription; returns whether it existed. Empty nodes are pruned."""
        self._cache.clear()
        self._cached_records = 0
        self._merged.clear()
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if group is None:
            removed = node.subscribers.pop(client_id, None) is not None
        else:
            shared = node.shared.get(group)
            removed = shared is not None and shared.members.pop(client_id, None) is not None
            if shared is not None and not shared.members:
                del node.shared[group]
        if not removed:
            return False
        self.count -= 1
        if group is not None:
            self.shared_count -= 1
        for parent, level in reversed(path):
            if not node.is_empty():
                break
            del parent.children[level]
            node = parent
        return True

    def match(self, topic: str) -> Matches:
        """Every non-shared subscription and every shared group whose filter matches `topic`.

        The lists are shared with the cache: do not modify them."""
        cached = self._cache.get(topic)
        if cached is not None:
            self.last_match_size = len(cached[0]) + len(cached[1])
            return cached
        result = self._match(topic)
        size = self.last_match_size = len(result[0]) + len(result[1])
        if (len(self._cache) >= MATCH_CACHE_SIZE
                or self._cached_records + size > MATCH_CACHE_RECORDS):
            self._cache.clear()
            self._merged.clear()  # (it holds the same lists)
            self._cached_records = 0
        self._cache[topic] = result
        self._cached_records += size
        return result

    def merged(self, topic: str, normal: list[SubscriptionRecord]) -> Merged | None:
        """`normal`, the non-shared subscriptions `match(topic)` returned, merged into one
        entry per client, in the order of their first subscription: the highest QoS, retain
        as published if any says so, every subscription identifier [MQTT-3.3.5-1] (3.1.1),
        3.3.4 (5.0). None when one of them has No Local: the merge then depends on the
        publisher [MQTT-3.8.3-3] (5.0). Cached with `match` (a publish to 10 sessions made
        this merge for every message); read-only."""
        cached = self._merged.get(topic)
        if cached is not None and cached[0] is normal:
            return cached[1]
        result: Merged | None = None
        if not any(record.no_local for record in normal):
            per_client: dict[str, tuple[int, bool, tuple[int, ...]]] = {}
            for record in normal:
                ids: tuple[int, ...] = ((record.subscription_id,) if record.subscription_id
                                        else ())
                seen = per_client.get(record.client_id)
                if seen is None:
                    per_client[record.client_id] = (record.qos, record.retain_as_published, ids)
                else:
                    per_client[record.client_id] = (
                        max(seen[0], record.qos), seen[1] or record.retain_as_published,
                        seen[2] + ids)
            result = [(client_id, *entry) for client_id, entry in per_client.items()]
        if len(self._merged) >= MATCH_CACHE_SIZE:
            self._merged.clear()
        self._merged[topic] = (normal, result)
        return result

    def _match(self, topic: str) -> Matches:
        found: list[SubscriptionRecord] = []
        groups: list[SharedGroup] = []
        levels = topic.split("/")
        frontier = [self._root]
        # [MQTT-4.7.2-1]: no wildcard at the first level matches a "$" topic.
        wild_ok = not topic.startswith("$")
        last = len(levels) - 1
        for depth, level in enumerate(levels):
            following: list[_Node] = []
            for node in frontier:
                children = node.children
                if not children:
                    continue
                if wild_ok or depth:
                    multi = children.get("#")
                    if multi is not None:
                        if multi.subscribers:
                            found.extend(multi.subscribers.values())
                        if multi.shared:
                            groups.extend(multi.shared.values())
                    single = children.get("+")
                    if single is not None:
                        following.append(single)
                exact = children.get(level)
                if exact is not None:
                    following.append(exact)
            if not following:
                return found, groups
            if depth == last:
                for node in following:
                    if node.subscribers:
                        found.extend(node.subscribers.values())
                    if node.shared:
                        groups.extend(node.shared.values())
                    multi = node.children.get("#") if node.children else None
                    if multi is not None:
                        found.extend(multi.subscribers.values())
                        groups.extend(multi.shared.values())
            frontier = following
        return found, groups
