"""What SIGHUP changes: the configuration file read again, and which keys take effect now.

`plan_reload(old, new)` compares two loaded configurations key by key and returns the
configuration to run with: the new values of the keys in `RELOADABLE`, the old values of
every other key (those are listed in `needs_restart`, and the broker logs each one). The
table in docs/configuration.md ("Reloading") is this set, in prose; a test keeps them equal.

Keys are named as in the TOML file (`mqtt.max_queued_messages`); a change anywhere in the
`[[listeners]]` array other than their reloadable keys needs a restart, since the sockets
are bound at start-up.

Besides the keys, every SIGHUP reads the password file and the ACL file again (`Gate.reload`,
server/gate.py), whether or not their paths changed: a file that does not load keeps the old
rules; a connected client is checked against the new rules at its next operation, and one
the new rules would not let in (its user left the password file or has a new password, or it
is anonymous where `allow_anonymous` no longer allows it) is disconnected.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from ..config import Config, check_listeners, toml_key
from ..errors import ConfigError
from . import systemd

if TYPE_CHECKING:
    from .app import BrokerApp

log = logging.getLogger("edge_broker")

# (table, field) pairs whose new value the running broker adopts on SIGHUP. Field names are
# the dataclasses' (durations carry their unit, e.g. sys_interval_s); the log names keys as
# written in the file (sys_interval).
RELOADABLE: Final[frozenset[tuple[str, str]]] = frozenset({
    ("log", "level"),
    ("auth", "allow_anonymous"),
    ("auth", "password_file"),
    ("auth", "acl_file"),
    ("quotas", "publish_msgs_per_s"),
    ("quotas", "publish_bytes_per_s"),
    ("quotas", "users"),
    ("quotas", "max_connections"),
    ("quotas", "max_connections_per_address"),
})


# Fields that are not keys of their own but say how another was written: they follow it.
FOLLOWS: Final[dict[tuple[str, str], tuple[str, str]]] = {
    ("auth", "allow_anonymous_explicit"): ("auth", "allow_anonymous"),
}


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: Config  # what the broker runs with from now on
    applied: tuple[str, ...]  # "table.field" keys whose new value was taken
    needs_restart: tuple[str, ...]  # changed keys that keep their old value until a restart


def _tables(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name != "source"}


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    applied: list[str] = []
    needs_restart: list[str] = []
    merged: dict[str, Any] = {}
    for table, old_value in _tables(old).items():
        new_value = getattr(new, table)
        if not dataclasses.is_dataclass(old_value):
            # The [[listeners]] array (and any other non-table value): restart-only as a whole.
            if new_value != old_value:
                needs_restart.append(table)
            merged[table] = old_value
            continue
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(old_value):
            before = getattr(old_value, field.name)
            after = getattr(new_value, field.name)
            if before == after:
                continue
            key = f"{table}.{toml_key(table, field.name)}"  # as written in the file
            follows = FOLLOWS.get((table, field.name))
            if follows is not None:  # taken with the key it follows; not named itself
                if follows in RELOADABLE:
                    changes[field.name] = after
                continue
            if (table, field.name) in RELOADABLE:
                changes[field.name] = after
                applied.append(key)
            else:
                needs_restart.append(key)
        merged[table] = (dataclasses.replace(cast(Any, old_value), **changes) if changes
                         else old_value)
    config = dataclasses.replace(old, **merged)
    return ReloadPlan(config, tuple(applied), tuple(needs_restart))


def reload(app: BrokerApp, load: Callable[[], Config]) -> bool:
    """SIGHUP: read the configuration again and adopt its reloadable keys. A file that does
    not load keeps everything as it was (logged as an error), and so does one whose [auth]
    would leave a running listener open to anonymous clients from the network; a password
    or ACL file that does not load keeps the running [auth] as a whole. Returns whether the
    configuration loaded and was adopted."""
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        try:
            new = load()
            plan = plan_reload(app.config, new)
            # The listeners that run (restart-only) with the new [auth]: the file was checked
            # with its own listeners, which may not be these.
            check_listeners(plan.config)
        except ConfigError as error:
            log.error("reload (SIGHUP): %s; keeping the running configuration", error)
            return False
        config, applied = plan.config, plan.applied
        if not app.gate.reload(config.auth):  # logged there; the files' rules stay
            config = dataclasses.replace(config, auth=app.config.auth)
            applied = tuple(key for key in applied if not key.startswith("auth."))
        app.config = config
        logging.getLogger().setLevel(config.log.logging_level)
        for key in plan.needs_restart:
            log.warning("reload (SIGHUP): %s changed; it takes effect after a restart", key)
        log.info("reload (SIGHUP): configuration read again; %s",
                 "applied " + ", ".join(applied) if applied else "nothing to apply")
        listeners = getattr(app, "listeners", None)  # TLS files, for new connections
        if listeners is not None and listeners.reload_tls():
            _drop_revoked(app, listeners)
        return True
    finally:
        systemd.ready()


def _drop_revoked(app: BrokerApp, listeners: Any) -> None:
    """Open connections whose client certificate the reloaded CRL lists are disconnected
    (MQTT 5: DISCONNECT 0x87 Not authorized; 3.1.1: a close), as a deleted user is."""
    from ..mqtt.types import ReasonCode

    dropped = 0
    for handler in list(app.connections):
        transport = handler.transport
        if transport is None or transport.is_closing():
            continue
        tls = listeners.tls_of(transport)
        if tls is None or not tls.is_revoked(transport):
            continue
        log.info("client %s (%s): its certificate was revoked; disconnecting it",
                 handler.client_id or "?", handler.peer)
        handler.kick_when_answered(ReasonCode.NOT_AUTHORIZED)
        dropped += 1
    if dropped:
        app.finish_batch(None, [])
