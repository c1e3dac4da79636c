"""Topic names and topic filters, 4.7 (5.0): validation, shared subscriptions, matching.

`topic_matches` is the reference matcher: deliberately the plainest code, used as the oracle
for the broker core's subscription trie in property tests. Do not optimise it.
"""

from __future__ import annotations

from typing import Final

SHARE_PREFIX: Final = "$share/"


def is_valid_topic_name(topic: str) -> bool:
    """A topic name a PUBLISH may carry: non-empty, no wildcards ([MQTT-3.3.2-2] (5.0)).

    U+0000 is also refused ([MQTT-4.7.3-2] (5.0)); the length limit is the codec's.
    """
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def is_well_formed_filter(topic_filter: str) -> bool:
    """The wildcard syntax of 4.7.1 (5.0) alone, reading a `$share/` filter as a plain one:
    what a filter must meet to be parsed at all (a `$share/` filter must also meet 4.8.2)."""
    return _is_valid_plain_filter(topic_filter)


def _is_valid_plain_filter(topic_filter: str) -> bool:
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        # [MQTT-4.7.1-1] (5.0): '#' alone in its level, and the last level.
        if "#" in level and (level != "#" or index != last):
            return False
        # [MQTT-4.7.1-2] (5.0): '+' alone in its level.
        if "+" in level and level != "+":
            return False
    return True


def is_valid_topic_filter(topic_filter: str) -> bool:
    """Wildcard syntax of 4.7.1 (5.0), and the shared subscription form of 4.8.2 (5.0):
    `$share/{ShareName}/{filter}` with a non-empty ShareName without '/', '+' or '#'
    ([MQTT-4.8.2-1], [MQTT-4.8.2-2] (5.0)) and a valid non-empty filter after it.
    """
    if topic_filter.startswith(SHARE_PREFIX):
        return parse_shared(topic_filter) is not None
    return _is_valid_plain_filter(topic_filter)


def parse_shared(topic_filter: str) -> tuple[str, str] | None:
    """(ShareName, filter) for a valid shared subscription filter, else None."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, slash, rest = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not group or not slash or "+" in group or "#" in group:
        return None
    if not _is_valid_plain_filter(rest):
        return None
    return group, rest


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Does `topic_filter` (not a `$share/` one: pass its filter part) match `topic`?"""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    # [MQTT-4.7.2-1] (5.0): topics starting with '$' are not matched by a leading wildcard.
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, filter_level in enumerate(filter_levels):
        if filter_level == "#":
            # '#' also matches the parent level: "a/#" matches "a" (4.7.1.2 (5.0)).
            return True
        if index >= len(topic_levels):
            return False
        if filter_level != "+" and filter_level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)
