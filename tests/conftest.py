"""Shared fixtures: a real broker on a free loopback port, running in its own thread.

The broker gets its own thread and event loop so that every kind of client can talk to it from
the test: blocking sockets, paho-mqtt (which runs its own network thread), amqtt (asyncio, in
the test's loop) and subprocesses such as mosquitto_pub.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_broker.config import Config, ListenerConfig
from edge_broker.server.app import BrokerApp
from edge_broker.store.base import SessionStore


class BrokerThread:
    """A BrokerApp serving on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, config: Config, store: SessionStore | None = None) -> None:
        self.config = config
        self._store = store
        self.app: BrokerApp | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        assert self.app is not None and self.app.addresses
        return self.app.addresses[0][1]

    def start(self, timeout: float = 10.0) -> BrokerThread:
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("broker did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # reported to the starting thread
            self._error = error
            self._started.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.app = BrokerApp(self.config, store=self._store)
        await self.app.start()
        self._started.set()
        await self._stop.wait()
        await self.app.stop()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` on the broker's loop thread and return its result (to inspect state)."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is None or self._stop is None or self._thread is None:
            return
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("broker did not stop")


def broker_config(tmp_path: Path, **mqtt: Any) -> Config:
    """Default config on a free port with a data dir under tmp_path; [mqtt] keys override."""
    base = Config()
    return dataclasses.replace(
        base,
        listeners=(ListenerConfig(host="127.0.0.1", port=0),),
        broker=dataclasses.replace(base.broker, data_dir=tmp_path / "data", sys_interval_s=0),
        mqtt=dataclasses.replace(base.mqtt, **mqtt),
    )


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerThread]]:
    """Start brokers with custom settings: make_broker(max_qos=1, config=..., store=...)."""
    started: list[BrokerThread] = []

    def make(config: Config | None = None, store: SessionStore | None = None,
             **mqtt: Any) -> BrokerThread:
        broker = BrokerThread(config or broker_config(tmp_path, **mqtt), store).start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(make_broker: Callable[..., BrokerThread]) -> BrokerThread:
    """A broker with the default settings on a free port."""
    return make_broker()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A SQLite connection in WAL mode, autocommit, to `log.db` in the test's directory: what
    the log's own tests (store/log) run on. (tests/contract/test_log_append.py has its own,
    made by the store's `connect`.)"""
    conn = sqlite3.connect(str(tmp_path / "log.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    yield conn
    conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------- tests that wait for background jobs

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "background_jobs(*names): the test waits for these jobs of "
        "tests/system/compiled_build.py (the compiled wheel build, ...), which start in the "
        "background when collection ends; such tests run last")


def _background_jobs(item: pytest.Item) -> tuple[str, ...]:
    return tuple(name for mark in item.iter_markers("background_jobs") for name in mark.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that wait for background jobs run last, so that the jobs (the compiled build is
    ~5 minutes, mostly one gcc process) overlap the rest of the suite, which mostly waits on
    sockets. The sort is stable: the order is otherwise kept."""
    items.sort(key=lambda item: bool(_background_jobs(item)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the selected tests' background jobs, in the order the tests run."""
    names = [name for item in session.items for name in _background_jobs(item)]
    if names and not session.config.option.collectonly:
        from tests.system.compiled_build import BACKGROUND

        BACKGROUND.start(*dict.fromkeys(names))


def pytest_sessionfinish(session: pytest.Session) -> None:
    compiled_build = sys.modules.get("tests.system.compiled_build")
    if compiled_build is not None:
        compiled_build.BACKGROUND.stop()
