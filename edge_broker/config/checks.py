"""The security defaults checked across keys once the whole configuration is known: no two
listeners on one address; a listener reachable from other hosts needs an authentication
source or anonymous access explicitly allowed; a listener refusing anonymous clients needs an
authentication source; the HTTP listener leaves loopback only behind the password file."""

from __future__ import annotations

from edge_broker.config.messages import _error, _show
from edge_broker.config.model import Config
from edge_broker.config.sections import _listener_label
from edge_broker.config.values import is_loopback_host


def _check_http(config: Config) -> None:
    http = config.http
    if (http.port is not None and not is_loopback_host(http.host)
            and config.auth.password_file is None):
        # The status page and /metrics show client ids and traffic: reachable from other
        # hosts only behind the broker's password file (HTTP Basic authentication).
        raise _error(
            f"{_show(http.host)} is reachable from other hosts, and without [auth] "
            "password_file nobody could be asked for a password: set password_file (the "
            "HTTP listener then asks for a user of that file), or use 127.0.0.1",
            file=config.source, table="http", key="host")


def check_listeners(config: Config) -> None:
    """`_check_listeners` of a configuration made by merging two (a SIGHUP's: the running
    listeners with the file's new [auth]); ConfigError as at load time."""
    _check_listeners(config, host_flag=None)


def _check_listeners(config: Config, *, host_flag: str | None,
                     port_flag: int | None = None) -> None:
    """The listener rules that span keys: no duplicate address; anonymous access (see the
    package docstring, config/__init__.py). After flags, the first listener's problems are
    reported against them.
    """
    file = config.source
    flagged = host_flag is not None or port_flag is not None
    seen: dict[tuple[str, int], int] = {}
    for index, listener in enumerate(config.listeners):
        if listener.port == 0:
            continue
        address = (listener.host.lower(), listener.port)
        if address in seen:
            first, second = seen[address], index
            message = (f"{_show(listener.host)} port {listener.port} is used by both "
                       f"{_listener_label(first)} and {_listener_label(second)}; "
                       "each listener needs its own address")
            if first == 0 and flagged:
                raise _error(message, file=None, key="--host" if host_flag else "--port")
            raise _error(message, file=file, table=_listener_label(second), key="port")
        seen[address] = index

    for index, listener in enumerate(config.listeners):
        label = _listener_label(index)
        from_flag = index == 0 and host_flag is not None
        authenticated = listener.has_authentication(config.auth)
        if not listener.anonymous_allowed(config.auth) and not authenticated:
            # Without a way to authenticate, refusing anonymous clients refuses everybody.
            if listener.allow_anonymous is False:
                raise _error(
                    "false refuses every client, and no authentication is configured for "
                    "this listener (no [auth] password_file, no client certificates), so "
                    "nobody could connect to it; set it to true or configure a password "
                    "file", file=file, table=label, key="allow_anonymous")
            raise _error(
                f"false refuses every client on {label} "
                f"({_show(listener.host)} port {listener.port}), and no authentication is "
                "configured there (no password_file, no client certificates), so nobody "
                "could connect; set password_file, or set allow_anonymous = true on that "
                "listener", file=file, table="auth", key="allow_anonymous")
        if (not listener.is_loopback and not authenticated
                and not listener.anonymous_explicitly_allowed(config.auth)):
            where = ("in [auth] or on the first [[listeners]] table of "
                     + (file if file is not None else "a --config file")
                     if from_flag else "in [auth] or on this listener")
            message = (
                f"{_show(listener.host)} accepts connections from other hosts; no "
                "authentication is configured (no [auth] password_file, no client "
                "certificates), so set password_file, or set allow_anonymous = true "
                f"explicitly ({where}) to allow anonymous access"
            )
            if from_flag:
                raise _error(message, file=None, key="--host")
            raise _error(message, file=file, table=label, key="host")
