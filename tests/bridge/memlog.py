"""An in-memory LogReader for bridge tests, standing in for the log of issue 8."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from edge_broker.bridge.base import BridgeMessage


class MemoryLog:
    def __init__(self) -> None:
        self.entries: list[BridgeMessage] = []
        self.committed = 0
        self.commits = 0
        self._appended = asyncio.Event()

    def append(self, topic: str, payload: bytes, qos: int = 1) -> int:
        offset = len(self.entries) + 1
        self.entries.append(BridgeMessage(offset=offset, topic=topic, payload=payload, qos=qos,
                                          publish_time=1_765_000_000.0 + offset))
        self._appended.set()
        return offset

    async def read_after(self, cursor: int, limit: int) -> Sequence[BridgeMessage]:
        return self.entries[cursor:cursor + limit]  # offsets are 1-based and dense here

    async def wait_after(self, cursor: int) -> None:
        while len(self.entries) <= cursor:
            self._appended.clear()
            await self._appended.wait()

    async def commit_cursor(self, cursor: int) -> None:
        assert cursor >= self.committed, "the cursor never moves back"
        self.committed = cursor
        self.commits += 1
