"""`mqtt-publish-time` (bridge/message.py): `format_time` is datetime's ISO-8601 cut to
milliseconds, and `time_millis` is exactly the millisecond it writes, so a sink may format a
time again only when `time_millis` changes (bridge/jetstream_frames.py does)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from edge_broker.bridge.message import format_millis, format_time, time_millis

TIMES = st.floats(min_value=0.0, max_value=4_102_444_800.0)  # 1970 .. 2100


def reference(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@given(TIMES)
def test_format_time_is_datetime_cut_to_milliseconds(timestamp: float) -> None:
    assert format_time(timestamp) == reference(timestamp)


@given(TIMES)
def test_time_millis_names_the_written_millisecond(timestamp: float) -> None:
    millis = time_millis(timestamp)
    assert format_millis(millis) == format_time(timestamp)
    # ... and is datetime's (rounded to microseconds) millisecond since the epoch.
    moment = datetime.fromtimestamp(timestamp, UTC)
    assert millis == int(moment.timestamp()) * 1000 + moment.microsecond // 1000


@given(TIMES, TIMES)
def test_one_millisecond_one_text(first: float, second: float) -> None:
    same = time_millis(first) == time_millis(second)
    assert same == (format_time(first) == format_time(second))
