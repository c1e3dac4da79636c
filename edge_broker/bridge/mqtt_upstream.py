"""The MQTT upstream bridge: an asyncio client on our sans-IO `Connection` (CLIENT role).

Theory of operation
-------------------
`MqttUpstream.start()` tries the configured servers in turn (`mqtt://host:port`,
`mqtts://host:port`) until one answers CONNECT with success: from the first, or with
`round_robin` from the one after the last connection's; connected to another than the
first without `round_robin`, it watches for the first to come back and then asks the
forwarder for a new connection (`Reconnect`; bridge/mqtt_servers.py). The CONNECT asks to resume the
session (clean start false; on MQTT 5 with the configured Session Expiry Interval), so the
remote broker keeps our subscriptions and queues downlink messages while the gateway is
away. It carries a will: the notification topic with payload "0", retained, so the remote
side learns that the link is down; after the CONNACK the bridge publishes "1" there,
retained. On MQTT 3.1.1 with `try_private`, the protocol level byte is sent with bit 0x80
set (mosquitto's bridge marker: a mosquitto remote then does not send our own messages
back); if the remote refuses that, the next attempt goes without it. On MQTT 5 every
downlink subscription sets No Local instead, for the same loop prevention.

Uplink: `send(batch)` maps each message's local topic through the topic lines ("out" and
"both") to a remote topic (the first line that sends it) and publishes it at the lower of its
own QoS and the line's (the highest of the lines that send it: bridge/topic_map.py
`map_topic_out`). On MQTT 5 the PUBLISH carries the properties the log kept for it (payload
format, content type, response topic, correlation data, user properties), unaltered
[MQTT-3.3.2-4] [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-20] (5.0), and, for a message
with a Message Expiry Interval, the interval left [MQTT-3.3.2-6] (5.0). A message whose
expiry passed before it could be sent (an outage, a backlog) is not sent [MQTT-3.3.2-5]
(5.0), on either version: done, and counted in `expired` (the bridge's `expired` figure,
bridge/forward.py `take_passed`). QoS 1/2 publishes of a window go out at once, as many as
the remote's Receive Maximum and the bridge's `window` allow, then their acks are awaited in
order; the return value is how many from the start of the batch are done (QoS 0 ones are
done when written; a message no line sends is done, counted in `unmapped`, the bridge's
`unrouted`, and logged once per topic; one larger than the remote's Maximum Packet Size is
done, not sent, counted in `oversize`, the bridge's `refused`, and logged). Unacknowledged
publishes are kept, by packet identifier, across reconnects: when the remote resumes the
session they are resent with DUP set (a QoS 2 one that got its PUBREC gets its PUBREL again)
[MQTT-4.4.0-1] (3.1.1/5.0), so a QoS 2 message is not duplicated by a reconnect. A `send`
repeating a message already in flight waits for that exchange instead of publishing it again.

Downlink: the remote filters of the "in" and "both" lines are subscribed at the lines' QoS
(2 unless the line says otherwise: the only one that is exactly once). Each PUBLISH
received is mapped to its local topic and yielded by `messages()`, with its properties (the
local broker keeps those that go on to subscribers, and the expiry); `ack(message)` after the
local commit sends PUBACK (QoS 1) or PUBREC (QoS 2).
For QoS 2 the local side must keep the packet identifier (`position`, source
"mqtt:<client id>") with the message until PUBREL releases it: a PUBLISH with an identifier
it still holds is a resend and is acknowledged without publishing it again. `on_release`
is called with the identifier when the PUBREL arrives; when it returns a future (the local
store forgetting the identifier), PUBCOMP is sent only once that future is done, else at
once. So the remote never reuses an identifier the gateway still holds (a crash in between
leaves the PUBREL unanswered and the remote repeats it): a command is neither lost nor
doubled by a gateway crash at any point of the exchange.

Keep alive: a PINGREQ every keep-alive / 2 while idle; a connection silent for 1.5 x the
keep alive is closed [MQTT-3.1.2-24] (3.1.1). A lost connection fails the waiting sends and
ends `wait_lost()` (the forwarder waits on it while idle, so a link lost while nothing goes
up is replaced too, and the downlink goes on); the caller's loop, with backoff, makes a new
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edge_broker.errors import BridgeError
from edge_broker.mqtt.connection import Connection
from edge_broker.mqtt.errors import LocalProtocolError, RemoteProtocolError
from edge_broker.mqtt.packets import (
    Disconnect,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
)
from edge_broker.mqtt.properties import Properties, expiry_left
from edge_broker.mqtt.types import ProtocolLevel

from .base import (
    BridgeMessage,
    DownlinkMessage,
    OncePerKey,
    Reconnect,
    WarnEvery,
    shown_topic,
    ssl_context,
)
from .config import BridgeConfig, MqttOptions
from .mqtt_servers import ServerChoice, answers
from .mqtt_upstream_wire import (
    BRIDGE_LEVEL_BIT,
    address,
    connect_packet,
    handshake,
    properties,
)
from .topic_map import map_topic_in, map_topic_out

log = logging.getLogger(__name__)

__all__ = ["BRIDGE_LEVEL_BIT", "MqttUpstream"]
# Per bridge: the unmapped topics logged, and the oversize warnings' rate limit.
_UNMAPPED: dict[str, OncePerKey] = {}
_OVERSIZE: dict[str, WarnEvery] = {}


@dataclass(slots=True)
class _InFlight:
    offset: int
    publish: Publish
    future: asyncio.Future[None]
    pubrec_received: bool = False
    expires_at: float | None = None  # a resend carries the interval left then


@dataclass(slots=True)
class _Link:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Connection
    server: str
    session_present: bool
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class MqttUpstream:
    """One bridge connection to an upstream MQTT broker. See the module docstring."""

    def __init__(self, config: BridgeConfig, *, ack_timeout: float = 10.0,
                 connect_timeout: float = 5.0,
                 on_release: Callable[[int], asyncio.Future[None] | None] | None = None
                 ) -> None:
        if config.mqtt is None:
            raise BridgeError(f"bridge {config.name!r} is not an mqtt bridge")
        self.config = config
        self.options: MqttOptions = config.mqtt
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.on_release = on_release
        self.level = (ProtocolLevel.MQTT_5 if self.options.mqtt_version == "5"
                      else ProtocolLevel.MQTT_3_1_1)
        self.try_private = self.options.try_private and self.level == ProtocolLevel.MQTT_3_1_1
        self.unmapped = 0
        """Messages no "out"/"both" topic line sends (skipped, the cursor moves on)."""
        self.oversize = 0
        """Messages larger than the remote's Maximum Packet Size (not sent, counted)."""
        # Of those three, not yet taken by `take_passed` (the forwarder's figures).
        self._untold = [0, 0, 0]
        self.expired = 0
        """Messages whose Message Expiry Interval passed before they could be sent (not
        sent; counted once the window's messages up to them are done)."""
        self.last_error: str | None = None
        self.session_present = False
        self._link: _Link | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._by_offset: dict[int, int] = {}
        self._next_id = 1
        self._downlink: asyncio.Queue[DownlinkMessage] = asyncio.Queue()
        self._suback: asyncio.Future[SubAck] | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self.choice = ServerChoice(config.servers, round_robin=self.options.round_robin,
                                   primary_retry_s=self.options.primary_retry_s)
        self._first_back: asyncio.Event = asyncio.Event()  # see `_watch_first`

    def resume_from(self, previous: MqttUpstream) -> None:
        """Take over what `previous` (this bridge's last connection object, closed) left in
        flight, before `start`: resent with their packet identifiers once connected (with DUP
        when the remote resumed the session), so a new object per reconnect does not send a
        QoS 2 message again as a new one. Its downlink queue is not taken: the remote sends
        what was not acknowledged again."""
        self._inflight, previous._inflight = previous._inflight, {}
        self._by_offset, previous._by_offset = previous._by_offset, {}
        self._next_id = previous._next_id
        self.choice = previous.choice

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def source(self) -> str:
        return f"mqtt:{self.options.client_id}"

    # ------------------------------------------------------------------ connecting

    async def start(self) -> None:
        """Connect to the first server that accepts; BridgeError when none does."""
        errors: list[str] = []
        choice = self.choice
        for index in choice.order():
            server = self.config.servers[index]
            try:
                await self._connect(server)
            except (OSError, TimeoutError, BridgeError, RemoteProtocolError) as exc:
                errors.append(f"{server}: {exc}")
                continue
            choice.connected(index)
            if errors:
                log.info("bridge %s: connected to %s (%s)", self.config.name, server,
                         "; ".join(errors))
            link = self._link
            if choice.checks_first and link is not None:
                link.tasks.append(asyncio.ensure_future(self._watch_first(link)))
            return
        self.last_error = "; ".join(errors)
        raise BridgeError(f"no upstream accepted the connection: {self.last_error}")

    async def _connect(self, server: str) -> None:
        host, port, secure = address(server, self.config.tls.enabled)
        context: ssl.SSLContext | None = None
        if secure:
            context = ssl_context(self.config.tls) or ssl.create_default_context()
        server_hostname = self.config.tls.server_name or host if context else None
        for private in [True, False] if self.try_private else [False]:
            try:
                reader, writer, conn, connack, early = await asyncio.wait_for(
                    handshake(server, host, port, context, server_hostname,
                              connect_packet(self.config, self.level), private),
                    self.connect_timeout)
                break
            except BridgeError:
                if not private:
                    raise
                log.info("bridge %s: %s refused the bridge marker (try_private), retrying "
                         "without it", self.config.name, server)
        link = _Link(reader, writer, conn, server, connack.session_present)
        self._link = link
        self._lost = asyncio.Event()
        self.session_present = connack.session_present
        self.last_error = None
        for packet in early:
            self._handle(link, packet)
        link.tasks.append(asyncio.ensure_future(self._read_loop(link)))
        if self.options.keepalive_s:
            link.tasks.append(asyncio.ensure_future(self._keepalive_loop(link)))
        self._resume_inflight(link)
        await self._subscribe(link)
        if self.options.notification_topic:
            self._write(link, Publish(self.options.notification_topic, b"1", qos=0,
                                      retain=True))

    def _resume_inflight(self, link: _Link) -> None:
        """Resend what the previous connection left unacknowledged, in order."""
        for packet_id, entry in sorted(self._inflight.items(),
                                       key=lambda item: item[1].offset):
            if entry.pubrec_received and link.session_present:
                self._write(link, PubRel(packet_id))
            else:
                entry.pubrec_received = False
                publish = entry.publish
                props = publish.properties
                if entry.expires_at is not None and props.message_expiry_interval is not None:
                    # Sent again, also once expired (the remote may hold its identifier).
                    props = replace(props, message_expiry_interval=expiry_left(
                        entry.expires_at, time.time()))
                resend = Publish(publish.topic, publish.payload, publish.qos, publish.retain,
                                 dup=link.session_present, packet_id=packet_id,
                                 properties=props)
                self._write(link, resend)

    async def _subscribe(self, link: _Link) -> None:
        v5 = self.level == ProtocolLevel.MQTT_5
        subs = tuple(Subscription(line.remote_filter, qos=line.qos, no_local=v5,
                                  retain_as_published=v5)
                     for line in self.options.topics if line.downlink)
        if not subs:
            return
        self._suback = asyncio.get_running_loop().create_future()
        self._write(link, Subscribe(self._allocate_id(), subs))
        suback = await asyncio.wait_for(self._suback, self.ack_timeout)
        refused = [s.topic_filter for s, code in zip(subs, suback.reason_codes, strict=False)
                   if code >= 0x80]
        if refused:
            log.warning("bridge %s: %s refused the subscriptions %s", self.config.name,
                        link.server, refused)

    # ------------------------------------------------------------------ uplink

    def _allocate_id(self) -> int:
        for _ in range(65535):
            packet_id = self._next_id
            self._next_id = packet_id % 65535 + 1
            if packet_id not in self._inflight:
                return packet_id
        raise BridgeError("no free packet identifier")

    async def send(self, batch: Sequence[BridgeMessage]) -> int:
        """Publish the window; the number done from its start (see module doc)."""
        link = self._link
        if link is None:
            raise BridgeError("not connected")
        if self._first_back.is_set():
            raise self._moving_back()
        lines = self.options.topics
        v5 = self.level == ProtocolLevel.MQTT_5
        now = time.time()  # the log's expires_at is wall clock
        waits: list[asyncio.Future[None] | None] = []
        # where in `waits` expired, oversize and unmapped messages are
        passed: tuple[list[int], list[int], list[int]] = ([], [], [])
        expired, oversize, unmapped = passed
        if (link.conn.send_quota < 1 and self._inflight and batch
                and batch[0].offset not in self._by_offset):
            # Receive Maximum taken by messages in flight before this window (a previous
            # connection's, resent): wait for their acks, not drop the link before they come.
            lost_wait: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
            acks: set[asyncio.Future[Any]] = {e.future for e in self._inflight.values()}
            await asyncio.wait({*acks, lost_wait}, timeout=self.ack_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            lost_wait.cancel()
        budget = min(self.config.window, link.conn.send_quota)
        for message in batch:
            packet_id = self._by_offset.get(message.offset)
            if packet_id is not None and packet_id in self._inflight:
                waits.append(self._inflight[packet_id].future)
                continue
            expires_at = message.expires_at
            if expires_at is not None and expires_at <= now:
                # [MQTT-3.3.2-5] (5.0): its expiry passed before it could be sent on.
                expired.append(len(waits))
                waits.append(None)
                continue
            mapped = map_topic_out(lines, message.topic)
            if mapped is None:
                if _UNMAPPED.setdefault(self.config.name, OncePerKey()).first(message.topic):
                    log.warning("bridge %s: no topic line sends %s (log offset %d): not sent, "
                                "counted in unrouted (logged once per topic)",
                                self.config.name, shown_topic(message.topic), message.offset)
                unmapped.append(len(waits))
                waits.append(None)
                continue
            remote_topic, line_qos = mapped
            # [MQTT-3.2.2-11] (5.0): not above the server's Maximum QoS.
            qos = min(message.qos, line_qos, link.conn.peer_maximum_qos)
            # [MQTT-3.2.2-14] (5.0): no retain flag when the server has no retain.
            retain = message.retain and link.conn.peer_retain_available
            if qos and budget <= len([w for w in waits if w is not None]):
                break
            publish = Publish(remote_topic, message.payload, qos, retain,
                              packet_id=self._allocate_id() if qos else None,
                              properties=properties(message, now) if v5 else Properties())
            try:
                data = link.conn.send(publish)
            except LocalProtocolError as exc:
                raise BridgeError(f"cannot publish {remote_topic!r}: {exc}") from exc
            if not data:
                # Larger than the remote's Maximum Packet Size: it would refuse it, so it is
                # not sent, counted and logged ([MQTT-3.1.2-25] (5.0)).
                _OVERSIZE.setdefault(self.config.name, WarnEvery(log)).warn(
                    "oversize", "bridge %s: the message at log offset %d, topic %s (%d bytes) "
                    "is larger than %s accepts (its Maximum Packet Size); not sent, counted "
                    "in refused", self.config.name, message.offset, shown_topic(message.topic),
                    len(message.payload), link.server)
                oversize.append(len(waits))
                waits.append(None)
                continue
            link.writer.write(data)
            if not qos:
                waits.append(None)  # QoS 0: done when written
                continue
            assert publish.packet_id is not None
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._inflight[publish.packet_id] = _InFlight(message.offset, publish, future,
                                                          expires_at=expires_at)
            self._by_offset[message.offset] = publish.packet_id
            waits.append(future)
        with contextlib.suppress(ConnectionError):
            await link.writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        pending: list[asyncio.Future[None]] = [w for w in waits if w is not None and not w.done()]
        lost_event = self._lost
        while pending and not lost_event.is_set() and loop.time() < deadline:
            lost: asyncio.Future[Any] = asyncio.ensure_future(lost_event.wait())
            waiting: set[asyncio.Future[Any]] = {*pending, lost}
            await asyncio.wait(waiting, timeout=deadline - loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            pending = [w for w in pending if not w.done()]
        done = 0
        for wait in waits:
            if wait is not None and not wait.done():
                break
            done += 1
        # Counted once: those after `done` are read and looked at again.
        expired_n, oversize_n, unmapped_n = (sum(1 for index in indexes if index < done)
                                             for indexes in passed)
        self.expired += expired_n
        self.oversize += oversize_n
        self.unmapped += unmapped_n
        untold = self._untold
        untold[0] += expired_n
        untold[1] += oversize_n
        untold[2] += unmapped_n
        if done == 0 and waits:
            raise BridgeError("no acknowledgement from upstream"
                              + (": connection lost" if self._link is None else
                                 f" within {self.ack_timeout} s"))
        return done

    def take_passed(self, batch: Sequence[BridgeMessage],
                    acknowledged: int) -> tuple[int, int, int]:
        """(expired, oversize, unmapped) messages the sends done since the last call passed
        without sending them: the forwarder's `expired`, `refused` and `unrouted`."""
        untold, self._untold = self._untold, [0, 0, 0]
        return untold[0], untold[1], untold[2]

    # ------------------------------------------------------------------ receiving

    async def _read_loop(self, link: _Link) -> None:
        try:
            while True:
                chunk = await link.reader.read(65536)
                if not chunk:
                    raise ConnectionError("closed by the upstream")
                self._seen = asyncio.get_running_loop().time()
                for packet in link.conn.receive_packets(chunk):
                    self._handle(link, packet)
        except (OSError, ConnectionError, RemoteProtocolError, LocalProtocolError) as exc:
            self._drop(link, str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            pass

    def _handle(self, link: _Link, packet: Packet) -> None:
        if isinstance(packet, PubAck | PubComp):
            entry = self._inflight.pop(packet.packet_id, None)
            if entry is not None:
                self._by_offset.pop(entry.offset, None)
                if not entry.future.done():
                    entry.future.set_result(None)
        elif isinstance(packet, PubRec):
            entry = self._inflight.get(packet.packet_id)
            if packet.reason_code >= 0x80:
                # 4.9 (5.0): a failing PUBREC ends the exchange; the remote refused it.
                if entry is not None:
                    log.warning("bridge %s: upstream refused %r with 0x%02X",
                                self.config.name, entry.publish.topic, packet.reason_code)
                    self._inflight.pop(packet.packet_id)
                    self._by_offset.pop(entry.offset, None)
                    entry.future.set_result(None)
                return
            if entry is not None:
                entry.pubrec_received = True
            self._write(link, PubRel(packet.packet_id))
        elif isinstance(packet, Publish):
            self._received_publish(packet)
        elif isinstance(packet, PubRel):
            released = self.on_release(packet.packet_id) if self.on_release else None
            if released is None:
                self._write(link, PubComp(packet.packet_id))
            else:
                # PUBCOMP only once the identifier is durably forgotten: after PUBCOMP the
                # remote may reuse it for a new message, which a stale stored identifier would
                # take for a resend and drop. A crash before that leaves the PUBREL
                # unanswered, and the remote sends it again [MQTT-4.4.0-1] (5.0).
                released.add_done_callback(
                    functools.partial(self._released, link, packet.packet_id))
        elif isinstance(packet, SubAck):
            if self._suback is not None and not self._suback.done():
                self._suback.set_result(packet)
        elif isinstance(packet, Disconnect):
            raise ConnectionError(f"DISCONNECT 0x{packet.reason_code:02X} from the upstream")

    def _released(self, link: _Link, packet_id: int, released: asyncio.Future[None]) -> None:
        if released.cancelled() or released.exception() is not None:
            # Not forgotten: drop the link, so that the remote sends the PUBREL again.
            self._drop(link, f"packet identifier {packet_id} not released locally")
        elif self._link is link:
            self._write(link, PubComp(packet_id))

    def _received_publish(self, packet: Publish) -> None:
        local = map_topic_in(self.options.topics, packet.topic)
        message = DownlinkMessage(
            topic=local or "", payload=packet.payload, source=self.source,
            position=packet.packet_id or 0, qos=packet.qos, retain=packet.retain,
            user_properties=packet.properties.user_properties, handle=packet,
            properties=packet.properties)
        if local is None:
            log.warning("bridge %s: no topic line takes %r from upstream", self.config.name,
                        packet.topic)
            self._ack_remote(message)  # not ours to publish; do not get it again
            return
        self._downlink.put_nowait(message)

    async def wait_lost(self) -> str:
        """Return (the reason) once the connection is lost: the forwarder, idle while the
        log has nothing to send, then replaces this connection, which also carries the
        downlink. Raises `Reconnect` once the first address answers again (`_watch_first`)."""
        lost = asyncio.ensure_future(self._lost.wait())
        back = asyncio.ensure_future(self._first_back.wait())
        try:
            await asyncio.wait((lost, back), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            back.cancel()
        if not self._lost.is_set():
            raise self._moving_back()
        return self.last_error or "closed"

    async def _watch_first(self, link: _Link) -> None:
        """Connected to another address than the first (without `round_robin`): check the
        first every `choice.interval` seconds; once it takes a TCP connection, the next
        `send` or `wait_lost` raises `Reconnect`, and the forwarder connects again from it."""
        host, port, _ = address(self.config.servers[0], self.config.tls.enabled)
        try:
            while self._link is link:
                await asyncio.sleep(self.choice.interval)
                if await answers(host, port, self.connect_timeout) and self._link is link:
                    self._first_back.set()
                    return
        except asyncio.CancelledError:
            pass

    def _moving_back(self) -> Reconnect:
        self.choice.moving_back = True
        return Reconnect(f"{self.config.servers[0]} (the first address) answers again; "
                         f"leaving {self._link.server if self._link else 'the backup'}")

    async def messages(self) -> AsyncIterator[DownlinkMessage]:
        while True:
            yield await self._downlink.get()

    async def ack(self, message: DownlinkMessage) -> None:
        """After the local commit: PUBACK (QoS 1) or PUBREC (QoS 2)."""
        self._ack_remote(message)

    def _ack_remote(self, message: DownlinkMessage) -> None:
        link = self._link
        if link is None or not message.qos:
            return
        ack = PubAck(message.position) if message.qos == 1 else PubRec(message.position)
        self._write(link, ack)

    # ------------------------------------------------------------------ plumbing

    _seen: float = 0.0

    async def _keepalive_loop(self, link: _Link) -> None:
        keepalive = self.options.keepalive_s
        loop = asyncio.get_running_loop()
        self._seen = loop.time()
        try:
            while self._link is link:
                await asyncio.sleep(keepalive / 2)
                if loop.time() - self._seen > keepalive * 1.5:
                    self._drop(link, f"no packet from the upstream for {keepalive * 1.5} s")
                    return
                self._write(link, PingReq())
        except asyncio.CancelledError:
            pass

    def _write(self, link: _Link, packet: Packet) -> None:
        try:
            data = link.conn.send(packet)
        except LocalProtocolError as exc:
            self._drop(link, f"cannot send {type(packet).__name__}: {exc}")
            return
        if data and not link.writer.is_closing():
            link.writer.write(data)

    def _drop(self, link: _Link, reason: str) -> None:
        if self._link is not link:
            return
        self._link = None
        self.last_error = f"{link.server}: {reason}"
        log.warning("bridge %s: connection lost: %s", self.config.name, self.last_error)
        link.writer.transport.abort()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._lost.set()
        if self._suback is not None and not self._suback.done():
            self._suback.set_exception(BridgeError("connection lost"))

    async def close(self) -> None:
        """Disconnect normally (the will is not published; the state topic is set to "0")."""
        link = self._link
        if link is None:
            return
        if self.options.notification_topic:
            self._write(link, Publish(self.options.notification_topic, b"0", qos=0,
                                      retain=True))
        self._write(link, Disconnect())
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(link.writer.drain(), 2)
        self._link = None
        link.writer.close()
        for task in link.tasks:
            task.cancel()
        self._lost.set()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (as a crash or a cut link would)."""
        if self._link is not None:
            self._drop(self._link, "aborted")
