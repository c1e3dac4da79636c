"""The arrays of tables with rules beyond one key: [[listeners]] (at least one; the TLS keys
that only make sense together) and [[quotas.users]] (a username each, no user twice)."""

from __future__ import annotations

from edge_broker.config.messages import _error, _show
from edge_broker.config.model import DEFAULT_HOST, DEFAULT_PORT, ListenerConfig, UserQuota
from edge_broker.config.schema import _parse_table
from edge_broker.errors import ConfigError


def _parse_user_quotas(value: object, file: str | None) -> tuple[UserQuota, ...]:
    if not isinstance(value, list):
        raise _error(f"expected an array of tables, written [[quotas.users]], got {_show(value)}",
                     file=file, table="quotas", key="users")
    entries: list[UserQuota] = []
    seen: set[str] = set()
    for index, entry in enumerate(value):
        label = f"[[quotas.users]] #{index + 1}"
        if not isinstance(entry, dict):
            raise _error(f"expected a table, got {_show(entry)}", file=file, table=label)
        values = _parse_table(entry, "quotas.users", label, file)
        username = values.get("username")
        if not isinstance(username, str) or not username:
            raise _error("expected a non-empty string (the username this entry is for), got "
                         + ("nothing" if username is None else _show(username)),
                         file=file, table=label, key="username")
        if username in seen:
            raise _error(f"user {_show(username)} has two entries", file=file, table=label,
                         key="username")
        seen.add(username)
        entries.append(UserQuota(**values))
    return tuple(entries)


def _listener_label(index: int) -> str:
    return f"[[listeners]] #{index + 1}"


def _parse_listeners(value: object, file: str | None) -> tuple[ListenerConfig, ...]:
    if isinstance(value, dict):
        raise _error("expected an array of tables, written [[listeners]] (two brackets), "
                     "got a table written [listeners]", file=file, table="listeners")
    if not isinstance(value, list):
        raise _error(f"expected an array of tables, written [[listeners]], got {_show(value)}",
                     file=file, key="listeners")
    if not value:
        raise _error("expected at least one [[listeners]] table; leave the key out for the "
                     f"default listener on {DEFAULT_HOST}:{DEFAULT_PORT}",
                     file=file, key="listeners")
    listeners: list[ListenerConfig] = []
    for index, entry in enumerate(value):
        label = _listener_label(index)
        if not isinstance(entry, dict):
            raise _error(f"expected a table, got {_show(entry)}", file=file, table=label)
        listener = ListenerConfig(**_parse_table(entry, "listeners", label, file))
        _check_tls_keys(listener, label, file)
        listeners.append(listener)
    return tuple(listeners)


def _check_tls_keys(listener: ListenerConfig, label: str, file: str | None) -> None:
    """The TLS keys of one listener that only make sense together."""
    def fail(key: str, message: str) -> ConfigError:
        return _error(message, file=file, table=label, key=key)

    if listener.certfile is not None and listener.keyfile is None:
        raise fail("certfile", "needs keyfile (the server certificate's private key)")
    if listener.keyfile is not None and listener.certfile is None:
        raise fail("keyfile", "needs certfile (the server certificate)")
    if listener.certfile is None:
        for key in ("cafile", "crlfile", "require_certificate", "use_identity_as_username",
                    "ciphers"):
            if getattr(listener, key) not in (None, False):
                raise fail(key, "is a TLS setting: set certfile and keyfile too to make "
                                "this a TLS listener")
    if listener.certfile is None and listener.tls_version != "tlsv1.2":
        raise fail("tls_version", "is a TLS setting: set certfile and keyfile too to make "
                                  "this a TLS listener")
    if listener.require_certificate and listener.cafile is None:
        raise fail("require_certificate",
                   "needs cafile (the CA that client certificates must chain to)")
    if listener.crlfile is not None and listener.cafile is None:
        raise fail("crlfile", "needs cafile (the CA whose revocations the CRL lists)")
    if listener.use_identity_as_username and not listener.require_certificate:
        raise fail("use_identity_as_username",
                   "needs require_certificate = true (every client must then present a "
                   "certificate whose CN becomes its username)")
