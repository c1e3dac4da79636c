"""The messages between the broker and a bridge's uplink process (server/bridge_proc.py, the
broker's side; server/bridge_child.py, the process), over one socketpair.

A frame is a 4-byte big-endian length and a pickled tuple whose first item names it. Both
ends are the same edge-broker installation (the broker starts the process with its own
interpreter), so pickle is only a compact codec here, never fed with outside data.

broker -> process:
    ("init", settings)        first: the bridge's config, the store file, ids, cursor, ...
    ("appended", offset)      the log is committed up to `offset` (answers a "wait")
    ("lane", last, cursor)    the QoS 0 lane's file is committed up to offset `last`, its
                              rows up to `cursor` deleted (answers a "lane_wait")
    ("log_dropped", after, through)
                              a drop skipped the log's rows (after, through] (answer with
                              "log_held")
    ("stop",)                 close the remote connection and exit

process -> broker:
    ("wait", offset)          wake me when the log is committed past `offset`
    ("lane_wait", offset)     wake me when the lane's file is committed past `offset`
    ("lane_ack", cursor, delivered)
                              the remote side acknowledged the lane up to `cursor`;
                              `delivered` of the messages handed out since the last one
    ("lane_held", floor, runs)
                              told of the lane's drops up to `floor`: the ((first, last),
                              ...) runs of them it had read and may still send
    ("ack", cursor, count, size, rows, held)
                              the remote side acknowledged everything up to `cursor`,
                              passing `count` of the bridge's rows (since the last "ack")
                              of `size` bytes; `rows` = their offsets and sizes,
                              interleaved in one array("q") (for the reader's backlog
                              counts: copied whole, not a tuple per row pickled and
                              rebuilt); `held` of them a drop had skipped ("log_held")
    ("log_held", through, count)
                              told of a drop up to `through`: `count` of its rows were
                              read here and not yet acknowledged (they may still be)
    ("log_released", count)   `count` rows held so were given up (not sent again)
    ("status", fields)        connected, cursor, forwarded, refused, unrouted, failures,
                              last error, oldest row
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import struct
from typing import Any, Final

from ..bridge.config import BridgeConfig, KafkaOptions
from ..bridge.topic_map import KafkaRoute

HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 64 * 1024 * 1024  # far above any real frame: a corrupt length stops here


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at the end of the stream (the other side is gone)."""
    try:
        head = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"bridge process frame of {size} bytes")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    message = pickle.loads(body)
    if not isinstance(message, tuple) or not message:
        raise ValueError("bridge process: malformed frame")
    return message


def encode_config(config: BridgeConfig) -> tuple[BridgeConfig, dict[str, Any] | None]:
    """The bridge's config for the "init" message. The Kafka routes go as pairs: `KafkaRoute`
    is compiled in the compiled build, and a compiled frozen class cannot be unpickled."""
    kafka = config.kafka
    if kafka is None:
        return config, None
    fields = {f.name: getattr(kafka, f.name) for f in dataclasses.fields(kafka)}
    fields["topic_map"] = tuple((route.filter, route.topic) for route in kafka.topic_map)
    return dataclasses.replace(config, kafka=None), fields


def decode_config(data: tuple[BridgeConfig, dict[str, Any] | None]) -> BridgeConfig:
    config, kafka = data
    if kafka is None:
        return config
    routes = tuple(KafkaRoute(str(f), str(t)) for f, t in kafka["topic_map"])
    return dataclasses.replace(config, kafka=KafkaOptions(**{**kafka, "topic_map": routes}))
