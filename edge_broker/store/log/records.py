"""The log's records: a message to append, a row read back, a page of rows, and the
in-memory state of a topic, a stream and a reader (store/log/log.py keeps them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from ...mqtt.properties import NO_PROPERTIES, Properties
from .schema import decode_props
from .streams import StreamConfig

__all__ = ["LOG_COLUMNS", "Appendable", "LogMessage", "LogRow", "Page", "RawRow", "Reader",
           "StreamState", "TopicStats", "log_row"]

# The columns of a log row as readers select them (`RawRow`).
LOG_COLUMNS: Final = ("offset, at, topic_id, qos, retain, payload, properties, origin,"
                      " expires_at")


class Appendable(Protocol):
    """What `Log.append` reads from a message (core.changes.Message has all of it)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...
    @property
    def properties(self) -> Properties: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def origin(self) -> str: ...


@dataclass(slots=True)
class LogMessage:
    """A message to append (tests, benchmarks, tools); the core appends its own Message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES
    expires_at: float | None = None
    origin: str = ""


@dataclass(slots=True)
class LogRow:
    """A message read back from the log. `size` counts topic + payload + properties bytes."""

    offset: int
    at: float
    topic: str
    qos: int
    retain: bool
    payload: bytes
    properties: Properties
    origin: str
    expires_at: float | None
    size: int


# A row as `read_raw` returns it (the columns of `LOG_COLUMNS`, in that order).
RawRow = tuple[Any, ...]


def log_row(raw: Sequence[Any], name: str, name_size: int) -> LogRow:
    """The `LogRow` of a raw row (the columns of `LOG_COLUMNS`), given its topic's name and the
    name's UTF-8 size (the log keeps both per topic; another reader caches them)."""
    payload = raw[5]
    props = raw[6]
    return LogRow(raw[0], raw[1], name, raw[3], bool(raw[4]), payload,
                  decode_props(props) if props is not None else NO_PROPERTIES, raw[7], raw[8],
                  name_size + len(payload) + (len(props) if props else 0))


@dataclass(slots=True)
class Page:
    """Rows in offset order; every selected row with `after < offset <= end` is in `rows`,
    so a reader that consumed them all may move its cursor to `end`."""

    rows: list[LogRow]
    end: int


@dataclass(slots=True)
class TopicStats:
    id: int
    name: str
    name_size: int  # UTF-8 bytes of the name
    count: int = 0
    bytes: int = 0
    first_offset: int | None = None
    last_offset: int | None = None


@dataclass(slots=True)
class StreamState:
    """A configured stream and what it holds: the rows of its topics at or above `first_offset`
    (`count`, `bytes`). `first_at` is the `at` of its oldest row, or an earlier time."""

    config: StreamConfig
    first_offset: int
    first_at: float | None = None
    count: int = 0
    bytes: int = 0
    topics: set[int] = field(default_factory=set)
    budget_dropped: int = 0  # rows released for the store budget (budget.py), since load


@dataclass(slots=True)
class Reader:
    """A cursor (see cursors.py): `offset` is the last offset handed out; the rows at or below
    it are done except those in `inflight` (packet id -> (offset, state))."""

    name: str
    offset: int
    filters: dict[str, int] = field(default_factory=dict)  # topic filter -> since
    inflight: dict[int, tuple[int, int]] = field(default_factory=dict)
    backlog_count: int = 0  # selected rows after `offset`
    backlog_bytes: int = 0
    dropped: int = 0  # rows skipped by drop_to_bound since the reader was made
    topics: dict[int, int] = field(default_factory=dict)  # topic id -> since (min over filters)
    # The highest offset `advance` moved past since the store was opened (-1: none yet, then
    # the offset at the first drop or advance; kept across a reload, log.py `load`). Rows
    # above it and at or below `offset` were skipped by a drop and not passed by any advance
    # yet (cursors.py `advance`: its `late` rows).
    advanced: int = -1

    @property
    def done(self) -> int:
        """Every selected row at or below this offset is finished."""
        if not self.inflight:
            return self.offset
        return min(self.offset, min(o for o, _ in self.inflight.values()) - 1)

