"""The [[streams]] tables: parsed into StreamConfig, every error naming table and key."""

from __future__ import annotations

import tomllib

import pytest

from edge_broker.errors import ConfigError
from edge_broker.store.log import StreamConfig, parse_streams
from edge_broker.store.log.streams import DEFAULT_MAX_AGE_S, DEFAULT_MAX_BYTES


def parse(text: str) -> tuple[StreamConfig, ...]:
    return parse_streams(tomllib.loads(text)["streams"], file="broker.toml")


def test_the_issue_example_parses() -> None:
    assert parse("""
[[streams]]
name = "telemetry"
filter = "sensors/#"
max_age = "7d"
max_bytes = 1073741824
last_value = false

[[streams]]
name = "state.v2-x_y"
filter = "dev/+/state"
last_value = true
""") == (StreamConfig("telemetry", "sensors/#", 7 * 86400, 1073741824, False),
         StreamConfig("state.v2-x_y", "dev/+/state", DEFAULT_MAX_AGE_S, DEFAULT_MAX_BYTES,
                      True))


def test_one_bound_alone_is_the_only_bound() -> None:
    streams = parse("""
[[streams]]
name = "a"
filter = "a"
max_age = "12h"
[[streams]]
name = "b"
filter = "b"
max_bytes = 1000
[[streams]]
name = "c"
filter = "c"
max_age = 45
""")
    assert [(s.max_age_s, s.max_bytes) for s in streams] == [
        (12 * 3600, None), (None, 1000), (45, None)]


@pytest.mark.parametrize(("body", "key", "fragment"), [
    ('name = "bad name"\nfilter = "a"', "name", "letters, digits"),
    ('name = ""\nfilter = "a"', "name", "letters, digits"),
    ('name = 5\nfilter = "a"', "name", "got 5"),
    ('filter = "a"', "name", "missing"),
    ('name = "x"', "filter", "missing"),
    ('name = "x"\nfilter = "a/#/b"', "filter", "topic filter"),
    ('name = "x"\nfilter = "a+"', "filter", "topic filter"),
    ('name = "x"\nfilter = "$share/g/a"', "filter", "$share"),
    ('name = "x"\nfilter = ""', "filter", "topic filter"),
    ('name = "x"\nfilter = "a"\nmax_age = "30m"', "max_age", "30min"),
    ('name = "x"\nfilter = "a"\nmax_age = "soon"', "max_age", "duration"),
    ('name = "x"\nfilter = "a"\nmax_age = 0', "max_age", "above 0"),
    ('name = "x"\nfilter = "a"\nmax_bytes = 0', "max_bytes", "positive integer"),
    ('name = "x"\nfilter = "a"\nmax_bytes = "1G"', "max_bytes", "positive integer"),
    ('name = "x"\nfilter = "a"\nlast_value = "yes"', "last_value", "true or false"),
    ('name = "x"\nfilter = "a"\nretention = "7d"', "retention", "unknown key"),
])
def test_errors_name_the_table_and_key(body: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse('[[streams]]\nname = "ok"\nfilter = "ok"\n\n[[streams]]\n' + body)
    error = caught.value
    assert (error.file, error.table, error.key) == ("broker.toml", "[[streams]] #2", key)
    assert str(error).startswith(f"broker.toml: [[streams]] #2 {key}: ")
    assert fragment in str(error)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[\[streams\]\] #3 name: .*\[\[streams\]\] #1"):
        parse('[[streams]]\nname = "a"\nfilter = "a"\n[[streams]]\nname = "b"\nfilter = "b"\n'
              '[[streams]]\nname = "a"\nfilter = "c"')


def test_streams_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError, match=r"two brackets"):
        parse('[streams]\nname = "a"\nfilter = "a"')
    with pytest.raises(ConfigError, match=r"array of tables"):
        parse_streams("a")
    with pytest.raises(ConfigError, match=r"#1: expected a table"):
        parse_streams([1])
