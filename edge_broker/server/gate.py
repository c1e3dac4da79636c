"""The glue between the connections and auth/: who may connect, what they may touch, how fast.

`Gate` belongs to the `BrokerApp` and holds the loaded password file (behind the off-loop
`PasswordVerifier`) and ACL, the per-address record of failed logins, the connection counts,
and the counters shown in $SYS and /metrics. `ClientHandler` asks it:

- `admit(handler)` when a connection opens: False closes it (`[quotas] max_connections` per
  listener, `max_connections_per_address` per source IP address).
- `start_authentication(handler, connect)` at CONNECT: a decision now (anonymous, certificate
  identity, no password file) or a future resolving to one (a password check runs on the
  verifier's thread pool; a refusal resolves only after the failed-login back-off of the
  source address). The handler suspends that connection meanwhile; nobody else waits.
- `allowed(handler, topic, access)` for PUBLISH (write) and each delivery (read), and
  `can_subscribe` for SUBSCRIBE, cached per connection and per topic and invalidated by a
  reload (`generation`).
- `will_allowed(client_id, username, topic)` from the core when a will is about to be published.
- `rates_for(username)` for the publish quotas (`Throttle`, used by the handler).

`reload(auth)` re-reads both files on SIGHUP; a file that does not load keeps the old rules.

Per-listener settings (`allow_anonymous`, `use_identity_as_username`) come from
`listener_of(handler)`, the listeners' own registry (server/listeners.py), and the
certificate from `peer_certificate(handler)` (`peercert`, else the `ssl_object`'s, which
uvloop's and the WebSocket adapter's transports give); a certificate with no CN or with two
is refused (auth/identity.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..auth.acl import Acl
from ..auth.identity import common_name
from ..auth.passwd import PasswordFile, PasswordHash
from ..auth.verifier import PasswordVerifier, VerifierBusy
from ..config import AuthConfig, ListenerConfig
from ..core.streams import STREAM_PREFIX, parse_stream_filter
from ..errors import ConfigError
from ..mqtt.packets import Connect
from ..mqtt.types import ReasonCode

if TYPE_CHECKING:
    from .client import ClientHandler
    from .interface import ClientHost

log = logging.getLogger("edge_broker.auth")

READ = 1
WRITE = 2

# Failed logins from one source address: the refusal of the n-th failure in a row is delayed
# by BACKOFF_BASE_S * 2**(n-1), at most BACKOFF_CAP_S (below the 10 s CONNECT timeout). The
# count is forgotten BACKOFF_FORGET_S after the last failure; at most BACKOFF_ADDRESSES
# addresses are remembered (the oldest are forgotten first).
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0
BACKOFF_FORGET_S = 60.0
BACKOFF_ADDRESSES = 10_000
LIMIT_LOG_INTERVAL_S = 10.0  # refusals for connection limits are logged at most this often
DECISION_CACHE = 1024  # per-connection ACL decisions kept before the cache is emptied


def listener_of(handler: ClientHandler) -> ListenerConfig:
    """The listener a connection came in on: the app's listener registry when it has one
    (`app.listeners.listener_of(transport)`, server/listeners.py of the TLS/WebSocket work),
    else - and for a transport it no longer knows - the first listener."""
    registry = getattr(handler.app, "listeners", None)
    if registry is not None and handler.transport is not None:
        found = registry.listener_of(handler.transport)
        if found is not None:
            return cast(ListenerConfig, found)
    return handler.app.config.listeners[0]


def peer_certificate(handler: ClientHandler) -> dict[str, Any] | None:
    """The verified client certificate of a TLS connection (`getpeercert()`), else None."""
    transport = handler.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            try:
                cert = ssl_object.getpeercert()
            except (ValueError, OSError):
                cert = None
    return cert if isinstance(cert, dict) and cert else None


def source_address(handler: ClientHandler) -> str:
    """The client's IP address, without the port ("?" when unknown)."""
    transport = handler.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "?"


def read_auth_files(auth: AuthConfig) -> tuple[PasswordFile | None, Acl | None]:
    """The password file and the ACL `[auth]` names (None where unset); ConfigError naming
    the file and line of one that does not load. (Also `check-config`'s check.)"""
    passwords = (PasswordFile.load(auth.password_file)
                 if auth.password_file is not None else None)
    acl = Acl.load(auth.acl_file) if auth.acl_file is not None else None
    return passwords, acl


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of authentication: `reason` None lets the client in as `username`."""

    username: str | None
    reason: ReasonCode | None = None
    how: str = "anonymous"  # "anonymous", "password", "certificate", "username" (no file)


class Gate:
    def __init__(self, app: ClientHost[ClientHandler]) -> None:
        self.app = app
        self.verifier: PasswordVerifier | None = None
        self.acl: Acl | None = None
        self.generation = 0  # bumped when the rules change: cached decisions are stale
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._per_address: Counter[str] = Counter()
        self._per_listener: Counter[int] = Counter()
        self._limit_logged_at = 0.0
        self._limit_unlogged = 0
        self.metrics = app.metrics  # the counters for $SYS and /metrics live there

    # -- files ------------------------------------------------------------------------

    def load(self) -> None:
        """Read the files named in [auth] (at start-up: a bad file stops the start)."""
        auth = self.app.config.auth
        passwords, acl = read_auth_files(auth)
        if passwords is not None:
            self.verifier = PasswordVerifier(passwords)
        self.acl = acl
        if passwords is not None:
            log.info("password file %s: %d users", auth.password_file, len(passwords))
        if acl is not None:
            log.info("ACL file %s: %d rules", auth.acl_file, acl.rule_count)

    def reload(self, auth: AuthConfig) -> bool:
        """SIGHUP: read both files again. A file that does not load keeps the old rules (and
        the old file's users) and is logged. Clients are checked again on their next
        operation; a client whose user is gone from the password file, or whose password
        there changed, or an anonymous one where anonymous clients are no longer allowed
        (`allow_anonymous` reloaded), is disconnected (as mosquitto does)."""
        try:
            passwords, acl = read_auth_files(auth)
        except ConfigError as error:
            log.error("reload (SIGHUP): %s; keeping the previous passwords and ACL", error)
            return False
        before = self.verifier.passwords if self.verifier is not None else None
        if passwords is None:
            if self.verifier is not None:
                self.verifier.close()
            self.verifier = None
        elif self.verifier is None:
            self.verifier = PasswordVerifier(passwords)
        else:
            self.verifier.replace(passwords)
        self.acl = acl
        self.generation += 1
        log.info("reload (SIGHUP): %s, %s",
                 f"{len(passwords)} users" if passwords is not None else "no password file",
                 f"{acl.rule_count} ACL rules" if acl is not None else "no ACL")
        self._drop_refused(before, passwords, auth)
        return True

    def _drop_refused(self, before: PasswordFile | None, passwords: PasswordFile | None,
                      auth: AuthConfig) -> None:
        """Disconnect the clients the new rules would not let in: logged in with a password
        the new file no longer holds (their user is gone, or has another hash: a new
        password; also the same one hashed again, which this cannot tell apart: the client
        logs in again), or without one where that is no longer allowed."""
        kicked = False
        for handler in list(self.app.connections):
            if handler.closed or handler.client_id is None:
                continue
            how = handler.auth_how
            if how == "password":
                user = handler.username or ""  # a password login always has one
                now = passwords.hash_of(user) if passwords is not None else None
                if now is None:
                    why = f"user {user!r} is no longer in the password file"
                elif before is not None and before.hash_of(user) != now:
                    why = f"user {user!r} has a new password in the password file"
                else:
                    continue
            elif how in ("anonymous", "username"):
                # As start_authentication decides: without credentials, or with a username
                # only a name for the ACL (no password file then).
                if how == "username" and passwords is not None:
                    why = "a password file is now required"
                elif listener_of(handler).anonymous_allowed(auth):
                    continue
                else:
                    why = "anonymous clients are no longer allowed"
            else:  # "certificate": the TLS reload (server/reload.py) checks the CRL
                continue
            log.info("client %s (%s): %s; disconnecting it", handler.client_id, handler.peer,
                     why)
            # 0x87 (5.0; 3.1.1: a close), after a CONNACK still being committed
            handler.kick_when_answered(ReasonCode.NOT_AUTHORIZED)
            kicked = True
        if kicked:
            self.app.finish_batch(None, [])

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()

    # -- connection limits --------------------------------------------------------------

    def admit(self, handler: ClientHandler) -> bool:
        quotas = self.app.config.quotas
        # Kept by the connection until it closes (release): the address string is shared
        # by all connections from it, and the listener itself is kept rather than a new int
        # (issue 12, S5: bytes per idle connection; interned strings go with their last use).
        address = sys.intern(source_address(handler))
        listener_config = listener_of(handler)
        listener = id(listener_config)
        if quotas.max_connections and self._per_listener[listener] >= quotas.max_connections:
            self._refuse_connection(handler, f"max_connections ({quotas.max_connections})")
            return False
        if (quotas.max_connections_per_address
                and self._per_address[address] >= quotas.max_connections_per_address):
            self._refuse_connection(handler, f"max_connections_per_address "
                                             f"({quotas.max_connections_per_address})")
            return False
        self._per_address[address] += 1
        self._per_listener[listener] += 1
        handler.admitted = (address, listener_config)
        return True

    def release(self, handler: ClientHandler) -> None:
        admitted = handler.admitted
        if admitted is None:
            return
        handler.admitted = None
        address, listener_config = admitted
        listener = id(listener_config)
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]
        self._per_listener[listener] -= 1
        if self._per_listener[listener] <= 0:
            del self._per_listener[listener]

    def _refuse_connection(self, handler: ClientHandler, limit: str) -> None:
        self.metrics.connections_refused += 1
        now = time.monotonic()
        if now - self._limit_logged_at >= LIMIT_LOG_INTERVAL_S:
            extra = (f" ({self._limit_unlogged} more refused since the last message)"
                     if self._limit_unlogged else "")
            log.warning("refusing a connection from %s: %s reached%s", handler.peer, limit,
                        extra)
            self._limit_logged_at = now
            self._limit_unlogged = 0
        else:
            self._limit_unlogged += 1

    # -- authentication -----------------------------------------------------------------

    def start_authentication(self, handler: ClientHandler,
                             packet: Connect) -> Decision | asyncio.Future[Decision]:
        listener = listener_of(handler)
        auth = self.app.config.auth
        if getattr(listener, "use_identity_as_username", False):
            # The certificate is the credential; the password file is not consulted.
            name = common_name(peer_certificate(handler))
            if name is None:
                return self._refusal(handler, ReasonCode.NOT_AUTHORIZED,
                                     "no usable certificate common name")
            return Decision(name, how="certificate")
        if packet.username is None:
            if listener.anonymous_allowed(auth):
                return Decision(None)
            return self._refusal(handler, ReasonCode.NOT_AUTHORIZED, "anonymous")
        verifier = self.verifier
        if verifier is None:
            # No password file: the username is only a name for the ACL (mosquitto).
            if listener.anonymous_allowed(auth) or (
                    getattr(listener, "certificate_authentication", False)
                    and peer_certificate(handler)):
                return Decision(packet.username, how="username")
            return self._refusal(handler, ReasonCode.NOT_AUTHORIZED,
                                 "no password file to check the username against")
        password = packet.password
        if password is not None and (not password or b"\0" in password):
            # No password file line can hold a NUL, and PBKDF2 pads a short password with
            # NULs (HMAC keys), so "pw" + NUL would match "pw": such a password is wrong
            # (checked against None: it still costs one hash). An empty one counts as none,
            # as in mosquitto: a user whose line hashes "" never logs in.
            password = None
        # VerifierBusy, when too many checks wait, is raised by the task (see _verified).
        future: asyncio.Future[Decision] = self.app.loop.create_future()
        # A SIGHUP while the check runs must not let in a password it revoked: the check
        # counts only if the user's line is still the one it started with.
        username = packet.username
        stored = verifier.passwords.hash_of(username)
        task = asyncio.ensure_future(verifier.verify(username, password))
        task.add_done_callback(
            lambda done: self._verified(handler, username, done, future, stored))
        return future

    def _verified(self, handler: ClientHandler, username: str, task: asyncio.Future[bool],
                  future: asyncio.Future[Decision], stored: PasswordHash | None) -> None:
        if future.done():
            return
        try:
            ok = task.result()
        except VerifierBusy:
            self.metrics.auth_refused["server_busy"] += 1
            log.warning("refusing %s: too many password checks waiting (server busy)",
                        handler.peer)
            future.set_result(Decision(username, ReasonCode.SERVER_BUSY))
            return
        except Exception:  # a bug in the verifier: refuse, never let in
            log.exception("password check for %s failed", handler.peer)
            future.set_result(Decision(username, ReasonCode.SERVER_UNAVAILABLE))
            return
        verifier = self.verifier
        if ok and (verifier is None or verifier.passwords.hash_of(username) != stored):
            log.info("user %r's password line changed (SIGHUP) while the CONNECT from %s "
                     "was checked; refusing it (the client may try again)",
                     username, handler.peer)
            ok = False
        if ok:
            future.set_result(Decision(username, how="password"))
            return
        refusal = self._refusal(handler, ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                                "bad username or password")
        delay = self._failure_delay(source_address(handler))
        if delay <= 0:
            future.set_result(refusal)
        else:
            self.app.loop.call_later(delay, _resolve, future, refusal)

    def _refusal(self, handler: ClientHandler, reason: ReasonCode, why: str) -> Decision:
        self.metrics.auth_refused[_REFUSAL_NAMES.get(reason, "other")] += 1
        log.info("refusing CONNECT from %s: %s [%s]", handler.peer, why, reason.name)
        return Decision(None, reason)

    def _failure_delay(self, address: str) -> float:
        """Record a failed login from `address`; the delay its refusal gets."""
        now = time.monotonic()
        count, last = self._failures.pop(address, (0, now))
        if now - last > BACKOFF_FORGET_S:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        while len(self._failures) > BACKOFF_ADDRESSES:
            self._failures.popitem(last=False)
        return min(BACKOFF_BASE_S * float(2 ** min(count - 1, 30)), BACKOFF_CAP_S)

    # -- authorisation ------------------------------------------------------------------

    def can_subscribe(self, handler: ClientHandler, topic_filter: str) -> bool:
        acl = self.acl
        if acl is None:
            return True
        if topic_filter.startswith(STREAM_PREFIX):
            # A `$stream/` subscription is judged by the topics it selects: its own filter,
            # else the stream's. (An unknown or malformed one is the core's 0x8F.) Each
            # replayed message is checked again on delivery, under its original topic.
            parsed = parse_stream_filter(topic_filter)
            streams = self.app.core.streams
            if parsed is None or parsed.name not in streams:
                return True
            topic_filter = parsed.topic_filter or streams[parsed.name]
        allowed = acl.can_subscribe(topic_filter, username=handler.username,
                                    client_id=handler.client_id or "")
        if not allowed:
            self.metrics.acl_denied["subscribe"] += 1
        return allowed

    def will_allowed(self, client_id: str, username: str | None, topic: str) -> bool:
        """Called by the core before it publishes a will [MQTT-3.1.2-8] (5.0): the will
        topic must be writable by its client (as for a PUBLISH), checked now, as mosquitto
        does. `username` is the one its session's last connection authenticated as (stored
        with the session, so a session restored after a restart keeps it; None: anonymous)."""
        acl = self.acl
        if acl is None:
            return True
        if acl.can_publish(topic, username=username, client_id=client_id):
            return True
        self.metrics.acl_denied["will"] += 1
        log.info("will of client %s on %r not published: the ACL does not let it write there",
                 client_id, topic)
        return False


def _resolve(future: asyncio.Future[Decision], decision: Decision) -> None:
    if not future.done():
        future.set_result(decision)


_REFUSAL_NAMES = {
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: "bad_credentials",
    ReasonCode.NOT_AUTHORIZED: "not_authorized",
    ReasonCode.SERVER_BUSY: "server_busy",
}


class Throttle:
    """A client's publish quota: two token buckets (messages and bytes per second).

    `charge` takes one PUBLISH; a bucket may go into debt by one packet. While in debt
    (`delay() > 0`) the connection handles nothing more and reads nothing: its next turn is
    scheduled when the debt is paid. The bucket holds at most BURST_S seconds of credit, so a
    client idle for a while cannot send a long burst above its rate.
    """

    __slots__ = ("_bytes", "_msgs", "bytes_rate", "msgs_rate", "stamp")

    BURST_S = 0.1

    def __init__(self, msgs_rate: float, bytes_rate: float, now: float) -> None:
        self.msgs_rate = msgs_rate
        self.bytes_rate = bytes_rate
        self._msgs = msgs_rate * self.BURST_S
        self._bytes = bytes_rate * self.BURST_S
        self.stamp = now

    @property
    def limited(self) -> bool:
        return bool(self.msgs_rate or self.bytes_rate)

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.stamp = now
            if self.msgs_rate:
                self._msgs = min(self._msgs + elapsed * self.msgs_rate,
                                 self.msgs_rate * self.BURST_S)
            if self.bytes_rate:
                self._bytes = min(self._bytes + elapsed * self.bytes_rate,
                                  self.bytes_rate * self.BURST_S)

    def charge(self, size: int, now: float) -> None:
        self._refill(now)
        if self.msgs_rate:
            self._msgs -= 1
        if self.bytes_rate:
            self._bytes -= size

    def delay(self, now: float) -> float:
        """Seconds until neither bucket is in debt (0 when the client may go on now)."""
        self._refill(now)
        wait = 0.0
        if self.msgs_rate and self._msgs < 0:
            wait = -self._msgs / self.msgs_rate
        if self.bytes_rate and self._bytes < 0:
            wait = max(wait, -self._bytes / self.bytes_rate)
        return wait
