"""Counting what a bridge forwarded, for S14 and the bridge benchmarks: the remote stream's
message count and store times (JetStream), the bridge's status from the broker's admin socket,
and a sampler polling either every SAMPLE_S."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

from . import brokers

SAMPLE_S = 0.2


def stream_count(address: str) -> int:
    """Stream S14's message count; 0 while the server is not up or the stream not made."""
    try:
        return int(_js_request(address, "$JS.API.STREAM.INFO.S14")["state"]["messages"])
    except Exception:  # not up yet (connect), no stream yet (an error reply: no "state")
        return 0


def wait_arrived(count: Callable[[], int], total: int, timeout_s: float
                 ) -> tuple[float | None, int]:
    """Poll `count` every 0.05 s until it reaches `total` or `timeout_s` passed: (the time
    of the first poll that saw anything, None if none did; the last count)."""
    start = time.monotonic()
    first = None
    arrived = 0
    while arrived < total and time.monotonic() - start < timeout_s:
        arrived = count()
        if arrived and first is None:
            first = time.monotonic()
        time.sleep(0.05)  # polling, bounded by the deadline
    return first, arrived


def _js_request(address: str, subject: str, body: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """One JetStream API request on a connection of its own; the reply's JSON."""
    import json

    import nats

    async def ask() -> dict[str, Any]:
        nc = await nats.connect(address, connect_timeout=2, allow_reconnect=False)
        try:
            reply = await nc.request(subject, json.dumps(body).encode() if body else b"",
                                     timeout=5)
            return dict(json.loads(reply.data))
        finally:
            await nc.close()

    return asyncio.run(ask())


def _server_time(text: str) -> float:
    """Epoch seconds of a nats-server time, RFC 3339 with nanoseconds, UTC ("...:28.0103163Z")."""
    head, _, fraction = text.rstrip("Z").partition(".")
    whole = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return whole.timestamp() + (float("0." + fraction) if fraction else 0.0)


def stream_span(address: str) -> tuple[int, float, float]:
    """(messages, store time of the first, of the last) of stream S14, as nats-server
    recorded them: the drain's span measured where it happens, not by polling."""
    state = _js_request(address, "$JS.API.STREAM.INFO.S14")["state"]
    return (int(state["messages"]), _server_time(state["first_ts"]),
            _server_time(state["last_ts"]))


def stored_before(address: str, wall: float) -> int:
    """How many messages stream S14 had stored by wall-clock time `wall` (time.time()):
    the sequence of the first message stored at or after it, less one (the stream starts
    empty in each S14 phase); when none was, all of them."""
    when = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    reply = _js_request(address, "$JS.API.STREAM.MSG.GET.S14",
                        {"start_time": when.isoformat().replace("+00:00", "Z")})
    if "message" in reply:
        return int(reply["message"]["seq"]) - 1
    return int(_js_request(address, "$JS.API.STREAM.INFO.S14")["state"]["last_seq"])


def forwarded(rb: brokers.RunningBroker) -> int:
    """The bridge's forwarded count, from the broker's admin socket."""
    from edge_broker.server import admin

    assert rb.data_dir is not None
    try:
        reply = asyncio.run(admin.admin_request(rb.data_dir, {"command": "bridges"}, 5.0))
    except Exception:
        return 0
    for bridge in reply.get("bridges", []):
        if bridge.get("name") == "s11":
            return int(bridge.get("forwarded") or 0)
    return 0


UPLINK_WAIT_S = 120.0


def bridge_status(rb: brokers.RunningBroker) -> dict[str, Any]:
    from edge_broker.server import admin

    assert rb.data_dir is not None
    try:
        reply = asyncio.run(admin.admin_request(rb.data_dir, {"command": "bridges"}, 5.0))
    except Exception:
        return {}
    for bridge in reply.get("bridges", []):
        if bridge.get("name") == "s11":
            return dict(bridge)
    return {}


def wait_backlog_empty(rb: brokers.RunningBroker, expected: int = 0) -> dict[str, Any]:
    """The bridge's status once its backlog is empty and (`expected`) it forwarded or
    dropped at least that many messages (`forwarded` comes with the uplink process's
    status, up to 0.2 s after the backlog figure: waiting for the backlog alone read it
    early), or at UPLINK_WAIT_S. Adds `empty_after_s` (None: timed out)."""
    start = time.monotonic()
    while True:
        status = bridge_status(rb)
        waited = time.monotonic() - start
        if status.get("backlog_messages") == 0 and (
                int(status.get("forwarded") or 0) + int(status.get("dropped") or 0)
                >= expected):
            status["empty_after_s"] = round(waited, 1)
            return status
        if waited > UPLINK_WAIT_S:
            status["empty_after_s"] = None
            return status
        time.sleep(SAMPLE_S)  # polling the admin socket, bounded by the deadline


def counter(kind: str, address: str, rb: brokers.RunningBroker) -> Callable[[], int]:
    """How much the remote holds: the stream's message count (JetStream) or the bridge's
    forwarded count (Kafka, whose server the benchmarks cannot ask cheaply)."""
    return ((lambda: stream_count(address)) if kind == "jetstream"
            else (lambda: forwarded(rb)))


class Sampler:
    """(monotonic time, count) every SAMPLE_S in a thread, until stopped."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.count()))
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def at(self, moment: float) -> int:
        """The count sampled last at or before `moment`."""
        best = 0
        for t, n in self.samples:
            if t <= moment:
                best = n
        return best

    def first_above(self, value: int) -> float | None:
        return next((t for t, n in self.samples if n > value), None)

    def wait_for(self, value: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1][1] >= value:
                return self.samples[-1][0]
            time.sleep(SAMPLE_S / 2)
        return None
