"""The uplink process's log reader (server/bridge_child_log.py): the messages it makes straight
from raw log rows are the ones the broker's own reader makes, its own downlink's rows are not
sent back up, and a page of only those moves the cursor past them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from edge_broker.mqtt.properties import Properties
from edge_broker.server.bridge_child_log import ChildLogReader
from edge_broker.server.bridge_log import bridge_message, raw_bridge_message
from edge_broker.store.log.log import log_row
from edge_broker.store.log.schema import encode_props

T = TypeVar("T")
OWN = "bridge-central"


def full(offset: int, origin: str = "dev1", props: bytes | None = None) -> tuple[Any, ...]:
    # the columns of store/log/log.py LOG_COLUMNS
    return (offset, 1_765_000_000.0 + offset, 1, 1, offset % 2, b"payload-%d" % offset, props,
            origin, None)


def raw(offset: int, origin: str = "dev1", props: bytes | None = None) -> tuple[Any, ...]:
    # the same row in the columns of store/log/bridge_file.py BRIDGE_COLUMNS
    last: str | bytes = origin if props is None else b"%d:%s%s" % (
        len(props), props, origin.encode())
    return (offset, 1_765_000_000.0 + offset, 1 * 8 + 1 * 2 + offset % 2,
            b"payload-%d" % offset, last)


class Pages:
    """Stands for store/log/bridge_file.py `LogFile`: raw rows, a page at a time."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def page_of(self, make: Callable[[Sequence[Any], str, int], T], after: int,
                limit: int) -> tuple[list[T], int]:
        rows = [r for r in self.rows if r[0] > after][:limit]
        return [make(r, "sensors/t1", 10) for r in rows], rows[-1][0] if rows else after

    def close(self) -> None:
        pass


def test_messages_made_from_raw_rows_are_the_broker_readers() -> None:
    props = encode_props(Properties(content_type="text/plain", payload_format_indicator=1,
                                    user_properties=(("k", "v"),)))
    for offset, blob in ((5, None), (6, props)):
        made = raw_bridge_message(raw(offset, props=blob), "sensors/t1", 10)
        expected = log_row(full(offset, props=blob), "sensors/t1", 10)
        assert made == bridge_message(expected)
        assert made.size == expected.size


async def test_own_downlink_rows_are_skipped_and_passed_by_the_cursor() -> None:
    sent: list[tuple[Any, ...]] = []
    pages: Any = Pages([raw(1), raw(2, OWN), raw(3), raw(4, OWN), raw(5, OWN)])
    reader = ChildLogReader(pages, OWN, sent.append, 5, 0)
    try:
        first = await reader.read_after(0, 3)
        assert [m.offset for m in first] == [1, 3]
        assert sent == []  # nothing acknowledged yet
        await reader.commit_cursor(3)
        assert sent[-1][:2] == ("ack", 3)
        rest = await reader.read_after(3, 3)  # only its own: the cursor moves past them
        assert rest == []
        assert sent[-1][:2] == ("ack", 5)
        assert list(sent[-1][4][0::2]) == [4, 5]  # the rows it passes (bridge_wire.py "ack")
    finally:
        reader.close()
