"""The JetStream downlink source (nats-py). Imported only for a "jetstream" bridge with
`downlink` subjects.

`JetStreamDownlink` binds a durable pull consumer (created when missing, with explicit acks
and the configured filter subjects) and yields each message with its stream sequence as
position; `ack(message)` acknowledges it after the local commit. Subjects map back to
topics by the reverse of the uplink's table (bridge/topic_map.py); a subject that does not
map back to a topic (`cmd.bad~zz`: not an escape of the table) is told to `rejected` (the
broker counts it in `downlink_denied` and logs it) and terminated (never redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
from nats.js import api

from edge_broker.errors import BridgeError

from .base import H_QOS, H_RETAIN, H_USER_PROPERTIES, DownlinkMessage, decode_user_properties
from .config import BridgeConfig
from .jetstream import connect, js_options
from .topic_map import subject_to_topic


class JetStreamDownlink:
    """Durable pull consumer on the downlink subjects. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, batch: int = 64, fetch_timeout: float = 1.0,
                 ack_wait: float = 30.0,
                 rejected: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.rejected = rejected if rejected is not None else _ignore
        """Told (which message, why) of each message terminated because its subject does not
        map back to a topic (server/bridge_downlink.py `_reject`)."""
        self.ack_wait = ack_wait
        """Seconds before the server redelivers a message not acknowledged (set when the
        durable consumer is created; an existing one keeps its own)."""
        self.options = js_options(config)
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self._nc: Any = None
        self._sub: Any = None

    async def start(self) -> None:
        opts = self.options
        self._nc = await connect(self.config)
        js = self._nc.jetstream()
        subjects = list(self.config.downlink)
        consumer = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT,
                                      deliver_policy=api.DeliverPolicy.ALL,
                                      ack_wait=self.ack_wait,
                                      filter_subjects=subjects if len(subjects) > 1 else None)
        self._sub = await js.pull_subscribe(subjects[0], durable=opts.downlink_durable,
                                            stream=opts.downlink_stream, config=consumer)

    async def messages(self) -> AsyncIterator[DownlinkMessage]:
        if self._sub is None:
            raise BridgeError("messages before start")
        prefix = self.options.subject_prefix
        while True:
            try:
                batch = await self._sub.fetch(self.batch, timeout=self.fetch_timeout)
            except nats.errors.TimeoutError:
                continue
            for msg in batch:
                headers = msg.headers or {}
                try:
                    topic = subject_to_topic(prefix, msg.subject)
                except ValueError as exc:
                    reason = str(exc)
                else:
                    reason = ""
                if reason:  # cannot be a local topic: told, and never redelivered
                    self.rejected(f"{msg.subject!r} (stream {self.options.downlink_stream} "
                                  f"sequence {msg.metadata.sequence.stream})",
                                  f"the subject does not map back to an MQTT topic: {reason}")
                    await msg.term()
                    continue
                props: tuple[tuple[str, str], ...] = ()
                if H_USER_PROPERTIES in headers:
                    try:
                        props = decode_user_properties(headers[H_USER_PROPERTIES])
                    except ValueError:
                        props = ()
                qos = headers.get(H_QOS, "1")
                yield DownlinkMessage(
                    topic=topic, payload=msg.data, source=self.options.downlink_stream,
                    position=msg.metadata.sequence.stream,
                    qos=int(qos) if qos in ("0", "1", "2") else 1,
                    retain=headers.get(H_RETAIN) == "1", user_properties=props, handle=msg)

    async def ack(self, message: DownlinkMessage) -> None:
        msg: Any = message.handle
        await msg.ack_sync()

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._sub = self._nc, None, None
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await asyncio.wait_for(nc.close(), 5)


def _ignore(what: str, why: str) -> None:
    return None
