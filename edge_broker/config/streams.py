"""The top-level [[streams]] array: named streams over the broker's one append-only log,
parsed into `StreamConfig` (`parse_streams`, also used by the store)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from edge_broker.config.durations import parse_duration
from edge_broker.config.messages import _error, _show
from edge_broker.config.model import (
    STREAM_DEFAULT_MAX_AGE_S,
    STREAM_DEFAULT_MAX_BYTES,
    StreamConfig,
)
from edge_broker.errors import ConfigError

# [[streams]]
#
# A named stream is a filter over the broker's one append-only log (store/log/). Keys (all
# but `name` and `filter` optional): `name` (letters, digits, "_", "-", "."; 1 to 64
# characters; unique), `filter` (an MQTT topic filter, not $share/), `max_age` (a duration),
# `max_bytes` (positive integer: topic + payload + properties of the kept rows),
# `last_value` (true: keep only the newest message per topic). Without `max_age` and
# `max_bytes` a stream keeps STREAM_DEFAULT_MAX_AGE_S (7 days) and at most
# STREAM_DEFAULT_MAX_BYTES (256 MiB); with one of them given, only that one bounds it.

_STREAM_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_STREAM_KEYS: Final = ("name", "filter", "max_age", "max_bytes", "last_value")


def _is_topic_filter(text: str) -> bool:
    """4.7.1 (5.0): non-empty, no NUL, "#" alone and last, "+" alone in its level; config is a
    leaf module, so this does not use mqtt.topics (tests check both agree on the examples)."""
    if not text or "\0" in text or len(text.encode()) > 65535:
        return False
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _stream_error(message: str, file: str | None, table: str,
                  key: str | None) -> ConfigError:
    return _error(message, file=file, table=table, key=key)


def parse_streams(value: object, *, file: str | None = None) -> tuple[StreamConfig, ...]:
    """The value of the top-level `streams` key (an array of tables) as StreamConfigs; every
    error is a ConfigError naming the file, `[[streams]] #N` (from 1) and the key."""
    if isinstance(value, dict):
        raise _stream_error("expected an array of tables, written [[streams]] (two brackets), "
                            "got a table written [streams]", file, "[streams]", None)
    if not isinstance(value, list):
        raise _stream_error(f"expected an array of tables, written [[streams]], got "
                            f"{_show(value)}", file, "[[streams]]", None)
    streams: list[StreamConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(value):
        label = f"[[streams]] #{index + 1}"
        if not isinstance(entry, dict):
            raise _stream_error(f"expected a table, got {_show(entry)}", file, label, None)
        stream = _parse_stream(entry, file, label)
        if stream.name in seen:
            raise _stream_error(f"the name {_show(stream.name)} is already used by "
                                f"[[streams]] #{seen[stream.name]}", file, label, "name")
        seen[stream.name] = index + 1
        streams.append(stream)
    return tuple(streams)


def _parse_stream(entry: Mapping[str, object], file: str | None, label: str) -> StreamConfig:
    for key in entry:
        if key not in _STREAM_KEYS:
            raise _stream_error(f"unknown key; the keys of [[streams]] are: "
                                f"{', '.join(_STREAM_KEYS)}", file, label, key)
    for key in ("name", "filter"):
        if key not in entry:
            raise _stream_error("missing; every [[streams]] table needs a name and a filter",
                                file, label, key)
    name = entry["name"]
    if not isinstance(name, str) or not _STREAM_NAME_RE.fullmatch(name):
        raise _stream_error("expected 1 to 64 letters, digits, '_', '-' or '.', got "
                            f"{_show(name)}", file, label, "name")
    topic_filter = entry["filter"]
    if (not isinstance(topic_filter, str) or topic_filter.startswith("$share/")
            or not _is_topic_filter(topic_filter)):
        # 4.7.1 (5.0): '#' alone and last, '+' alone in its level; no shared filter.
        raise _stream_error("expected an MQTT topic filter such as \"sensors/#\" or "
                            f"\"+/temp\" (not a $share/ filter), got {_show(topic_filter)}",
                            file, label, "filter")
    max_age: int | None = None
    max_bytes: int | None = None
    if "max_age" in entry:
        try:
            max_age = parse_duration(entry["max_age"])
        except ValueError as exc:
            raise _stream_error(str(exc), file, label, "max_age") from None
        if max_age == 0:
            raise _stream_error("expected a duration above 0 (leave the key out for the "
                                "default of 7 days)", file, label, "max_age")
    if "max_bytes" in entry:
        raw = entry["max_bytes"]
        if type(raw) is not int or raw <= 0:
            raise _stream_error(f"expected a positive integer (bytes), got {_show(raw)}",
                                file, label, "max_bytes")
        max_bytes = raw
    if max_age is None and max_bytes is None:
        max_age, max_bytes = STREAM_DEFAULT_MAX_AGE_S, STREAM_DEFAULT_MAX_BYTES
    last_value = entry.get("last_value", False)
    if type(last_value) is not bool:
        raise _stream_error(f"expected true or false, got {_show(last_value)}",
                            file, label, "last_value")
    return StreamConfig(name, topic_filter, max_age, max_bytes, last_value)
