"""Fixtures for bridge tests: real servers on free loopback ports (see servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bridge.gateway import Gateway
from tests.bridge.servers import Mosquitto, NatsServer, Tansu


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[Tansu]:
    server = Tansu(tmp_path / "tansu")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    server = Mosquitto(tmp_path / "mosquitto")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """What a test started (gateways, proxies, clients), stopped or closed at the end in
    reverse order."""
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        if isinstance(thing, Gateway):
            thing.stop()
        else:
            thing.close()
