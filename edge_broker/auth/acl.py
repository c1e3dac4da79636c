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

import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
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
_VARIABLE: Final = re.compile("%[cu]")
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
class _RuleSet:
    """Some rules compiled: which filters deny, grant read, grant write."""

    deny: FilterSet
    read: FilterSet
    write: FilterSet
    read_filters: tuple[str, ...]  # every filter granting read, for can_subscribe
    longest: int  # levels of the longest filter

    @classmethod
    def build(cls, rules: Iterable[tuple[int, str]]) -> _RuleSet:
        deny, read, write = FilterSet(), FilterSet(), FilterSet()
        reads: list[str] = []
        longest = 1
        for access, text in rules:
            longest = max(longest, text.count("/") + 1)
            if access == DENY:
                deny.add(text)
                continue
            if access & READ:
                read.add(text)
                reads.append(text)
            if access & WRITE:
                write.add(text)
        return cls(deny, read, write, tuple(reads), longest)


_NONE: Final = _RuleSet.build([])


def _substitute(topic_filter: str, client_id: str, username: str | None) -> str:
    # One pass: a client id "%u" must not become the username (nor a username "%c" the id).
    return _VARIABLE.sub(lambda m: client_id if m.group() == "%c" else (username or ""),
                         topic_filter)


class Acl:
    def __init__(self, anonymous: list[Rule], users: dict[str, list[Rule]],
                 patterns: list[Rule], source: str = "<acl>") -> None:
        self.source = source
        self._anonymous = anonymous
        self._users = users
        self._patterns = patterns
        self._patterns_use_c = any("%c" in rule.filter for rule in patterns)
        self._patterns_use_u = any("%u" in rule.filter for rule in patterns)
        self._anonymous_set = _RuleSet.build((rule.access, rule.filter) for rule in anonymous)
        self._own = {name: _RuleSet.build((rule.access, rule.filter) for rule in rules)
                     for name, rules in users.items()}
        self._static = _RuleSet.build((rule.access, rule.filter) for rule in patterns
                                      if "%c" not in rule.filter and "%u" not in rule.filter)
        self._dynamic = [rule for rule in patterns if "%c" in rule.filter or "%u" in rule.filter]
        self._substituted: OrderedDict[tuple[str | None, str], _RuleSet] = OrderedDict()
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
        for number, raw_line in enumerate(text.split("\n"), start=1):
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

        def wildcard(value: str | None) -> bool:
            return value is not None and ("+" in value or "#" in value)

        # A client id or username with a wildcard gets no pattern at all, whichever variable
        # the patterns use (mosquitto: "dangerous client id"); `/` or an empty value only
        # where a pattern substitutes it.
        if wildcard(client_id) or wildcard(username):
            return False
        if self._patterns_use_c and unsafe(client_id):
            return False
        return not (self._patterns_use_u and username is not None and unsafe(username))

    def _layers(self, username: str | None, client_id: str) -> tuple[_RuleSet, ...]:
        """The client's own section, then the patterns without and with substitutions."""
        own = self._own.get(username, _NONE) if username is not None else self._anonymous_set
        if not self._patterns_apply(username, client_id):
            return (own,)
        if not self._dynamic:
            return own, self._static
        key = (username, client_id)
        dynamic = self._substituted.get(key)
        if dynamic is None:
            dynamic = _RuleSet.build(
                (rule.access, _substitute(rule.filter, client_id, username))
                for rule in self._dynamic
                if not ("%u" in rule.filter and username is None))  # mosquitto skips these
            self._substituted[key] = dynamic
            if len(self._substituted) > _CACHE_SIZE:
                self._substituted.popitem(last=False)
        else:
            self._substituted.move_to_end(key)
        return own, self._static, dynamic

    # ------------------------------------------------------------------ decisions

    @staticmethod
    def _allowed(layers: tuple[_RuleSet, ...], topic: str, access: int) -> bool:
        own, patterns = layers[0], layers[1:]
        if own.deny.matches(topic):
            return False
        if (own.read if access == READ else own.write).matches(topic):
            return True
        if any(layer.deny.matches(topic) for layer in patterns):
            return False
        return any((layer.read if access == READ else layer.write).matches(topic)
                   for layer in patterns)

    def _decide(self, topic: str, username: str | None, client_id: str, access: int) -> bool:
        key = (username, client_id, topic, access)
        found = self._decisions.get(key)
        if found is not None:
            self._decisions.move_to_end(key)
            return found
        result = self._allowed(self._layers(username, client_id), topic, access)
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
        layers = self._layers(username, client_id)
        # A witness can be "" (`/#` with a grant `+`: "#" also matches the parent level),
        # which is no topic name: [MQTT-4.7.3-1] (3.1.1, 5.0) one character at least.
        result = any(topic and topic_matches(plain, topic)
                     and self._allowed(layers, topic, READ)
                     for topic in _witnesses(plain, layers))
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


def _witnesses(topic_filter: str, layers: tuple[_RuleSet, ...]) -> Iterator[str]:
    """Topics that decide whether some topic matched by `topic_filter` is readable.

    For each read grant G, and each topic length n up to one more than the longest rule or
    filter, build the topic whose level i is the literal of the filter or of G there (or a
    level no rule names, `_FRESH`, where both are wildcards). A deny rule that matches such a
    topic has a wildcard wherever it holds `_FRESH`, so it denies every topic of that shape
    and length; lengths beyond the longest rule behave like the longest one. So if any topic
    matched by the filter is readable, one of these is (and each is checked for real).
    """
    wanted = topic_filter.split("/")
    most = max(len(wanted), *(layer.longest for layer in layers)) + 1
    for grant in (text for layer in layers for text in layer.read_filters):
        granted = grant.split("/")
        if not _may_overlap(wanted, granted):
            continue
        for length in range(1, most + 1):
            levels = []
            for index in range(length):
                level = _literal_at(wanted, index)
                if level is None:
                    level = _literal_at(granted, index)
                levels.append(_FRESH if level is None else level)  # "" is a literal level
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
