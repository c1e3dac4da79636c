"""A session's username in the SQLite store (schema version 5): it round-trips with the
session, a version 4 file is upgraded (a `.pre-v4` copy is kept beside it, its sessions are
anonymous, NULL), and the read-only admin access still reads a version 4 file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge_broker.core.changes import SessionRecord, SessionSaved
from edge_broker.mqtt.packets import Will
from edge_broker.store.sqlite import SCHEMA_VERSION, SqliteStore
from edge_broker.store.sqlite.readonly import read_session

WILL = Will("alarms/alice", b"gone", 1, False)


async def _write(path: Path, *records: SessionRecord) -> None:
    store = SqliteStore(path)
    await store.open()
    await store.apply([SessionSaved(r) for r in records])
    await store.close()


def _make_version_4(path: Path) -> None:
    """The file as schema version 4 wrote it: no username column (nor the later tables)."""
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE sessions DROP COLUMN username")
        conn.execute("DROP TABLE log_reader_ranges")  # version 6
        conn.execute("PRAGMA user_version = 4")
    conn.close()


async def test_the_username_round_trips_with_the_session(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await _write(path, SessionRecord("alice-1", 5, 600, WILL, 12.5, username="alice"),
                 SessionRecord("anon-1", 4, 600, None, None))
    store = SqliteStore(path)
    snapshot = await store.open()
    await store.close()
    by_id = {r.client_id: r for r in snapshot.sessions}
    assert by_id["alice-1"] == SessionRecord("alice-1", 5, 600, WILL, 12.5, username="alice")
    assert by_id["anon-1"].username is None
    detail = await read_session(path, "alice-1")
    assert detail is not None and detail.record.username == "alice"


async def test_a_version_4_file_is_upgraded_with_anonymous_sessions(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 6
    path = tmp_path / "edge-broker.db"
    await _write(path, SessionRecord("old-1", 5, 600, WILL, 12.5, username="alice"))
    _make_version_4(path)
    detail = await read_session(path, "old-1")  # read-only, not upgraded
    assert detail is not None and detail.record.will == WILL
    assert detail.record.username is None

    store = SqliteStore(path)
    snapshot = await store.open()
    await store.apply([SessionSaved(SessionRecord("new-1", 5, 600, None, None,
                                                  username="bob"))])
    await store.close()
    assert {(r.client_id, r.will, r.username) for r in snapshot.sessions} == {
        ("old-1", WILL, None)}
    copy = path.with_name("edge-broker.db.pre-v4")
    with sqlite3.connect(f"file:{copy}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)
    conn.close()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT client_id, username FROM sessions ORDER BY client_id"
                            ).fetchall() == [("new-1", "bob"), ("old-1", None)]
    conn.close()
