"""Named streams: the `[[streams]]` tables of the configuration, parsed and validated.

A stream is a filter over the one log (see the package docstring): it owns no rows, it only
holds the rows of its topics at or above its floor. This module only turns the TOML tables
into frozen `StreamConfig` values; config.py is expected to call `parse_streams` for the
top-level `streams` key (the lead moves it there), so every error is a `ConfigError` naming
the file, the table (`[[streams]] #N`, numbered from 1, as `[[listeners]]`) and the key.

Keys (all but `name` and `filter` optional):

- `name`: letters, digits, `_`, `-`, `.`; 1 to 64 characters; unique among the streams.
- `filter`: an MQTT topic filter (4.7 (5.0)); not a `$share/` filter.
- `max_age`: a duration, as every duration of the configuration (config.parse_duration):
  whole seconds or "45s", "30min", "12h", "7d", "1w". A bare "m" is refused there on purpose
  (mosquitto reads it as months), so it is refused here too; the message says "30min".
- `max_bytes`: a positive integer, bytes of topic + payload + properties of the kept rows.
- `last_value`: true keeps only the newest message of each topic (compaction).

Without `max_age` and `max_bytes` a stream keeps `DEFAULT_MAX_AGE_S` (7 days) and at most
`DEFAULT_MAX_BYTES` (256 MiB); with only one of them given, only that one bounds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ...config import parse_duration
from ...errors import ConfigError
from ...mqtt.topics import SHARE_PREFIX, is_valid_topic_filter

__all__ = ["DEFAULT_MAX_AGE_S", "DEFAULT_MAX_BYTES", "StreamConfig", "parse_streams"]

DEFAULT_MAX_AGE_S: Final = 7 * 86400
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
KEYS: Final = ("name", "filter", "max_age", "max_bytes", "last_value")


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """One `[[streams]]` table. `max_age_s`/`max_bytes` of None: no bound of that kind."""

    name: str
    filter: str
    max_age_s: int | None = DEFAULT_MAX_AGE_S
    max_bytes: int | None = DEFAULT_MAX_BYTES
    last_value: bool = False


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _error(message: str, file: str | None, table: str, key: str | None) -> ConfigError:
    text = f"{table} {key}: {message}" if key else f"{table}: {message}"
    error = ConfigError(text, file=file)
    error.table = table
    error.key = key
    return error


def parse_streams(value: object, *, file: str | None = None) -> tuple[StreamConfig, ...]:
    """The value of the top-level `streams` key (an array of tables) as StreamConfigs."""
    if isinstance(value, dict):
        raise _error("expected an array of tables, written [[streams]] (two brackets), got a "
                     "table written [streams]", file, "[streams]", None)
    if not isinstance(value, list):
        raise _error(f"expected an array of tables, written [[streams]], got {_show(value)}",
                     file, "[[streams]]", None)
    streams: list[StreamConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(value):
        label = f"[[streams]] #{index + 1}"
        if not isinstance(entry, dict):
            raise _error(f"expected a table, got {_show(entry)}", file, label, None)
        stream = _parse_one(entry, file, label)
        if stream.name in seen:
            raise _error(f"the name {_show(stream.name)} is already used by "
                         f"[[streams]] #{seen[stream.name]}", file, label, "name")
        seen[stream.name] = index + 1
        streams.append(stream)
    return tuple(streams)


def _parse_one(entry: Mapping[str, object], file: str | None, label: str) -> StreamConfig:
    for key in entry:
        if key not in KEYS:
            raise _error(f"unknown key; the keys of [[streams]] are: {', '.join(KEYS)}",
                         file, label, key)
    for key in ("name", "filter"):
        if key not in entry:
            raise _error("missing; every [[streams]] table needs a name and a filter",
                         file, label, key)
    name = entry["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _error("expected 1 to 64 letters, digits, '_', '-' or '.', got "
                     f"{_show(name)}", file, label, "name")
    topic_filter = entry["filter"]
    if (not isinstance(topic_filter, str) or topic_filter.startswith(SHARE_PREFIX)
            or not is_valid_topic_filter(topic_filter)):
        # 4.7.1 (5.0): '#' alone and last, '+' alone in its level; no shared filter.
        raise _error("expected an MQTT topic filter such as \"sensors/#\" or \"+/temp\" "
                     f"(not a $share/ filter), got {_show(topic_filter)}",
                     file, label, "filter")
    max_age: int | None = None
    max_bytes: int | None = None
    if "max_age" in entry:
        try:
            max_age = parse_duration(entry["max_age"])
        except ValueError as exc:
            raise _error(str(exc), file, label, "max_age") from None
        if max_age == 0:
            raise _error("expected a duration above 0 (leave the key out for the default "
                         "of 7 days)", file, label, "max_age")
    if "max_bytes" in entry:
        raw = entry["max_bytes"]
        if type(raw) is not int or raw <= 0:
            raise _error(f"expected a positive integer (bytes), got {_show(raw)}",
                         file, label, "max_bytes")
        max_bytes = raw
    if max_age is None and max_bytes is None:
        max_age, max_bytes = DEFAULT_MAX_AGE_S, DEFAULT_MAX_BYTES
    last_value = entry.get("last_value", False)
    if type(last_value) is not bool:
        raise _error(f"expected true or false, got {_show(last_value)}",
                     file, label, "last_value")
    return StreamConfig(name, topic_filter, max_age, max_bytes, last_value)
