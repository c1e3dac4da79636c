"""The broker's side of the QoS 0 lane (docs/bridges.md "The QoS 0 lane").

While a bridge's uplink process runs (`separate_process = true`), the QoS 0 messages that
only that bridge's uplink takes are not appended to the store's log: the core puts them on
`core.lane_out` (core/streams.py `_to_lane`), and `LaneHub` drains that list once per event-
loop turn, hands each bridge's messages to its `Lane`, which writes them to the process as
one frame over the process's socketpair (server/bridge_wire.py): ("lane", count, bytes,
publish time of the first, blob), the blob a pickled list of compact records

    (topic, payload, retain, client id, publish time, properties or None)

with properties = (content type, payload is UTF-8, user properties): what the bridge's
headers carry. The process stores the blob as it came (store/log/lane_file.py).

The broker never blocks on a lane: a frame is written to the socket's buffer; when that
buffer holds more than `LANE_BUFFER_BYTES` (the process does not keep up), the turn's
messages are dropped, counted in the bridge's `dropped` and logged (QoS 0: at most once).
While the process is not running (starting, restarting) its lane is closed and the core
appends those messages to the log as before.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import TYPE_CHECKING, Any, Final

from ..mqtt.properties import NO_PROPERTIES

if TYPE_CHECKING:
    from ..core.broker import BrokerCore
    from ..core.changes import Message
    from .bridge_proc import ProcessForwarder
    from .bridges import BridgeStatus

log = logging.getLogger("edge_broker.bridges")

LANE_BUFFER_BYTES: Final = 8 * 1024 * 1024  # a process this far behind: the turn is dropped
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


class Lane:
    """One bridge's lane to its running uplink process."""

    def __init__(self, name: str, skip_origin: str, writer: asyncio.StreamWriter) -> None:
        self.name = name
        self.skip_origin = skip_origin
        self.writer = writer
        self.sent = 0
        self.dropped = 0
        self._logged = 0
        self._logged_at = -1e18

    def send(self, messages: list[Message]) -> None:
        records = lane_records(messages, self.skip_origin)
        if not records:
            return
        writer = self.writer
        if writer.is_closing():  # the process ended: lost (QoS 0, at most once)
            self.dropped += len(records)
            return
        if writer.transport.get_write_buffer_size() > LANE_BUFFER_BYTES:
            self.dropped += len(records)
            self._log_drops()
            return
        blob = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
        body = pickle.dumps(("lane", len(records), len(blob), records[0][4], blob),
                            protocol=pickle.HIGHEST_PROTOCOL)
        writer.write(len(body).to_bytes(4, "big") + body)
        self.sent += len(records)

    def _log_drops(self) -> None:
        now = time.monotonic()
        if now - self._logged_at < DROP_LOG_INTERVAL_S:
            return
        log.warning("bridge %s: the uplink process does not keep up with its QoS 0 lane "
                    "(over %d bytes buffered): %d message(s) dropped (%d in all)", self.name,
                    LANE_BUFFER_BYTES, self.dropped - self._logged, self.dropped)
        self._logged = self.dropped
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
        core.lane_out = []
        lanes = self.lanes
        reader = out[0][0]
        if all(entry[0] == reader for entry in out):  # one bridge: the usual case
            groups = {reader: [entry[1] for entry in out]}
        else:
            groups = {}
            for name, message in out:
                groups.setdefault(name, []).append(message)
        for name, messages in groups.items():
            lane = lanes.get(name)
            if lane is None:
                self.lost[name] = self.lost.get(name, 0) + len(messages)
                continue
            lane.send(messages)


def add_lane_figures(status: BridgeStatus, forwarder: ProcessForwarder) -> None:
    """The lane's figures into the bridge's (docs/bridges.md "The QoS 0 lane"): its stored
    backlog, its drops (the process's, for max_backlog_bytes, and the broker's)."""
    lane = forwarder.lane_status
    status.dropped += forwarder.lane_dropped
    if lane is None:
        return
    status.backlog_messages += int(lane["backlog_messages"])
    status.backlog_bytes += int(lane["backlog_bytes"])
    status.dropped += int(lane["dropped"])
