"""Durations: whole seconds or one-unit strings ("30s", "5min", "2h", "14d", "1w", "1y"),
bounded by MQTT's four-byte intervals; "m" is refused as ambiguous (mosquitto's months)."""

from __future__ import annotations

import re
from typing import Final

from edge_broker.config.messages import _expected, _Invalid, _show

MAX_DURATION_S: Final = 0xFFFF_FFFF  # MQTT intervals are four-byte integers of seconds

_DURATION_UNITS: Final[dict[str, int]] = {
    "s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400,
}
_DURATION_RE: Final = re.compile(r"([0-9]+)(s|min|h|d|w|y)")
_DURATION_HELP: Final = (
    'a duration: whole seconds (0 or more) or a string like "30s", "5min", "2h", "14d", "1w", "1y"'
)


def parse_duration(value: object) -> int:
    """Seconds from an integer or a string such as "30s", "5min", "2h", "14d", "1w", "1y".

    Raises ValueError with a message naming what is accepted.
    """
    try:
        return _duration(value)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _duration(value: object) -> int:
    if type(value) is int:
        seconds = value
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    elif isinstance(value, str) and re.fullmatch(r"[0-9]+m", value):
        raise _Invalid(
            f'{_show(value)} is ambiguous: mosquitto reads "m" as months; write "{value}in" '
            f'for minutes or a number of days ("30d") for about a month'
        )
    else:
        raise _expected(_DURATION_HELP, value)
    if not 0 <= seconds <= MAX_DURATION_S:
        raise _Invalid(
            f"expected a duration from 0 to {MAX_DURATION_S} seconds (about 136 years), "
            f"got {_show(value)}"
        )
    return seconds
