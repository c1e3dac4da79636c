"""The value parsers of `[[bridges]]` keys (bridge/config.py): each takes a TOML value and
returns it parsed, or raises `Invalid` with the words the error shows ("expected ..., got
...")."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

from edge_broker.config import parse_duration
from edge_broker.mqtt.topics import is_valid_topic_filter, is_valid_topic_name

from .topic_map import (
    KafkaRoute,
    TopicLine,
    is_valid_kafka_topic,
    is_valid_subject,
    is_valid_subject_filter,
    parse_topic_line,
)


class Invalid(Exception):
    """A value is wrong; the caller adds where it was."""


def show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (str, int, float, list)):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return repr(value)


def expected(what: str, value: object) -> Invalid:
    return Invalid(f"expected {what}, got {show(value)}")


def text(what: str, check: Callable[[str], object] = bool) -> Callable[[object], str]:
    """A parser for a string that `check` accepts (truthy), else "expected <what>, got ..."."""
    def parse(value: object) -> str:
        if not isinstance(value, str) or not check(value):
            raise expected(what, value)
        return value
    return parse


string = text("a string", lambda value: True)
nonempty = text("a non-empty string")


def boolean(value: object) -> bool:
    if type(value) is not bool:
        raise expected("true or false", value)
    return value


def int_range(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if type(value) is not int or not low <= value <= high:
            raise expected(f"an integer from {low} to {high}", value)
        return value
    return parse


def unlimited(value: object) -> int:
    if type(value) is not int or value < 0:
        raise expected("a non-negative integer (0 = unlimited)", value)
    return value


def duration(value: object) -> int:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def positive_duration(value: object) -> int:
    seconds = duration(value)
    if seconds <= 0:
        raise expected("a duration of at least 1 second", value)
    return seconds


def choice(*options: str) -> Callable[[object], str]:
    listed = ", ".join(json.dumps(o) for o in options)

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise expected(f"one of {listed}", value)
        return value
    return parse


def list_of(item: Callable[[object], Any], what: str, *,
            nonempty: bool = False) -> Callable[[object], tuple[Any, ...]]:
    def parse(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise expected(f"an array of {what}", value)
        if nonempty and not value:
            raise Invalid(f"expected at least one of {what}")
        out = []
        for index, entry in enumerate(value):
            try:
                out.append(item(entry))
            except Invalid as exc:
                raise Invalid(f"entry {index + 1}: {exc}") from None
        return tuple(out)
    return parse


NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HOST_PORT_RE: Final = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
STREAM_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,255}")


name = text('a name of 1 to 64 letters, digits, "_", "-" or "."', NAME_RE.fullmatch)
subject = text("a NATS subject without wildcards or empty tokens", is_valid_subject)
subject_filter = text('a NATS subject ("*" and a final ">" allowed)', is_valid_subject_filter)
mqtt_filter = text("an MQTT topic filter", lambda value: is_valid_topic_filter(value)
                   and not value.startswith("$share/"))
stream_name = text('a JetStream stream name (letters, digits, "_", "-")', STREAM_RE.fullmatch)
kafka_topic = text('a Kafka topic (letters, digits, ".", "_", "-")', is_valid_kafka_topic)
local_prefix = text("a topic prefix without wildcards",
                    lambda value: "+" not in value and "#" not in value and "\0" not in value)
state_topic = text('an MQTT topic name, or "" to disable',
                   lambda value: not value or is_valid_topic_name(value))


def host_port(value: object) -> str:
    if not isinstance(value, str) or not (m := HOST_PORT_RE.fullmatch(value)) or not (
            1 <= int(m.group(2)) <= 65535):
        raise expected('"host:port"', value)
    return value


def url(schemes: tuple[str, ...], bare_ok: bool) -> Callable[[object], str]:
    listed = " or ".join(f"{s}://host:port" for s in schemes)

    def parse(value: object) -> str:
        if isinstance(value, str):
            scheme, sep, rest = value.partition("://")
            if sep and scheme in schemes:
                rest = rest.rstrip("/")
                if "@" not in rest and (HOST_PORT_RE.fullmatch(rest)
                                        or re.fullmatch(r"[A-Za-z0-9_.-]+", rest)):
                    return value
            elif not sep and bare_ok and HOST_PORT_RE.fullmatch(value):
                return value
        what = listed + (' or "host:port"' if bare_ok else "")
        raise expected(f"{what} (credentials go in their own keys)", value)
    return parse


def kafka_route(value: object) -> KafkaRoute:
    if not isinstance(value, dict) or set(value) != {"filter", "topic"}:
        raise expected('a table { filter = "<MQTT filter>", topic = "<Kafka topic>" }', value)
    return KafkaRoute(mqtt_filter(value["filter"]), kafka_topic(value["topic"]))


def topic_line(value: object) -> TopicLine:
    if not isinstance(value, str):
        raise expected('a string "pattern direction qos local_prefix remote_prefix"', value)
    try:
        return parse_topic_line(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def keepalive(value: object) -> int:
    seconds = duration(value)
    if seconds > 65535:
        raise expected("a duration of at most 65535 seconds (0 disables keep alive)", value)
    return seconds


