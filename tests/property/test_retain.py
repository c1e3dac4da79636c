"""Retained messages looked up by filter (core/retain.py, a tree of topic levels) against the
reference matcher (mqtt.topics.topic_matches): the same messages, in the order their topics
were first retained, through sets and clears."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_broker.core.changes import Message
from edge_broker.core.retain import RetainStore
from edge_broker.mqtt.properties import NO_PROPERTIES
from edge_broker.mqtt.topics import topic_matches
from tests.property.test_router import NAME_LEVELS, topic_filters

topics = st.lists(NAME_LEVELS, min_size=1, max_size=5).map("/".join)
# (topic, True: retain a message there / False: clear it)
operations = st.lists(st.tuples(topics, st.booleans()), max_size=40)


def message(number: int, topic: str) -> Message:
    return Message(number, topic, b"%d" % number, 1, True, NO_PROPERTIES, 0.0, None, "")


@settings(max_examples=400, deadline=None)
@given(operations, st.lists(topic_filters(), min_size=1, max_size=6))
def test_matching_equals_the_reference_matcher(ops: list[tuple[str, bool]],
                                               filters: list[str]) -> None:
    store = RetainStore()
    reference: dict[str, Message] = {}  # a dict keeps the order topics were first added
    for number, (topic, keep) in enumerate(ops):
        if keep:
            store.set(message(number, topic))
            reference[topic] = message(number, topic)
        else:
            assert store.clear(topic) == (reference.pop(topic, None) is not None)
    assert len(store) == len(reference)
    for topic_filter in filters:
        expected = [m.id for t, m in reference.items() if topic_matches(topic_filter, t)]
        assert [m.id for m in store.matching(topic_filter)] == expected, topic_filter
