"""ACL files in mosquitto's syntax, with mosquitto's semantics.

    # comment
    topic read $SYS/#              <- before any `user` line: anonymous clients
    user alice
    topic readwrite alice/#
    topic deny alice/secret
    pattern write devices/%c/up    <- patterns apply to every client, anonymous included
    pattern read users/%u/#        <- (a pattern using %u does not apply to anonymous clients)

`topic [read|write|readwrite|deny] FILTER` and `pattern [...] FILTER`; without an access word
the rule is `readwrite`. FILTER is the rest of the line (it may contain spaces) and must be a
valid topic filter. `user NAME` starts the rules of NAME (the rest of the line); a user may
appear more than once, its rules add up.

Decision order, as mosquitto 2's default ACL check: (1) a matching `topic deny` of the client's
own section refuses; (2) a matching `topic` rule of that section granting the access allows;
(3) a matching `pattern deny` refuses; (4) a matching `pattern` granting the access allows;
(5) otherwise refused. A rule that matches but grants another access (`read` for a publish)
decides nothing. Topics starting with `$` are matched by the MQTT rules: a filter whose first
level is a wildcard does not match them ([MQTT-4.7.2-1] (5.0)).

`%c` and `%u` are replaced by the client id and the username (also inside a level, e.g.
`dev-%c`). A value containing `+`, `#` or `/`, or an empty one, could widen a rule (a client
id `a/b` would reach into `devices/a/#`): mosquitto refuses pattern access to such clients and
so do we - when any pattern uses `%c` (`%u`) and the client id (username) is unsafe, the
pattern rules grant nothing to that client (its `topic` rules still apply).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge_broker.errors import ConfigError
from edge_broker.mqtt.topics import is_valid_topic_filter, parse_shared, topic_matches

READ: Final = 1
WRITE: Final = 2
DENY: Final = 0
_ACCESS: Final = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}
_UNSAFE: Final = ("+", "#", "/")
_CACHE_SIZE: Final = 4096
_END: Final = "\x00"
_FRESH: Final = "\ufffe"  # a level no rule and no valid topic names: see _witnesses


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  # "topic" | "pattern"
    access: int
    filter: str
    line: int


class FilterSet:
    """Topic filters in a trie: does any of them match a topic? O(levels), not O(rules)."""

    __slots__ = ("_root",)

    def __init__(self, filters: list[str] | None = None) -> None:
        self._root: dict[str, Any] = {}
        for topic_filter in filters or ():
            self.add(topic_filter)

    def add(self, topic_filter: str) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            node = node.setdefault(level, {})
        node.setdefault(_END, {})  # no level can be _END: filters hold no U+0000

    def matches(self, topic: str) -> bool:
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[dict[str, Any], int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            wild_ok = not (dollar and index == 0)  # [MQTT-4.7.2-1] (5.0)
            if wild_ok and "#" in node:
                return True  # '#' matches the rest, also the parent level (4.7.1.2 (5.0))
            if index == len(levels):
                if _END in node:
                    return True
                continue
            child = node.get(levels[index])
            if child is not None:
                stack.append((child, index + 1))
            if wild_ok:
                plus = node.get("+")
                if plus is not None:
                    stack.append((plus, index + 1))
        return False


@dataclass(frozen=True, slots=True)
class _Compiled:
    """The rules that apply to one client, split by decision step."""

    topic_deny: FilterSet
    topic_read: FilterSet
    topic_write: FilterSet
    pattern_deny: FilterSet
    pattern_read: FilterSet
    pattern_write: FilterSet
    read_filters: tuple[str, ...]  # every filter granting read, for can_subscribe
    longest: int


def _substitute(topic_filter: str, client_id: str, username: str | None) -> str:
    out = topic_filter.replace("%c", client_id)
    return out.replace("%u", username) if username is not None else out


class Acl:
    def __init__(self, anonymous: list[Rule], users: dict[str, list[Rule]],
                 patterns: list[Rule], source: str = "<acl>") -> None:
        self.source = source
        self._anonymous = anonymous
        self._users = users
        self._patterns = patterns
        self._patterns_use_c = any("%c" in rule.filter for rule in patterns)
        self._patterns_use_u = any("%u" in rule.filter for rule in patterns)
        self._compiled: OrderedDict[tuple[str | None, str], _Compiled] = OrderedDict()
        self._decisions: OrderedDict[tuple[str | None, str, str, int], bool] = OrderedDict()

    # ------------------------------------------------------------------ parsing

    @classmethod
    def load(cls, path: str | Path) -> Acl:
        source = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the ACL file: {exc.strerror}", file=source) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"line {line}: not valid UTF-8", file=source) from None
        return cls.parse(text, source)

    @classmethod
    def parse(cls, text: str, source: str = "<acl>") -> Acl:
        anonymous: list[Rule] = []
        users: dict[str, list[Rule]] = {}
        patterns: list[Rule] = []
        current = anonymous
        for number, raw_line in enumerate(text.splitlines(), start=1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            keyword, rest = _split_word(line)
            if keyword == "user":
                if not rest:
                    raise ConfigError(f"line {number}: 'user' needs a username", file=source)
                current = users.setdefault(rest, [])
                continue
            if keyword not in ("topic", "pattern"):
                raise ConfigError(f"line {number}: unknown keyword {keyword!r} (expected "
                                  f"user, topic or pattern)", file=source)
            word, after = _split_word(rest)
            if word in _ACCESS:
                access, topic_filter = _ACCESS[word], after
            else:
                access, topic_filter = READ | WRITE, rest
            if not topic_filter:
                raise ConfigError(f"line {number}: {keyword} needs a topic filter", file=source)
            checked = topic_filter.replace("%c", "c").replace("%u", "u")
            if not is_valid_topic_filter(checked) or parse_shared(checked) is not None:
                raise ConfigError(f"line {number}: {topic_filter!r} is not a valid topic filter",
                                  file=source)
            if keyword == "pattern":
                patterns.append(Rule("pattern", access, topic_filter, number))
            else:
                current.append(Rule("topic", access, topic_filter, number))
        return cls(anonymous, users, patterns, source)

    @property
    def rule_count(self) -> int:
        return (len(self._anonymous) + len(self._patterns)
                + sum(len(rules) for rules in self._users.values()))

    # ------------------------------------------------------------------ compilation

    def _patterns_apply(self, username: str | None, client_id: str) -> bool:
        def unsafe(value: str) -> bool:
            return not value or any(ch in value for ch in _UNSAFE)

        if self._patterns_use_c and unsafe(client_id):
            return False
        return not (self._patterns_use_u and username is not None and unsafe(username))

    def _compile(self, username: str | None, client_id: str) -> _Compiled:
        key = (username, client_id)
        found = self._compiled.get(key)
        if found is not None:
            self._compiled.move_to_end(key)
            return found
        own = self._anonymous if username is None else self._users.get(username, [])
        patterns: list[str | None] = []
        if self._patterns_apply(username, client_id):
            for rule in self._patterns:
                if "%u" in rule.filter and username is None:
                    patterns.append(None)  # mosquitto: %u patterns skip anonymous clients
                else:
                    patterns.append(_substitute(rule.filter, client_id, username))
        else:
            patterns = [None] * len(self._patterns)
        sets = [FilterSet() for _ in range(6)]
        reads: list[str] = []
        longest = 1
        entries = [(0, rule, rule.filter) for rule in own]
        entries += [(2, rule, text) for rule, text in zip(self._patterns, patterns, strict=True)
                    if text is not None]
        for step, rule, text in entries:
            longest = max(longest, text.count("/") + 1)
            base = 0 if step == 0 else 3  # the deny, read and write sets of the step
            if rule.access == DENY:
                sets[base].add(text)
                continue
            if rule.access & READ:
                sets[base + 1].add(text)
                reads.append(text)
            if rule.access & WRITE:
                sets[base + 2].add(text)
        compiled = _Compiled(sets[0], sets[1], sets[2], sets[3], sets[4], sets[5],
                             read_filters=tuple(reads), longest=longest)
        self._compiled[key] = compiled
        if len(self._compiled) > _CACHE_SIZE:
            self._compiled.popitem(last=False)
        return compiled

    # ------------------------------------------------------------------ decisions

    def _allowed(self, compiled: _Compiled, topic: str, access: int) -> bool:
        if compiled.topic_deny.matches(topic):
            return False
        own = compiled.topic_read if access == READ else compiled.topic_write
        if own.matches(topic):
            return True
        if compiled.pattern_deny.matches(topic):
            return False
        shared = compiled.pattern_read if access == READ else compiled.pattern_write
        return shared.matches(topic)

    def _decide(self, topic: str, username: str | None, client_id: str, access: int) -> bool:
        key = (username, client_id, topic, access)
        found = self._decisions.get(key)
        if found is not None:
            self._decisions.move_to_end(key)
            return found
        result = self._allowed(self._compile(username, client_id), topic, access)
        self._decisions[key] = result
        if len(self._decisions) > _CACHE_SIZE:
            self._decisions.popitem(last=False)
        return result

    def can_publish(self, topic: str, *, username: str | None, client_id: str) -> bool:
        """May this client PUBLISH to `topic` (a topic name, no wildcards)? Also for wills."""
        return self._decide(topic, username, client_id, WRITE)

    def can_read(self, topic: str, *, username: str | None, client_id: str) -> bool:
        """May a message on `topic` be delivered to this client (also a retained one)?"""
        return self._decide(topic, username, client_id, READ)

    def can_subscribe(self, topic_filter: str, *, username: str | None, client_id: str) -> bool:
        """False only when no topic `topic_filter` can match is readable by this client (then
        SUBACK 0x80 on 3.1.1, 0x87 on 5.0). A partly readable filter such as `#` is True:
        each delivery is then checked with `can_read`. `$share/G/F` is judged by F."""
        shared = parse_shared(topic_filter)
        plain = shared[1] if shared is not None else topic_filter
        if not is_valid_topic_filter(plain):
            return False
        key = (username, client_id, plain, -1)
        found = self._decisions.get(key)
        if found is not None:
            self._decisions.move_to_end(key)
            return found
        compiled = self._compile(username, client_id)
        result = any(topic_matches(plain, topic) and self._allowed(compiled, topic, READ)
                     for topic in _witnesses(plain, compiled))
        self._decisions[key] = result
        if len(self._decisions) > _CACHE_SIZE:
            self._decisions.popitem(last=False)
        return result


def _split_word(text: str) -> tuple[str, str]:
    """The first word (up to a space or tab) and the rest, stripped."""
    parts = text.split(None, 1)
    if not parts:
        return "", ""
    return parts[0], parts[1].strip() if len(parts) > 1 else ""


def _witnesses(topic_filter: str, compiled: _Compiled) -> Iterator[str]:
    """Topics that decide whether some topic matched by `topic_filter` is readable.

    For each read grant G, and each topic length n up to one more than the longest rule or
    filter, build the topic whose level i is the literal of the filter or of G there (or a
    level no rule names, `_FRESH`, where both are wildcards). A deny rule that matches such a
    topic has a wildcard wherever it holds `_FRESH`, so it denies every topic of that shape
    and length; lengths beyond the longest rule behave like the longest one. So if any topic
    matched by the filter is readable, one of these is (and each is checked for real).
    """
    wanted = topic_filter.split("/")
    most = max(compiled.longest, len(wanted)) + 1
    for grant in compiled.read_filters:
        granted = grant.split("/")
        if not _may_overlap(wanted, granted):
            continue
        for length in range(1, most + 1):
            levels = []
            for index in range(length):
                levels.append(_literal_at(wanted, index) or _literal_at(granted, index)
                              or _FRESH)
            yield "/".join(levels)


def _literal_at(levels: list[str], index: int) -> str | None:
    if index >= len(levels):
        return None
    level = levels[index]
    if level in ("+", "#") or "#" in levels[:index]:
        return None
    return level


def _may_overlap(first: list[str], second: list[str]) -> bool:
    for a, b in zip(first, second, strict=False):
        if a == "#" or b == "#":
            return True
        if a != "+" and b != "+" and a != b:
            return False
    return True
