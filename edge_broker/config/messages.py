"""How configuration problems are worded: the ConfigError naming file, table and key
(`_error`), a value shown as TOML would write it (`_show`), the `_Invalid` a value parser
raises for its caller to place, and "did you mean" suggestions."""

from __future__ import annotations

import difflib
import json
import math
from datetime import date, datetime, time

from edge_broker.errors import ConfigError


class _Invalid(Exception):
    """A value is wrong; the caller adds where it was."""


def _show(value: object, limit: int = 60) -> str:
    """A value as it would be written in TOML, shortened for an error message."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan as in TOML
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    elif isinstance(value, (datetime, date, time)):
        return f"the date/time {value.isoformat()}"
    else:  # pragma: no cover - tomllib produces nothing else
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _expected(what: str, value: object) -> _Invalid:
    return _Invalid(f"expected {what}, got {_show(value)}")


def _error(message: str, *, file: str | None, table: str | None = None,
           key: str | None = None) -> ConfigError:
    """A ConfigError reading `file: [table] key: message`.

    `table` is a plain table name ("mqtt", shown as "[mqtt]") or an already-shown label such
    as "[[listeners]] #2"; `key` alone is shown as it is (a top-level key or a flag).
    """
    where: list[str] = []
    if table is not None:
        where.append(table if table.startswith("[") else f"[{table}]")
    if key is not None:
        where.append(key)
    text = f"{' '.join(where)}: {message}" if where else message
    error = ConfigError(text, file=file)
    error.table = table
    error.key = key
    return error


def _suggest(name: str, candidates: tuple[str, ...] | list[str]) -> str | None:
    normal = name.replace("-", "_").lower()
    for candidate in candidates:
        if candidate.lower() == normal:
            return candidate
    close = difflib.get_close_matches(normal, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None
