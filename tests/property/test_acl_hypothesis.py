"""The ACL (edge_broker.auth.acl) against a slow, obviously correct model written here.

The model follows the documented decision order word for word, with its own matcher, and
decides `can_subscribe` by trying every topic of a finite universe: every level a rule can
name (the empty level included), plus "zz" that no rule names (standing for all the others),
up to one level longer than the longest rule or filter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from edge_broker.auth.acl import Acl

RULE_LEVELS = ["a", "", "$s"]  # "" is an empty level ("a//b")
UNIVERSE_LEVELS = ["a", "", "$s", "c1", "u1", "%u", "%c", "zz"]
MAX_LEVELS = 3
USERS = [None, "u1", "a"]
CLIENT_IDS = ["a", "c1", "a/b", "+", "", "%u"]
USERNAMES = [None, "u1", "a", "u/x", "#", "%c"]
ACCESS = {"read": {"r"}, "write": {"w"}, "readwrite": {"r", "w"}, "deny": set(), "": {"r", "w"}}


@dataclass(frozen=True)
class Rule:
    section: str | None  # the `user` line it is written under (None: before any)
    kind: str  # "topic" | "pattern"
    access: str  # "" = no access word
    filter: str


def ref_match(topic_filter: str, topic: str) -> bool:
    def rec(f: list[str], t: list[str]) -> bool:
        if not f:
            return not t
        if f[0] == "#":
            return True
        if not t:
            return False
        return (f[0] == "+" or f[0] == t[0]) and rec(f[1:], t[1:])

    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    return rec(topic_filter.split("/"), topic.split("/"))


def unsafe(value: str) -> bool:
    return value == "" or "+" in value or "#" in value or "/" in value


def ref_decide(rules: list[Rule], topic: str, need: str, username: str | None,
               client_id: str) -> bool:
    patterns = [r for r in rules if r.kind == "pattern"]
    uses_c = any("%c" in r.filter for r in patterns)
    uses_u = any("%u" in r.filter for r in patterns)
    wildcard = any(value is not None and ("+" in value or "#" in value)
                   for value in (client_id, username))
    patterns_apply = not wildcard and not (uses_c and unsafe(client_id)) and not (
        uses_u and username is not None and unsafe(username))
    own = [(r.access, r.filter) for r in rules if r.kind == "topic" and r.section == username]
    shared = []
    if patterns_apply:
        for r in patterns:
            if "%u" in r.filter and username is None:
                continue
            levels = [client_id if level == "%c" else username if level == "%u" else level
                      for level in r.filter.split("/")]
            shared.append((r.access, "/".join(str(level) for level in levels)))
    for group in (own, shared):
        for access, topic_filter in group:
            if access == "deny" and ref_match(topic_filter, topic):
                return False
        for access, topic_filter in group:
            if need in ACCESS[access] and ref_match(topic_filter, topic):
                return True
    return False


UNIVERSE = ["/".join(levels) for n in range(1, MAX_LEVELS + 2)
            for levels in itertools.product(UNIVERSE_LEVELS, repeat=n) if levels != ("",)]


def ref_subscribe(rules: list[Rule], topic_filter: str, username: str | None,
                  client_id: str) -> bool:
    return any(ref_match(topic_filter, t) and ref_decide(rules, t, "r", username, client_id)
               for t in UNIVERSE)


def to_text(rules: list[Rule]) -> str:
    lines = [f"{r.kind} {r.access} {r.filter}".replace("  ", " ")
             for r in rules if r.section is None]
    for user in USERS[1:]:
        lines.append(f"user {user}")
        lines += [f"{r.kind} {r.access} {r.filter}".replace("  ", " ")
                  for r in rules if r.section == user]
    return "\n".join(lines) + "\n"


@st.composite
def filters(draw: st.DrawFn, extra: tuple[str, ...] = ()) -> str:
    if draw(st.integers(0, 9)) == 0:
        return "#"
    levels = draw(st.lists(st.sampled_from([*RULE_LEVELS, "+", *extra]), min_size=1,
                           max_size=MAX_LEVELS))
    if len(levels) < MAX_LEVELS and draw(st.booleans()):
        levels.append("#")
    assume(levels != [""])  # the only invalid one
    return "/".join(levels)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    kind = draw(st.sampled_from(["topic", "pattern"]))
    extra = ("%c", "%u") if kind == "pattern" else ()
    return Rule(draw(st.sampled_from(USERS)), kind, draw(st.sampled_from(list(ACCESS))),
                draw(filters(extra)))


rule_lists = st.lists(rules(), max_size=10)
topics = st.lists(st.sampled_from(UNIVERSE_LEVELS), min_size=1,
                  max_size=MAX_LEVELS + 1).map("/".join).filter(bool)
clients = st.tuples(st.sampled_from(USERNAMES), st.sampled_from(CLIENT_IDS))


@settings(max_examples=400, deadline=None)
@given(rule_lists, st.lists(topics, min_size=1, max_size=8), clients)
def test_publish_and_read_match_the_model(rule_list: list[Rule], topic_list: list[str],
                                          client: tuple[str | None, str]) -> None:
    username, client_id = client
    acl = Acl.parse(to_text(rule_list))
    for topic in topic_list:
        assert acl.can_publish(topic, username=username, client_id=client_id) == ref_decide(
            rule_list, topic, "w", username, client_id), topic
        assert acl.can_read(topic, username=username, client_id=client_id) == ref_decide(
            rule_list, topic, "r", username, client_id), topic


@settings(max_examples=200, deadline=None)
@given(rule_lists, filters(), clients)
# "#" matches its parent level, so `/#` matches "": no topic name (acl.py skips it).
@example([Rule(None, "topic", "read", "+")], "/#", (None, "a"))
def test_subscribe_matches_the_model(rule_list: list[Rule], topic_filter: str,
                                     client: tuple[str | None, str]) -> None:
    username, client_id = client
    acl = Acl.parse(to_text(rule_list))
    assert acl.can_subscribe(topic_filter, username=username, client_id=client_id) == (
        ref_subscribe(rule_list, topic_filter, username, client_id))
