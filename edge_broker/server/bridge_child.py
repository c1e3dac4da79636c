"""A bridge's uplink process (`separate_process = true`): the `Forwarder` of one bridge, run
beside the broker on its own interpreter (and so on the other core), reading the log from
the store file through its own read connection (server/bridge_child_log.py).

The broker starts it (server/bridge_proc.py) as

    <the broker's python> -c "from edge_broker.server.bridge_child import main; main()" FD

where FD is its end of a socketpair (server/bridge_wire.py). It gets its settings in the first
message, forwards from the cursor it was given, and hands every acknowledged cursor to the
broker, which stores it: the broker stays the only writer of the file. It exits when the
broker says "stop" (after closing the remote connection) or when the socket ends (the broker
is gone; the kernel also kills it then: PR_SET_PDEATHSIG, set by the broker at fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from ..bridge.base import Backoff, Sink
from ..bridge.config import BridgeConfig
from ..bridge.forward import Forwarder, LogReader
from ..logfilter import LibraryRepeats
from ..store.log.bridge_file import LogFile
from ..store.log.bridges import reader_name
from ..store.log.lane_view import LaneView
from . import evloop
from .bridge_child_log import ChildLogReader
from .bridge_lane_child import LANE_ID_SUFFIX, LaneReader, LogGate
from .bridge_wire import decode_config, frame, read_frame

log = logging.getLogger("edge_broker.bridges")

Lane = tuple[LaneReader, Forwarder]  # the QoS 0 lane's reader and forwarder

STATUS_INTERVAL_S = 0.2  # status to the broker at most this often (when it changed)


def main() -> None:
    fd = int(sys.argv[-1])
    evloop.run(serve(fd))


def make_sink(config: BridgeConfig, gateway_id: str, store_id: str) -> Sink:
    if config.kind == "jetstream":
        from ..bridge.jetstream import JetStreamSink

        return JetStreamSink(config, gateway_id=gateway_id, store_id=store_id)
    from ..bridge.kafka import KafkaSink

    return KafkaSink(config, gateway_id=gateway_id, store_id=store_id)


async def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    init = await read_frame(reader)
    if init is None or init[0] != "init":
        return
    settings: dict[str, Any] = init[1]
    config = decode_config(settings["config"])
    logging.basicConfig(
        level=int(settings.get("log_level", logging.INFO)), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s bridge process {config.name}: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(LibraryRepeats())  # aiokafka's reconnect errors (logfilter.py)

    def send(message: tuple[Any, ...]) -> None:
        if not writer.is_closing():
            writer.write(frame(message))

    cursor = int(settings["cursor"])
    file = LogFile(str(settings["path"]), reader_name(config.name))
    log_reader = ChildLogReader(file, config.downlink_identity, send,
                                int(settings["last_committed"]), cursor)
    lane: Lane | None = None
    source: LogReader = log_reader
    if settings.get("lane_path"):
        # The QoS 0 lane (server/bridge_lane_child.py): its own file (the broker writes it,
        # this process reads it), its own cursor and forwarder, message ids in a namespace
        # of their own, and the order per topic between the log and the lane kept by
        # `LogGate`.
        mark = int(settings["lane_mark"])
        lane_reader = LaneReader(LaneView(str(settings["lane_path"]),
                                          int(settings["lane_cursor"]),
                                          int(settings["lane_last"])), mark, send)
        source = LogGate(log_reader, lane_reader, mark)
        lane_id = str(settings["store_id"]) + LANE_ID_SUFFIX
        lane = (lane_reader, Forwarder(
            lambda: make_sink(config, str(settings["gateway_id"]), lane_id),
            lane_reader, cursor=lane_reader.file.cursor, window=config.window,
            backoff=Backoff(config.backoff_initial_s, config.backoff_max_s),
            name=f"{config.name} (QoS 0 lane)"))
    forwarder = Forwarder(
        lambda: make_sink(config, str(settings["gateway_id"]), str(settings["store_id"])),
        source, cursor=cursor, window=config.window,
        backoff=Backoff(config.backoff_initial_s, config.backoff_max_s), name=config.name)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_forward(forwarder, config))]
    if lane is not None:
        tasks.append(loop.create_task(_forward(lane[1], config)))
    tasks.append(loop.create_task(_report(forwarder, log_reader, lane, send)))
    # Ended by "stop", the broker closing the socket, an error or a cancel: wound down the
    # same way, after the `except` (not in it, nor in a `finally`: compiled, either ends up
    # raising a stale exception, docs/compiled.md).
    stopped: BaseException | None = None
    try:
        while True:
            message = await read_frame(reader)
            if message is None or message[0] == "stop":
                break
            kind = message[0]
            if kind == "lane" and lane is not None:
                lane[0].appended(int(message[1]), int(message[2]))
            elif kind == "appended":
                log_reader.appended(int(message[1]))
            elif kind == "log_dropped":
                log_reader.dropped(int(message[1]), int(message[2]))
    except BaseException as exc:
        stopped = exc
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    send(("status", _status(forwarder, log_reader, lane)))
    with contextlib.suppress(Exception):
        await writer.drain()
    writer.close()
    log_reader.close()
    if lane is not None:
        lane[0].close()
    if stopped is not None:
        raise stopped


async def _forward(forwarder: Forwarder, config: BridgeConfig) -> None:
    """As the broker does in-process (server/bridges.py `_run_forwarder`): a local failure
    (reading the file) is logged and the forwarder starts again from its cursor."""
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    while True:
        try:
            await forwarder.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("uplink failed locally")
            forwarder.status.failed(f"uplink: {type(exc).__name__}: {exc}")
        await asyncio.sleep(backoff.next_delay())


def _status(forwarder: Forwarder, log_reader: ChildLogReader,
            lane: Lane | None) -> dict[str, Any]:
    s = forwarder.status
    fields: dict[str, Any] = {"connected": s.connected, "cursor": s.cursor,
              "forwarded": s.forwarded, "refused": s.refused, "unrouted": s.unrouted,
              "failures": s.failures, "last_error": s.last_error,
              "last_error_at": s.last_error_at, "oldest_at": log_reader.oldest_at,
              "lane": None}
    if lane is not None:
        ls = lane[1].status
        fields["forwarded"] += ls.forwarded
        fields["refused"] += ls.refused
        fields["unrouted"] += ls.unrouted
        fields["failures"] += ls.failures
        if ls.last_error_at is not None and (s.last_error_at is None
                                             or ls.last_error_at > s.last_error_at):
            fields["last_error"] = f"QoS 0 lane: {ls.last_error}"
            fields["last_error_at"] = ls.last_error_at
        fields["lane"] = lane[0].status()
    return fields


async def _report(forwarder: Forwarder, log_reader: ChildLogReader, lane: Lane | None,
                  send: Callable[[tuple[Any, ...]], None]) -> None:
    last: dict[str, Any] = {}
    while True:
        now = _status(forwarder, log_reader, lane)
        if now != last:
            send(("status", now))
            last = now
        await asyncio.sleep(STATUS_INTERVAL_S)
