"""Topic names, topic filters, shared subscriptions and the reference matcher, 4.7 / 4.8 (5.0)."""

from __future__ import annotations

import pytest

from edge_broker.mqtt.topics import (
    is_valid_topic_filter,
    is_valid_topic_name,
    parse_shared,
    topic_matches,
)


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "/a", "a/", "$SYS/x", "a b", "é/ü", "//"])
def test_valid_topic_names(topic: str) -> None:
    assert is_valid_topic_name(topic)


@pytest.mark.parametrize("topic", ["", "+", "#", "a/+", "a/#", "a+", "a#b", "a\x00"])
def test_invalid_topic_names(topic: str) -> None:
    assert not is_valid_topic_name(topic)


@pytest.mark.parametrize("topic_filter", [
    "a", "#", "+", "a/#", "a/+", "+/+", "+/a/#", "/", "/+", "a//b", "$SYS/#",
    "$share/g/a", "$share/g/#", "$share/g/+/x", "$share", "$share_x/a", "$sharex/+",
])
def test_valid_topic_filters(topic_filter: str) -> None:
    assert is_valid_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", [
    "", "a#", "#/a", "a/#/b", "a/b#", "a+", "+a", "a/+b/c", "##", "++",
    "$share/", "$share/g", "$share/g/", "$share//a", "$share/g+/a", "$share/g#/a",
    "$share/+/a", "$share/g/a#", "a\x00",
])
def test_invalid_topic_filters(topic_filter: str) -> None:
    assert not is_valid_topic_filter(topic_filter)


def test_parse_shared() -> None:
    assert parse_shared("$share/group/a/b") == ("group", "a/b")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("$share/g//") == ("g", "/")
    assert parse_shared("a/b") is None
    assert parse_shared("$share") is None
    assert parse_shared("$share/g") is None
    assert parse_shared("$share/g/a#") is None


MATCHES = [
    ("#", "a"), ("#", "a/b"), ("#", "/"), ("a/#", "a"), ("a/#", "a/b"), ("a/#", "a/b/c"),
    ("a/+", "a/b"), ("a/+", "a/"), ("+/+", "/a"), ("+", "a"), ("/+", "/a"), ("a/+/c", "a/b/c"),
    ("+/b/#", "a/b"), ("a", "a"), ("a/b", "a/b"), ("$SYS/#", "$SYS/x"), ("$SYS/+", "$SYS/x"),
    ("+/#", "a"), ("a//b", "a//b"), ("a/+/+", "a//"),
]
NO_MATCHES = [
    ("a", "b"), ("a", "a/b"), ("a/b", "a"), ("a/+", "a"), ("a/+", "a/b/c"), ("+", "/a"),
    ("+", "a/b"), ("#", "$SYS"), ("#", "$SYS/x"), ("+/x", "$SYS/x"), ("+/#", "$x"),
    ("a/#", "b"), ("A", "a"), ("a/+/c", "a/b/d"),
]


@pytest.mark.parametrize(("topic_filter", "topic"), MATCHES)
def test_matches(topic_filter: str, topic: str) -> None:
    assert topic_matches(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic"), NO_MATCHES)
def test_does_not_match(topic_filter: str, topic: str) -> None:
    assert not topic_matches(topic_filter, topic)
