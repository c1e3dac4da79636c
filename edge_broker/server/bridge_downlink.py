"""A bridge's downlink: messages from the remote side published into the local broker.

The remote side (JetStream durable pull consumer, Kafka consumer group, an MQTT bridge's
subscriptions) is read by `_downlink_loop` (MQTT: `_consume_upstream`, on the uplink's
connection). Each message is published as the bridge's identity, if the ACL lets that
identity write the topic, and its remote position goes into the same batch (one
transaction); the remote side is acknowledged only after that commit. See the theory of
operation in server/bridges.py ("Downlink").

A message that cannot be published locally, whatever the ACL, is acknowledged (JetStream:
terminated) so that it is not redelivered, counted in `downlink_denied` like one the ACL
refuses, and logged (`_reject`, at most one line per 10 s, telling those held back): a
JetStream subject that does not map back to a topic (`cmd.bad~zz`), a topic that is not a
valid MQTT topic name (a Kafka record's `mqtt-topic` header `cmd/+/x`), a `$` topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from ..bridge.base import Backoff, DownlinkMessage, DownlinkSource, shown_topic
from ..bridge.config import BridgeConfig
from ..core.downlink import forget_downlink_position, publish_downlink
from ..mqtt.properties import NO_PROPERTIES, Properties
from ..mqtt.topics import is_valid_topic_name
from .bridge_status import BridgeStatus
from .droplog import DropLog

if TYPE_CHECKING:
    from .bridges import BridgeManager

__all__ = ["DownlinkSide"]

log = logging.getLogger("edge_broker.bridges")


class DownlinkSide:
    """The downlink half of `server.bridges.Bridge` (its base class)."""

    manager: BridgeManager
    config: BridgeConfig
    status: BridgeStatus
    username: str
    _rejected = 0  # messages `_reject` was told of (class defaults: Bridge sets the rest)
    _rejected_log: DropLog | None = None

    def _error(self, exc: BaseException, where: str) -> None:
        status = self.status
        status.failed(f"{where}: {type(exc).__name__}: {exc}")
        log.warning("bridge %s: %s; retrying", self.config.name, status.last_error)

    async def _consume_upstream(self, upstream: Any) -> None:
        """The downlink of an MQTT bridge's connection. A local failure (the store) drops the
        connection: the upstream sends what was not acknowledged again on the next one."""
        try:
            await self._consume(upstream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("bridge %s: downlink failed locally", self.config.name)
            self._error(exc, "downlink")
            upstream.abort()

    async def _downlink_loop(self) -> None:
        config = self.config
        backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        while True:
            source = self._make_downlink()
            try:
                await source.start()  # type: ignore[attr-defined]
                self.status.downlink_connected = True
                backoff.reset()
                await self._consume(source)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error(exc, "downlink")
            finally:
                self.status.downlink_connected = False
                self._log_rejected(every=True)
                with contextlib.suppress(Exception):
                    await source.close()
            await asyncio.sleep(backoff.next_delay())

    def _make_downlink(self) -> DownlinkSource:
        if self.config.kind == "jetstream":
            from ..bridge.jetstream_downlink import JetStreamDownlink

            return JetStreamDownlink(self.config, rejected=self._reject)
        from ..bridge.kafka import KafkaDownlink

        return KafkaDownlink(self.config)

    async def _consume(self, source: DownlinkSource) -> None:
        async for message in source.messages():
            await self._take(source, message)

    async def _take(self, source: DownlinkSource, message: DownlinkMessage) -> None:
        manager = self.manager
        app = manager.app
        status = self.status
        name = self.config.name
        key_source, position = self._position_key(message)
        stored = manager.positions.get((name, key_source)) if key_source else None
        if stored is not None and position <= stored:
            status.downlink_duplicates += 1  # committed before a crash: not again
            await source.ack(message)
            return
        topic = message.topic
        identity = self.config.downlink_identity
        acl = app.gate.acl
        invalid = _invalid_topic(topic)
        if invalid:
            self._reject(f"{shown_topic(topic)} ({_where(self.config.kind, message)})", invalid)
            await source.ack(message)
            return
        if not (acl is None or acl.can_publish(topic, username=self.username,
                                                client_id=identity)):
            status.downlink_denied += 1
            log.warning("bridge %s: downlink message on %r not published: not a topic %s "
                        "may write", name, topic, self.username)
            await source.ack(message)
            return
        properties = message.properties  # MQTT upstream: all of them (5.0)
        if properties is None:
            properties = (Properties(user_properties=tuple(message.user_properties))
                          if message.user_properties else NO_PROPERTIES)
        publish_downlink(app.core, topic, message.payload, message.qos, message.retain,
                         properties, origin=identity, now=time.time(), bridge=name,
                         source=key_source, position=position)
        if key_source:
            # Known before the wait: when this task is cancelled during it (an MQTT bridge's
            # connection replaced), the commit still goes on, and the resend must be
            # recognised (tests/bridge/test_downlink_cancel.py).
            manager.positions[(name, key_source)] = position
        try:
            # The message and its position, one transaction. Shielded: cancelling this task
            # must not cancel a commit future other clients' replies wait on.
            await asyncio.shield(app.commit())
        except asyncio.CancelledError:
            raise
        except Exception:
            if key_source:  # not stored: a resend is to be published
                if stored is None:
                    manager.positions.pop((name, key_source), None)
                else:
                    manager.positions[(name, key_source)] = stored
            raise
        status.downlink_published += 1
        await source.ack(message)

    def _reject(self, what: str, why: str) -> None:
        """A downlink message that cannot be published locally (see the module docstring):
        counted in `downlink_denied` and logged; the caller has it acknowledged remotely."""
        self.status.downlink_denied += 1
        self._rejected += 1
        if self._rejected_log is None:
            self._rejected_log = DropLog()
        new = self._rejected_log.due(self._rejected)
        if new:
            log.warning("bridge %s: downlink message %s not published: %s; acknowledged, not "
                        "redelivered (counted in downlink_denied)%s", self.config.name, what,
                        why, f"; {new - 1} more since the last line" if new > 1 else "")

    def _log_rejected(self, *, every: bool = False) -> None:
        """The rejections `_reject` held back (the rate limit), told now with `every`."""
        new = self._rejected_log.due(self._rejected, every=every) if self._rejected_log else 0
        if new:
            log.warning("bridge %s: %d more downlink message(s) not published (not valid "
                        "topics; counted in downlink_denied)", self.config.name, new)

    def _position_key(self, message: DownlinkMessage) -> tuple[str, int]:
        """(source to store, position); ("", 0) when there is none (MQTT QoS 0/1)."""
        if self.config.kind != "mqtt":
            return message.source, message.position
        if message.qos == 2:
            # Held from the local commit until PUBREL: a resend with it is a duplicate.
            return f"{message.source}#{message.position}", 0
        return "", 0

    def _mqtt_released(self, upstream: Any, packet_id: int) -> asyncio.Future[None] | None:
        """PUBREL: forget the held identifier; the future is done once that is durable (the
        upstream sends PUBCOMP only then, see bridge/mqtt_upstream.py)."""
        key = f"{upstream.source}#{packet_id}"
        manager = self.manager
        if manager.positions.pop((self.config.name, key), None) is None:
            return None
        forget_downlink_position(manager.app.core, self.config.name, key)
        forgotten: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if manager.app.commit_now_or_later(partial(_set_done, forgotten)):
            return None
        return forgotten


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _invalid_topic(topic: str) -> str:
    """Why `topic` can be published by no one, or "" (the ACL decides then)."""
    if not is_valid_topic_name(topic):
        return ("not a valid MQTT topic name (empty, a wildcard + or #, a NUL character, or "
                "over 65,535 bytes)")
    if topic.startswith("$"):
        return "a topic starting with $ is the broker's own"
    return ""


def _where(kind: str, message: DownlinkMessage) -> str:
    if kind == "kafka":  # source: "<kafka topic>:<partition>"
        return f"record {message.source} offset {message.position}"
    if kind == "jetstream":
        return f"stream {message.source} sequence {message.position}"
    return f"from {message.source}"
