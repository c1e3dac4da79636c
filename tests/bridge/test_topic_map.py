"""MQTT topic <-> NATS subject escaping, Kafka routes, mosquitto topic lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_broker.bridge.topic_map import (
    KafkaRoute,
    TopicLine,
    is_valid_subject,
    map_topic_in,
    map_topic_out,
    parse_topic_line,
    route_kafka,
    subject_to_topic,
    topic_to_subject,
)
from edge_broker.mqtt.topics import is_valid_topic_name

# Any valid MQTT topic name: no wildcards, no U+0000, surrogates excluded (not UTF-8).
topic_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="+#\x00")
levels = st.text(alphabet=st.one_of(topic_chars, st.sampled_from(".*>~ \t~2E~u")),
                 max_size=8)
topics = st.lists(levels, min_size=1, max_size=6).map("/".join).filter(is_valid_topic_name)
prefixes = st.sampled_from(["", "site1.gw7", "a"])


@given(prefixes, topics)
def test_every_topic_maps_to_a_valid_subject_and_back(prefix: str, topic: str) -> None:
    subject = topic_to_subject(prefix, topic)
    assert is_valid_subject(subject)
    assert subject_to_topic(prefix, subject) == topic
    # One NATS token per MQTT level, so subject wildcards select by level.
    assert subject.count(".") - (prefix.count(".") + 1 if prefix else 0) == topic.count("/")


@given(topics, topics)
def test_distinct_topics_get_distinct_subjects(a: str, b: str) -> None:
    if a != b:
        assert topic_to_subject("p", a) != topic_to_subject("p", b)


@pytest.mark.parametrize(("topic", "subject"), [
    ("sensors/t1", "site1.gw7.sensors.t1"),
    ("sensors/v1.2", "site1.gw7.sensors.v1~2E2"),
    ("/a//b/", "site1.gw7.~.a.~.b.~"),
    ("room 1/temp", "site1.gw7.room~201.temp"),
    ("a/~/b", "site1.gw7.a.~7E.b"),
    ("x/*/>", "site1.gw7.x.~2A.~3E"),
    ("tab\tand\u2003em", "site1.gw7.tab~09and~u2003em"),
])
def test_documented_examples(topic: str, subject: str) -> None:
    assert topic_to_subject("site1.gw7", topic) == subject
    assert subject_to_topic("site1.gw7", subject) == topic


@pytest.mark.parametrize("subject", ["other.x", "site1.gw7", "site1.gw7.a~ZZ", "site1.gw7.a~2"])
def test_foreign_or_broken_subjects_are_refused(subject: str) -> None:
    with pytest.raises(ValueError):
        subject_to_topic("site1.gw7", subject)


def test_kafka_first_matching_route_wins() -> None:
    routes = (KafkaRoute("alarms/#", "alarms"), KafkaRoute("+/temp", "temp"),
              KafkaRoute("#", "rest"))
    assert route_kafka(routes, "alarms/temp") == "alarms"
    assert route_kafka(routes, "r1/temp") == "temp"
    assert route_kafka(routes, "r1/hum") == "rest"
    assert route_kafka(routes[:2], "r1/hum") is None
    assert route_kafka(routes, "$SYS/x") is None  # 4.7.2: "#" does not match "$" topics


def test_topic_lines_as_mosquitto_reads_them() -> None:
    assert parse_topic_line("a/#") == TopicLine("a/#", "out", 0, "", "")
    assert parse_topic_line('a/# both 2 "" up/') == TopicLine("a/#", "both", 2, "", "up/")
    for bad in ("a/# out 3", "a/# sideways", "a/b# out", "a out 1 l/+ r/", "a b c d e f"):
        with pytest.raises(ValueError):
            parse_topic_line(bad)


def test_topic_lines_map_both_ways_with_prefixes() -> None:
    lines = [parse_topic_line("cfg/# both 1 local/ site/gw/"),
             parse_topic_line("cmd/+ in 2 dev/ site/gw/"),
             parse_topic_line('s/# out 1 "" site/gw/')]
    assert map_topic_out(lines, "local/cfg/a") == ("site/gw/cfg/a", 1)
    assert map_topic_out(lines, "s/t") == ("site/gw/s/t", 1)
    assert map_topic_out(lines, "cfg/a") is None  # local prefix missing
    assert map_topic_out(lines, "dev/cmd/x") is None  # an "in" line does not send
    assert map_topic_in(lines, "site/gw/cmd/x") == "dev/cmd/x"
    assert map_topic_in(lines, "site/gw/cfg/a/b") == "local/cfg/a/b"
    assert map_topic_in(lines, "site/gw/s/t") is None  # "out" only


def test_overlapping_out_lines_take_the_first_lines_topic_and_the_highest_qos() -> None:
    """As overlapping subscriptions deliver at the highest QoS they match ([MQTT-3.3.5-1]
    (3.1.1)); the first line's prefixes decide the remote topic."""
    lines = [parse_topic_line(text) for text in (
        'm/# out 0 "" a/', 'm/x out 2 "" b/', 'm/+ both 1 "" c/', 'm/x in 2 "" d/')]
    assert map_topic_out(lines, "m/x") == ("a/m/x", 2)
    assert map_topic_out(lines, "m/y") == ("a/m/y", 1)  # lines 1 and 3
    assert map_topic_out(lines, "m/y/z") == ("a/m/y/z", 0)  # line 1 only
    assert map_topic_out(lines[1:], "m/x") == ("b/m/x", 2)  # the first that sends it


def test_an_empty_pattern_maps_one_topic_to_another_as_mosquitto_documents() -> None:
    # mosquitto.conf(5): `topic "" out 1 single/local single/remote`: the prefixes are the
    # whole topics.
    line = parse_topic_line('"" both 1 single/local single/remote')
    assert (line.local_filter, line.remote_filter) == ("single/local", "single/remote")
    assert map_topic_out([line], "single/local") == ("single/remote", 1)
    assert map_topic_out([line], "single/local/x") is None
    assert map_topic_out([line], "single/loc") is None
    assert map_topic_in([line], "single/remote") == "single/local"
    assert map_topic_in([line], "single/remote/x") is None
    for bad in ('"" out 1', '"" out 1 single/local', '"" out 1 "" single/remote'):
        with pytest.raises(ValueError, match="both prefixes"):
            parse_topic_line(bad)


def test_a_topic_that_is_its_prefix_and_an_empty_level_is_mapped() -> None:
    # `LH/#` matches `LH/` (an empty last level): it goes as `RH/`, as mosquitto sends it.
    lines = [parse_topic_line("# both 1 LH/ RH/")]
    assert map_topic_out(lines, "LH/") == ("RH/", 1)
    assert map_topic_in(lines, "RH/") == "LH/"
    assert map_topic_out(lines, "LH") is None  # not under the prefix
