"""The store side of a bridge: the cursor commit (store/log/bridge_store.py)."""

from __future__ import annotations

from pathlib import Path

from edge_broker.store.sqlite import SqliteStore


async def test_cursor_commit_is_kept_and_leaves_the_store_fsyncing(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    store = SqliteStore(path, durability="fsync", ballast_bytes=0)
    await store.open()
    try:
        assert await store.bridges.setup([("central", ("sensors/#",))]) == {"central": 0}
        await store.bridges.commit("central", 5, [])
        # The cursor is written without its own fsync; every other commit still fsyncs.
        rows = await store._query("PRAGMA synchronous")  # type: ignore[attr-defined]
        assert rows[0][0] == 2  # FULL
    finally:
        await store.close()
    store = SqliteStore(path, durability="fsync", ballast_bytes=0)
    await store.open()
    try:
        assert await store.bridges.setup([("central", ("sensors/#",))]) == {"central": 5}
    finally:
        await store.close()
