"""Bridges in the core: which messages the log records for a bridge's uplink, and the
messages a bridge's downlink publishes locally.

*Uplink.* A bridge is a reader of the store's log (`bridge:<name>`). `set_uplinks` gives the
core each bridge's uplink topic filters; they go into the same trie as the named streams'
(core/streams.py), so a message one of them matches (QoS 0 included, whether or not anyone
subscribes) gets the log's next offset and a `LogAppended` record in the current batch, and a
QoS 1/2 message that only a bridge takes is acknowledged 0x00 after that batch committed.

*Downlink.* `publish_downlink` publishes a message read from the remote side: routed to the
subscribers, retained if asked, recorded by the streams and uplinks whose filters match,
with a `DownlinkPosition` record (the remote position) in the same batch, so the store
commits both in one transaction; the caller acknowledges the remote side only after that
commit. The caller (server/bridges.py) checks the ACL and drops duplicates (a position not
above the stored one) before calling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..mqtt.properties import Properties
from .changes import DownlinkPosition

if TYPE_CHECKING:
    from .broker import BrokerCore


def set_uplinks(core: BrokerCore, uplinks: Iterable[tuple[str, tuple[str, ...]]]) -> None:
    """The bridges' (reader name, uplink topic filters); after `set_streams`, before
    `restore`."""
    core.uplinks = {name: tuple(filters) for name, filters in uplinks if filters}
    core.set_streams(list(core.streams.items()))


def publish_downlink(core: BrokerCore, topic: str, payload: bytes, qos: int, retain: bool,
                     properties: Properties, *, origin: str, now: float, bridge: str,
                     source: str, position: int) -> int:
    """Publish a downlink message with its remote position in the current batch. Returns
    the number of sessions it was queued for."""
    qos = min(qos, core.settings.max_qos)
    retain = retain and core.settings.retain_available
    message = core._new_message(topic, payload, qos, retain, properties, origin, now)
    if retain:
        core._retain(message, persist=True)
    targets = core._route(message)
    core._stream_append(message)
    if source:  # MQTT QoS 0/1 have no position to keep
        core._changes.append(DownlinkPosition(bridge, source, position))
    return targets


def forget_downlink_position(core: BrokerCore, bridge: str, source: str) -> None:
    """Delete a stored position (an MQTT QoS 2 packet identifier released by PUBREL)."""
    core._changes.append(DownlinkPosition(bridge, source, -1))
