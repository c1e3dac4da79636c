"""The uplink process's page read (store/log/bridge_file.py `LogFile.page_of`, columns packed by
`BRIDGE_COLUMNS`, made into messages by server/bridge_log.py `raw_bridge_message`) gives the
same messages, sizes and page ends as the full rows read the broker's way (`LogFile.page`,
`bridge_message`): QoS, retain, origins of any text, properties of any bytes, topics outside
the bridge's filters and rows at or below a filter's `since` left out."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from edge_broker.mqtt.properties import Properties
from edge_broker.server.bridge_child_log import ChildLogReader
from edge_broker.server.bridge_log import bridge_message, raw_bridge_message
from edge_broker.store.log.bridge_file import LogFile
from edge_broker.store.log.schema import encode_props, ensure_schema

READER = "bridge:central"
PROPS = encode_props(Properties(content_type="text/plain", payload_format_indicator=1,
                                user_properties=(("k", "v"), ("k", "w:1"))))
# Origins with ":" (the packed column's separator) and non-ASCII text: only the properties'
# length says where they end.
ORIGINS = ("dev1", "", "dév 2:x", "a:b:c", "12:34", "bridge-central")


def make_store(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    ensure_schema(conn)
    conn.execute("INSERT INTO log_topics (id, name) VALUES (1, 'sensors/t1'),"
                 " (2, 'other/x'), (3, 'late/tëmp'), (9000000000, 'sensors/big')")
    conn.execute("INSERT INTO log_readers (name, offset) VALUES (?, 0)", (READER,))
    conn.executemany("INSERT INTO log_reader_filters (reader, filter, since) VALUES (?, ?, ?)",
                     [(READER, "sensors/#", 0), (READER, "late/+", 5)])
    rows = []
    for offset in range(1, 41):
        topic_id = (1, 2, 3, 9000000000)[offset % 4]
        props = PROPS if offset % 3 == 0 else (b"" if offset % 7 == 0 else None)
        rows.append((offset, 1_765_000_000.0 + offset / 1000, topic_id, offset % 3,
                     (offset // 2) % 2, b"payload-%d" % offset, props,
                     ORIGINS[offset % len(ORIGINS)], None))
    conn.executemany("INSERT INTO log (offset, at, topic_id, qos, retain, payload, properties,"
                     " origin, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()


def test_packed_columns_make_the_messages_of_the_full_rows(tmp_path: Path) -> None:
    make_store(tmp_path / "log.db")
    file = LogFile(str(tmp_path / "log.db"), READER)
    try:
        for after, limit in ((0, 100), (0, 7), (13, 5), (38, 10), (40, 10)):
            full, full_end = file.page(after, limit)
            packed, packed_end = file.page_of(raw_bridge_message, after, limit)
            assert packed_end == full_end
            expected = [bridge_message(row) for row in full]
            assert packed == expected
            assert [m.size for m in packed] == [m.size for m in expected]
        every, _ = file.page_of(raw_bridge_message, 0, 100)
    finally:
        file.close()
    # what the rows hold, not only that both ways agree
    assert {m.topic for m in every} == {"sensors/t1", "late/tëmp", "sensors/big"}
    assert all(m.offset > 5 for m in every if m.topic == "late/tëmp")
    assert {m.qos for m in every} == {0, 1, 2} and {m.retain for m in every} == {False, True}
    assert {m.client_id for m in every} == set(ORIGINS)
    with_props = [m for m in every if m.offset % 3 == 0]
    assert with_props and all(m.content_type == "text/plain" and m.payload_utf8
                              and m.user_properties == (("k", "v"), ("k", "w:1"))
                              for m in with_props)
    assert all(m.content_type is None and not m.user_properties
               for m in every if m.offset % 3 != 0)


async def test_a_page_past_deleted_rows_ends_at_the_log_s_last_offset(tmp_path: Path) -> None:
    """Rows 41-50 were deleted (retention; none of them the bridge's): a page read from the
    end ends at 50, and the process's reader then waits for the log to go past 50. Before
    (review of round 11): the page ended at 40, so the wait for "past 40" returned at once,
    the log's last offset being 50, and the uplink process read empty pages for ever."""
    make_store(tmp_path / "log.db")
    conn = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    conn.execute("UPDATE log_state SET last_offset = 50 WHERE id = 0")
    conn.close()
    file = LogFile(str(tmp_path / "log.db"), READER)
    sent: list[tuple[object, ...]] = []
    reader = ChildLogReader(file, "bridge-central", sent.append, 50, 0)
    try:
        assert file.page_of(raw_bridge_message, 40, 10) == ([], 50)
        assert file.page_of(raw_bridge_message, 30, 100)[1] == 50
        assert file.page_of(raw_bridge_message, 30, 2)[1] < 40  # a full page: where it stops
        await reader.read_after(40, 10)
        waiting = asyncio.ensure_future(reader.wait_after(40))
        for _ in range(20):
            await asyncio.sleep(0)  # loop turns (not a wait for time)
        assert not waiting.done()  # it waits for an append past 50 ...
        assert sent[-1] == ("wait", 50)  # ... and asked the broker to be woken then
        reader.appended(51)
        await asyncio.wait_for(waiting, 5)
    finally:
        reader.close()
