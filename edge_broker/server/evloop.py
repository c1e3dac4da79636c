"""The event loop a process of ours runs on: uvloop when it is installed (the `speed`
extra), else asyncio's own. Kept apart from server/run.py so that the bridge's uplink
process (server/bridge_child.py) can use it without importing the broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    # Typed here: without the `speed` extra mypy sees uvloop as Any, and returning Any
    # fails mypyc's build (the README's `pip install .` then installed pure Python).
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
