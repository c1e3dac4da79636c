"""The broker's side of the QoS 0 lane (docs/bridges.md "The QoS 0 lane").

While a bridge's uplink process runs (`separate_process = true`), the QoS 0 messages that
only that bridge's uplink takes are not appended to the store's log: the core puts them on
`core.lane_out` (core/streams.py `_to_lane`, a list per reader), and `LaneHub` drains it
once per event-loop turn and hands each bridge's messages to its `Lane`, which appends them
to the lane's own file (store/log/lane_file.py) as one row - a blob, the pickled list of
compact records

    (topic, payload, retain, client id, publish time, properties or None)

with properties = (content type, payload is UTF-8, user properties): what the bridge's
headers carry - one INSERT and one commit (WAL, synchronous NORMAL) per turn. It then tells
the process what was committed with a small frame over the process's socketpair
(server/bridge_wire.py): ("lane", last offset, cursor). The process reads the file
(server/bridge_lane_child.py) and reports each cursor the remote side acknowledged
("lane_ack"); the broker stores it and deletes the rows it passes: the broker is the
file's only writer.

Nothing is buffered in memory towards the process, so a process that does not keep up
loses nothing: the backlog waits in the file, bounded by `max_backlog_bytes` (the oldest
rows dropped, counted and logged). While the process is not running (starting,
restarting) its lane is closed and the core appends those messages to the log as before.
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..errors import StoreError
from ..mqtt.properties import NO_PROPERTIES

if TYPE_CHECKING:
    from ..core.broker import BrokerCore
    from ..core.changes import Message
    from ..store.log.lane_file import LaneFile
    from .bridge_proc import ProcessForwarder
    from .bridges import BridgeStatus

log = logging.getLogger("edge_broker.bridges")

DROP_LOG_INTERVAL_S: Final = 10.0


def lane_records(messages: list[Message], skip_origin: str) -> list[tuple[Any, ...]]:
    """The compact records of the messages (those from the bridge's own downlink left out:
    not sent back up, as from the log)."""
    out: list[tuple[Any, ...]] = []
    for m in messages:
        if m.origin == skip_origin:
            continue
        props = m.properties
        out.append((m.topic, m.payload, m.retain, m.origin, m.received_at,
                    None if props is NO_PROPERTIES else (
                        props.content_type, props.payload_format_indicator == 1,
                        tuple(props.user_properties))))
    return out


def _dumps(records: list[tuple[Any, ...]]) -> bytes:
    """The pickled records, without the pickler's memo ("fast" mode): the records are flat
    (no object refers to itself), and the memo cost more than it saved (each string, bytes
    and tuple entered in a table that is resized and cleared per batch: ~600 of the ~1,800
    instructions per message pickling took); the same format for `load_blob`, only a
    repeated object (the publisher's client id) is written again instead of referred to."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(records)
    return buf.getvalue()


class Lane:
    """One bridge's lane while its uplink process runs: appends each loop turn's messages
    to the lane file (the file outlives the process: `ProcessForwarder.lane_file`)."""

    def __init__(self, name: str, skip_origin: str, file: LaneFile, mark: int,
                 notify: Callable[[tuple[Any, ...]], None]) -> None:
        self.name = name
        self.skip_origin = skip_origin
        self.file = file
        self.mark = mark  # the log's last offset when this lane opened (LogGate)
        self.notify = notify
        self.sent = 0
        self.dropped = 0  # not stored: the file could not be written
        self._logged = file.dropped
        self._logged_at = -1e18
        self._failed_at = -1e18

    def send(self, messages: list[Message]) -> None:
        records = lane_records(messages, self.skip_origin)
        if not records:
            return
        file = self.file
        blob = _dumps(records)
        try:
            dropped = file.append([(len(records), len(blob), records[0][4], blob)], self.mark)
        except StoreError as exc:  # disk full, I/O error: lost (QoS 0, at most once)
            self.dropped += len(records)
            now = time.monotonic()
            if now - self._failed_at >= DROP_LOG_INTERVAL_S:
                self._failed_at = now
                log.error("bridge %s: cannot store QoS 0 lane messages: %s: %d "
                          "message(s) dropped (%d in all)", self.name, exc,
                          len(records), self.dropped)
            return
        self.sent += len(records)
        if dropped:
            self._log_drops()
        self.notify(("lane", file.next_offset - 1, file.cursor))

    def _log_drops(self) -> None:
        now = time.monotonic()
        file = self.file
        if now - self._logged_at < DROP_LOG_INTERVAL_S:
            return
        log.warning("bridge %s: QoS 0 lane over max_backlog_bytes (%d): %d oldest message(s) "
                    "dropped (%d in all)", self.name, file.max_backlog_bytes,
                    file.dropped - self._logged, file.dropped)
        self._logged = file.dropped
        self._logged_at = now


class LaneHub:
    """Drains the core's lane list once per loop turn into the open lanes."""

    def __init__(self, core: BrokerCore, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.loop = loop
        self.lanes: dict[str, Lane] = {}  # reader name -> lane
        # reader -> messages drained after their lane closed (the process ended meanwhile)
        self.lost: dict[str, int] = {}
        self._scheduled = False
        core.lane_wake = self._wake

    def open(self, reader: str, lane: Lane) -> None:
        self.lanes[reader] = lane
        self.core.lane_open = frozenset(self.lanes)

    def close(self, reader: str) -> None:
        """The process ended or stops: from now on the core appends to the log again (what
        the core put on the lane until now is sent first, if the process still reads)."""
        if reader in self.lanes:
            self.drain()
            del self.lanes[reader]
            self.core.lane_open = frozenset(self.lanes)

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self._scheduled = False
        core = self.core
        out = core.lane_out
        if not out:
            return
        core.lane_out = {}
        lanes = self.lanes
        for name, messages in out.items():
            lane = lanes.get(name)
            if lane is None:
                self.lost[name] = self.lost.get(name, 0) + len(messages)
                continue
            lane.send(messages)


def add_lane_figures(status: BridgeStatus, forwarder: ProcessForwarder) -> None:
    """The lane's figures into the bridge's (docs/bridges.md "The QoS 0 lane"): its stored
    backlog and its drops (max_backlog_bytes, and those the broker could not store)."""
    status.dropped += forwarder.lane_dropped
    file = forwarder.opened_lane_file  # (the status never opens it)
    if file is None:
        return
    status.backlog_messages += file.backlog_messages
    status.backlog_bytes += file.backlog_bytes
    status.dropped += file.dropped
