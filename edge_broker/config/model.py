"""Broker configuration: frozen dataclasses loaded from a TOML file.

`load_config(path)` reads and validates a file; `apply_overrides(config, ...)` applies the
command-line flags on top of it; `Config()` is the embedded defaults (no file). Validation
happens in those two functions: a `Config` built by hand in a test is taken as it is.

Every problem raises `edge_broker.errors.ConfigError` whose message names the file, the table
and the key, e.g. (one line)::

    /etc/edge-broker.toml: [mqtt] max_inflight_messages:
        expected an integer from 1 to 65535, got "20"

The `table` attribute of the error is the table name (`"mqtt"`), or the shown label for an
entry of the listener array (`"[[listeners]] #1"`, numbered from 1); `key` is the key, or the
flag (`"--host"`) when a command-line flag is at fault.

Field names follow the TOML keys, except that durations carry their unit: the TOML key
`sys_interval` is the field `sys_interval_s` (see `_KEY_TO_FIELD`). Durations accept an integer
number of seconds or a string with one unit: "30s", "5min", "2h", "14d", "1w", "1y"
(365 days). A bare "m" is refused: mosquitto's persistent_client_expiration reads it as
months, and a config copied from mosquitto must not silently expire sessions 43,200 times early.

Anonymous access: `AuthConfig.allow_anonymous` is the effective broker-wide setting (default
true, false once a password file is configured) and `AuthConfig.allow_anonymous_explicit`
says whether the file wrote it. `ListenerConfig.allow_anonymous` is None unless the listener
sets it; ask `listener.anonymous_allowed(config.auth)` for the effective value. A listener has
an authentication source when `[auth] password_file` is set or it takes the certificate as
the credential (`certificate_authentication`, from the TLS listener keys). The loader
enforces: a listener reachable from other hosts needs an authentication source or anonymous
access explicitly set to true, and no listener without an authentication source may refuse
anonymous clients (nobody could connect).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from edge_broker.errors import ConfigError

if TYPE_CHECKING:
    from edge_broker.bridge.config import BridgeConfig

__all__ = [
    "AuthConfig",
    "BrokerConfig",
    "Config",
    "HttpConfig",
    "ListenerConfig",
    "LogConfig",
    "MqttConfig",
    "QuotasConfig",
    "StorageConfig",
    "StreamConfig",
    "UserQuota",
    "apply_overrides",
    "is_loopback_host",
    "known_keys",
    "load_config",
    "parse_duration",
    "parse_streams",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
Persistence = Literal["memory", "sqlite"]
Durability = Literal["fsync", "os", "none"]
ListenerProtocol = Literal["mqtt", "websockets"]
QueueFullPolicy = Literal["drop-oldest", "drop-newest", "refuse"]

LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
PERSISTENCE_KINDS: Final[tuple[Persistence, ...]] = ("memory", "sqlite")
DURABILITY_LEVELS: Final[tuple[Durability, ...]] = ("fsync", "os", "none")
LISTENER_PROTOCOLS: Final[tuple[ListenerProtocol, ...]] = ("mqtt", "websockets")
QUEUE_FULL_POLICIES: Final[tuple[QueueFullPolicy, ...]] = ("drop-oldest", "drop-newest", "refuse")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 1883
MAX_DURATION_S: Final = 0xFFFF_FFFF  # MQTT intervals are four-byte integers of seconds


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """[broker]"""

    data_dir: Path = Path("./edge-broker-data")
    """Where persistent state lives; a relative path is relative to the working directory."""
    sys_interval_s: int = 10
    """Seconds between $SYS/broker updates; 0 disables $SYS."""
    gateway_id: str = field(default_factory=lambda: default_gateway_id())
    """Names this gateway upstream (bridges: message ids, consumer names); the host name."""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]"""

    allow_anonymous: bool = True
    """Effective broker-wide default for clients without credentials (the loader makes it
    false when a password file or certificate authentication is configured and the file
    does not write it)."""
    allow_anonymous_explicit: bool = False
    """True when the file wrote [auth] allow_anonymous (the security rule needs to know)."""
    password_file: Path | None = None
    """mosquitto-format password file; None = no password authentication."""
    acl_file: Path | None = None
    """mosquitto-format ACL file; None = every client may publish and subscribe anywhere."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One [[listeners]] entry."""

    host: str = DEFAULT_HOST
    """Address to bind; "" binds every interface."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free port."""
    protocol: ListenerProtocol = "mqtt"
    """"mqtt": MQTT over TCP; "websockets": MQTT over WebSocket (needs `websockets`)."""
    allow_anonymous: bool | None = None
    """Per-listener override of [auth] allow_anonymous; None = not set, inherit [auth]."""
    cafile: Path | None = None
    """PEM file of the CA(s) that client certificates must chain to."""
    certfile: Path | None = None
    """PEM server certificate (chain); with keyfile, makes this a TLS listener."""
    keyfile: Path | None = None
    """PEM private key of certfile."""
    require_certificate: bool = False
    """Clients must present a certificate that chains to cafile (mTLS)."""
    use_identity_as_username: bool = False
    """The client certificate's subject CN is the client's username (needs
    require_certificate); the certificate is then this listener's authentication."""
    crlfile: Path | None = None
    """PEM certificate revocation list checked against client certificates (leaf only)."""

    @property
    def tls(self) -> bool:
        """True when this listener speaks TLS (certfile and keyfile are set)."""
        return self.certfile is not None

    @property
    def certificate_authentication(self) -> bool:
        """True when a verified client certificate names the client (an auth source)."""
        return self.tls and self.require_certificate and self.use_identity_as_username

    def anonymous_allowed(self, auth: AuthConfig) -> bool:
        """Whether clients without credentials may connect on this listener. Where
        certificate authentication is configured, the default is false."""
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        if self.certificate_authentication:
            return False
        return auth.allow_anonymous

    def anonymous_explicitly_allowed(self, auth: AuthConfig) -> bool:
        """Whether a file or flag said, in so many words, that anonymous access is fine here."""
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return auth.allow_anonymous_explicit and auth.allow_anonymous

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the listener (127.0.0.0/8, ::1, localhost)."""
        return is_loopback_host(self.host)

    def has_authentication(self, auth: AuthConfig) -> bool:
        """A password file or the client certificate can let a client in here. (The
        `certificate_authentication` property comes with the TLS listener keys; read
        defensively so that this works with or without them.)"""
        return auth.password_file is not None or bool(
            getattr(self, "certificate_authentication", False))


@dataclass(frozen=True, slots=True)
class UserQuota:
    """One [[quotas.users]] entry: a user's own publish rates (None = the [quotas] value)."""

    username: str
    publish_msgs_per_s: float | None = None
    publish_bytes_per_s: int | None = None


@dataclass(frozen=True, slots=True)
class QuotasConfig:
    """[quotas]: per-client publish rates (Kafka-style throttling) and connection limits."""

    publish_msgs_per_s: float = 0
    """PUBLISH packets per second per client; 0 = unlimited."""
    publish_bytes_per_s: int = 0
    """PUBLISH payload + topic bytes per second per client; 0 = unlimited."""
    users: tuple[UserQuota, ...] = ()
    """Per-username overrides ([[quotas.users]])."""
    max_connections: int = 0
    """Open connections per listener; 0 = unlimited."""
    max_connections_per_address: int = 0
    """Open connections per client IP address; 0 = unlimited."""

    def rates_for(self, username: str | None) -> tuple[float, int]:
        """(messages/s, bytes/s) that apply to a client with this username (0 = unlimited)."""
        msgs, size = self.publish_msgs_per_s, self.publish_bytes_per_s
        if username is not None:
            for entry in self.users:
                if entry.username == username:
                    if entry.publish_msgs_per_s is not None:
                        msgs = entry.publish_msgs_per_s
                    if entry.publish_bytes_per_s is not None:
                        size = entry.publish_bytes_per_s
                    break
        return msgs, size


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """[mqtt]: protocol limits. Names follow mosquitto's options where one exists."""

    max_packet_size: int = 1_048_576
    max_keepalive_s: int = 65535
    max_inflight_messages: int = 20
    max_queued_messages: int = 100_000
    """Per session; 0 = unlimited."""
    max_queued_bytes: int = 0
    """Per session; 0 = unlimited."""
    max_queued_memory_bytes: int = 256 * 1024 * 1024
    """All queues together (estimated); 0 = unlimited."""
    queue_full_policy: QueueFullPolicy = "drop-oldest"
    queue_qos0_messages: bool = False
    receive_maximum: int = 1024
    topic_alias_maximum: int = 10
    max_qos: int = 2
    retain_available: bool = True
    allow_zero_length_clientid: bool = True
    auto_id_prefix: str = "auto-"
    persistent_client_expiration_s: int = 0
    """0 = never."""
    max_session_expiry_interval_s: int = 0
    """0 = no cap."""
    max_incomplete_bytes: int = 64 * 1024 * 1024
    """Bytes buffered for unfinished packets, all connections together; 0 = unlimited."""


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """[storage]"""

    persistence: Persistence = "sqlite"
    durability: Durability = "fsync"
    max_store_bytes: int = 0
    """0 = unlimited."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """[http]: the optional listener for /metrics, /healthz and the status page."""

    host: str = DEFAULT_HOST
    """Address to bind; loopback unless authentication protects it."""
    port: int | None = None
    """TCP port; None (the key absent) = no HTTP listener; 0 picks a free port."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]"""

    level: LogLevel = "info"
    format: LogFormat = "text"
    """"text" (`time LEVEL logger: message`) or "json" (one object per line)."""

    @property
    def logging_level(self) -> int:
        """The `logging` module's number for `level`."""
        return _LOGGING_LEVELS[self.level]


_LOGGING_LEVELS: Final[dict[str, int]] = {"debug": 10, "info": 20, "warning": 30, "error": 40}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. `Config()` is the embedded defaults."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    auth: AuthConfig = field(default_factory=AuthConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    streams: tuple[StreamConfig, ...] = ()
    """The [[streams]] tables (named streams over the log; see docs/configuration.md)."""
    bridges: tuple[BridgeConfig, ...] = ()
    """The [[bridges]] tables (edge_broker/bridge/config.py; see docs/bridges.md)."""
    source: str | None = None
    """The file this was loaded from, as given; None for the embedded defaults."""


# --------------------------------------------------------------------------- value parsers


def default_gateway_id() -> str:
    """The host name (its first label), made a valid gateway id; "gateway" if it has none."""
    import socket

    name = socket.gethostname().split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
    return name or "gateway"


_GATEWAY_ID_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _gateway_id(value: object) -> str:
    # Upstream it is part of message ids, NATS durable names and Kafka group ids.
    if not isinstance(value, str) or not _GATEWAY_ID_RE.fullmatch(value):
        raise _expected('1 to 64 letters, digits, "_", "-" or "." (not starting with "-" '
                        'or ".")', value)
    return value


class _Invalid(Exception):
    """A value is wrong; the caller adds where it was."""


Parser = Callable[[object], Any]


def _show(value: object, limit: int = 60) -> str:
    """A value as it would be written in TOML, shortened for an error message."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan as in TOML
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    elif isinstance(value, (datetime, date, time)):
        return f"the date/time {value.isoformat()}"
    else:  # pragma: no cover - tomllib produces nothing else
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _expected(what: str, value: object) -> _Invalid:
    return _Invalid(f"expected {what}, got {_show(value)}")


def _int_range(low: int, high: int) -> Parser:
    def parse(value: object) -> int:
        if type(value) is not int or not low <= value <= high:
            raise _expected(f"an integer from {low} to {high}", value)
        return value

    return parse


def _unlimited_int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise _expected("a non-negative integer (0 = unlimited)", value)
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise _expected("true or false", value)
    return value


def _choice(options: tuple[str, ...]) -> Parser:
    listed = ", ".join(json.dumps(o) for o in options)
    what = f"one of {listed}" if len(options) > 1 else listed

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            message = f"expected {what}, got {_show(value)}"
            if isinstance(value, str):
                close = _suggest(value, options)
                if close is not None:
                    message += f"; did you mean {json.dumps(close)}?"
            raise _Invalid(message)
        return value

    return parse


_DURATION_UNITS: Final[dict[str, int]] = {
    "s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400,
}
_DURATION_RE: Final = re.compile(r"([0-9]+)(s|min|h|d|w|y)")
_DURATION_HELP: Final = (
    'a duration: whole seconds (0 or more) or a string like "30s", "5min", "2h", "14d", "1w", "1y"'
)


def parse_duration(value: object) -> int:
    """Seconds from an integer or a string such as "30s", "5min", "2h", "14d", "1w", "1y".

    Raises ValueError with a message naming what is accepted.
    """
    try:
        return _duration(value)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _duration(value: object) -> int:
    if type(value) is int:
        seconds = value
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    elif isinstance(value, str) and re.fullmatch(r"[0-9]+m", value):
        raise _Invalid(
            f'{_show(value)} is ambiguous: mosquitto reads "m" as months; write "{value}in" '
            f'for minutes or a number of days ("30d") for about a month'
        )
    else:
        raise _expected(_DURATION_HELP, value)
    if not 0 <= seconds <= MAX_DURATION_S:
        raise _Invalid(
            f"expected a duration from 0 to {MAX_DURATION_S} seconds (about 136 years), "
            f"got {_show(value)}"
        )
    return seconds


def _rate(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not (
            0 <= value < math.inf):
        raise _expected("a non-negative number (0 = unlimited)", value)
    return float(value)


def _file_path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise _expected("a non-empty string (a file path)", value)
    if "\0" in value:
        raise _Invalid("the path contains a NUL character")
    return Path(value)


def _data_dir(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise _expected("a non-empty string (a directory path)", value)
    if "\0" in value:
        raise _Invalid("the path contains a NUL character")
    return Path(value)


def _readable_file(value: object) -> Path:
    """A path to a file that exists and can be read now (TLS certificates, keys, CRLs)."""
    if not isinstance(value, str) or not value:
        raise _expected("a non-empty string (a file path)", value)
    if "\0" in value:
        raise _Invalid("the path contains a NUL character")
    path = Path(value)
    try:
        with path.open("rb"):
            pass
    except IsADirectoryError:
        raise _Invalid(f"{_show(value)} is a directory, expected a file") from None
    except OSError as exc:
        raise _Invalid(f"cannot read {_show(value)}: {exc.strerror or exc}") from None
    return path


_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _client_id_prefix(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    if _CONTROL_RE.search(value):
        raise _Invalid(f"control characters are not allowed in a client id, got {_show(value)}")
    if len(value.encode()) > 64:
        raise _Invalid(f"expected at most 64 bytes (UTF-8), got {len(value.encode())} bytes")
    return value


_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _host(value: object) -> str:
    if not isinstance(value, str):
        raise _expected('an IP address or host name (or "" for every interface)', value)
    if value == "":
        return value
    if value.startswith("[") and value.endswith("]"):
        raise _Invalid(f"write an IPv6 address without brackets, got {_show(value)}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
        or all(label.isdigit() for label in labels)
    ):
        raise _expected('an IP address or host name (or "" for every interface)', value)
    return value


def is_loopback_host(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1 (also IPv4-mapped): only this machine.

    "" (every interface), "0.0.0.0", "::" and any other host name count as reachable from
    other hosts.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True, slots=True)
class _Key:
    field: str
    parse: Parser


_SCHEMA: Final[dict[str, dict[str, _Key]]] = {
    "broker": {
        "data_dir": _Key("data_dir", _data_dir),
        "sys_interval": _Key("sys_interval_s", _duration),
        "gateway_id": _Key("gateway_id", _gateway_id),
    },
    "listeners": {
        "host": _Key("host", _host),
        "port": _Key("port", _int_range(0, 65535)),
        "protocol": _Key("protocol", _choice(LISTENER_PROTOCOLS)),
        "allow_anonymous": _Key("allow_anonymous", _bool),
        "cafile": _Key("cafile", _readable_file),
        "certfile": _Key("certfile", _readable_file),
        "keyfile": _Key("keyfile", _readable_file),
        "require_certificate": _Key("require_certificate", _bool),
        "use_identity_as_username": _Key("use_identity_as_username", _bool),
        "crlfile": _Key("crlfile", _readable_file),
    },
    "auth": {
        "allow_anonymous": _Key("allow_anonymous", _bool),
        "password_file": _Key("password_file", _file_path),
        "acl_file": _Key("acl_file", _file_path),
    },
    "quotas": {
        "publish_msgs_per_s": _Key("publish_msgs_per_s", _rate),
        "publish_bytes_per_s": _Key("publish_bytes_per_s", _unlimited_int),
        "max_connections": _Key("max_connections", _unlimited_int),
        "max_connections_per_address": _Key("max_connections_per_address", _unlimited_int),
        "users": _Key("users", lambda value: value),  # parsed by _parse_user_quotas
    },
    "quotas.users": {
        "username": _Key("username", lambda value: value),  # checked by _parse_user_quotas
        "publish_msgs_per_s": _Key("publish_msgs_per_s", _rate),
        "publish_bytes_per_s": _Key("publish_bytes_per_s", _unlimited_int),
    },
    "mqtt": {
        "max_packet_size": _Key("max_packet_size", _int_range(16, 268_435_460)),
        "max_keepalive": _Key("max_keepalive_s", _int_range(10, 65535)),
        "max_inflight_messages": _Key("max_inflight_messages", _int_range(1, 65535)),
        "max_queued_messages": _Key("max_queued_messages", _unlimited_int),
        "max_queued_bytes": _Key("max_queued_bytes", _unlimited_int),
        "max_queued_memory_bytes": _Key("max_queued_memory_bytes", _unlimited_int),
        "queue_full_policy": _Key("queue_full_policy", _choice(QUEUE_FULL_POLICIES)),
        "queue_qos0_messages": _Key("queue_qos0_messages", _bool),
        "receive_maximum": _Key("receive_maximum", _int_range(1, 65535)),
        "topic_alias_maximum": _Key("topic_alias_maximum", _int_range(0, 65535)),
        "max_qos": _Key("max_qos", _int_range(0, 2)),
        "retain_available": _Key("retain_available", _bool),
        "allow_zero_length_clientid": _Key("allow_zero_length_clientid", _bool),
        "auto_id_prefix": _Key("auto_id_prefix", _client_id_prefix),
        "persistent_client_expiration": _Key("persistent_client_expiration_s", _duration),
        "max_session_expiry_interval": _Key("max_session_expiry_interval_s", _duration),
        "max_incomplete_bytes": _Key("max_incomplete_bytes", _unlimited_int),
    },
    "storage": {
        "persistence": _Key("persistence", _choice(PERSISTENCE_KINDS)),
        "durability": _Key("durability", _choice(DURABILITY_LEVELS)),
        "max_store_bytes": _Key("max_store_bytes", _unlimited_int),
    },
    "http": {
        "host": _Key("host", _host),
        "port": _Key("port", _int_range(0, 65535)),
    },
    "log": {
        "level": _Key("level", _choice(LOG_LEVELS)),
        "format": _Key("format", _choice(LOG_FORMATS)),
    },
    # [[streams]] entries are parsed by parse_streams (below); listed here for known_keys()
    # and the "did you mean" hints. Their parsers are never called.
    "streams": {key: _Key(key, _bool) for key in
                ("name", "filter", "max_age", "max_bytes", "last_value")},
    # [[bridges]] entries are parsed by bridge/config.parse_bridges (after [broker], for
    # gateway_id); the keys differ per kind: docs/bridges.md and deploy/bridge-*.toml.
    "bridges": {key: _Key(key, _bool) for key in ("name", "kind", "servers")},
}

_KEY_TO_FIELD: Final[dict[str, dict[str, str]]] = {
    table: {key: spec.field for key, spec in keys.items() if key != spec.field}
    for table, keys in _SCHEMA.items()
}


def known_keys() -> dict[str, tuple[str, ...]]:
    """Every table and its keys as written in TOML ("listeners" is the [[listeners]] array;
    the keys of the [[quotas.users]] entries are under "quotas" as "users")."""
    return {table: tuple(keys) for table, keys in _SCHEMA.items() if "." not in table}


# --------------------------------------------------------------------------- errors


def _error(message: str, *, file: str | None, table: str | None = None,
           key: str | None = None) -> ConfigError:
    """A ConfigError reading `file: [table] key: message`.

    `table` is a plain table name ("mqtt", shown as "[mqtt]") or an already-shown label such
    as "[[listeners]] #2"; `key` alone is shown as it is (a top-level key or a flag).
    """
    where: list[str] = []
    if table is not None:
        where.append(table if table.startswith("[") else f"[{table}]")
    if key is not None:
        where.append(key)
    text = f"{' '.join(where)}: {message}" if where else message
    error = ConfigError(text, file=file)
    error.table = table
    error.key = key
    return error


def _suggest(name: str, candidates: tuple[str, ...] | list[str]) -> str | None:
    normal = name.replace("-", "_").lower()
    for candidate in candidates:
        if candidate.lower() == normal:
            return candidate
    close = difflib.get_close_matches(normal, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _table_label(table: str) -> str:
    return (f"[[{table}]]" if table in ("listeners", "streams", "bridges")
            else f"[{table}]")


def _tables_with_key(key: str) -> list[str]:
    return [_table_label(table) for table, keys in _SCHEMA.items() if key in keys]


def _unknown_key(key: str, table: str, label: str, file: str | None) -> ConfigError:
    keys = tuple(_SCHEMA[table])
    close = _suggest(key, keys)
    if close is not None:
        hint = f"did you mean {close}?"
    elif homes := _tables_with_key(key):
        hint = f"{key} belongs in {' or '.join(homes)}"
    else:
        hint = f"the keys of {_table_label(table)} are: {', '.join(keys)}"
    return _error(f"unknown key; {hint}", file=file, table=label, key=key)


def _unknown_top_level(key: str, value: object, file: str | None) -> ConfigError:
    tables = tuple(table for table in _SCHEMA if "." not in table)
    every_table = ", ".join(_table_label(t) for t in tables)
    array_of_tables = (isinstance(value, list) and bool(value)
                       and all(isinstance(v, dict) for v in value))
    if isinstance(value, dict) or array_of_tables:
        close = _suggest(key, tables)
        hint = (f"did you mean {_table_label(close)}?" if close is not None
                else f"the tables are: {every_table}")
        return _error(f"unknown table; {hint}", file=file,
                      table=f"[[{key}]]" if array_of_tables else key)
    if homes := _tables_with_key(key):
        hint = f"{key} belongs in {' or '.join(homes)}; write it below that table's header"
    else:
        hint = f"every setting belongs to a table: {every_table}"
    return _error(f"unknown top-level key; {hint}", file=file, key=key)


# --------------------------------------------------------------------------- [[streams]]
#
# A named stream is a filter over the broker's one append-only log (store/log/). Keys (all
# but `name` and `filter` optional): `name` (letters, digits, "_", "-", "."; 1 to 64
# characters; unique), `filter` (an MQTT topic filter, not $share/), `max_age` (a duration),
# `max_bytes` (positive integer: topic + payload + properties of the kept rows),
# `last_value` (true: keep only the newest message per topic). Without `max_age` and
# `max_bytes` a stream keeps STREAM_DEFAULT_MAX_AGE_S (7 days) and at most
# STREAM_DEFAULT_MAX_BYTES (256 MiB); with one of them given, only that one bounds it.

STREAM_DEFAULT_MAX_AGE_S: Final = 7 * 86400
STREAM_DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
_STREAM_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_STREAM_KEYS: Final = ("name", "filter", "max_age", "max_bytes", "last_value")


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """One [[streams]] table. `max_age_s`/`max_bytes` of None: no bound of that kind."""

    name: str
    filter: str
    max_age_s: int | None = STREAM_DEFAULT_MAX_AGE_S
    max_bytes: int | None = STREAM_DEFAULT_MAX_BYTES
    last_value: bool = False


def _is_topic_filter(text: str) -> bool:
    """4.7.1 (5.0): non-empty, no NUL, "#" alone and last, "+" alone in its level; config is a
    leaf module, so this does not use mqtt.topics (tests check both agree on the examples)."""
    if not text or "\0" in text or len(text.encode()) > 65535:
        return False
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _stream_error(message: str, file: str | None, table: str,
                  key: str | None) -> ConfigError:
    return _error(message, file=file, table=table, key=key)


def parse_streams(value: object, *, file: str | None = None) -> tuple[StreamConfig, ...]:
    """The value of the top-level `streams` key (an array of tables) as StreamConfigs; every
    error is a ConfigError naming the file, `[[streams]] #N` (from 1) and the key."""
    if isinstance(value, dict):
        raise _stream_error("expected an array of tables, written [[streams]] (two brackets), "
                            "got a table written [streams]", file, "[streams]", None)
    if not isinstance(value, list):
        raise _stream_error(f"expected an array of tables, written [[streams]], got "
                            f"{_show(value)}", file, "[[streams]]", None)
    streams: list[StreamConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(value):
        label = f"[[streams]] #{index + 1}"
        if not isinstance(entry, dict):
            raise _stream_error(f"expected a table, got {_show(entry)}", file, label, None)
        stream = _parse_stream(entry, file, label)
        if stream.name in seen:
            raise _stream_error(f"the name {_show(stream.name)} is already used by "
                                f"[[streams]] #{seen[stream.name]}", file, label, "name")
        seen[stream.name] = index + 1
        streams.append(stream)
    return tuple(streams)


def _parse_stream(entry: Mapping[str, object], file: str | None, label: str) -> StreamConfig:
    for key in entry:
        if key not in _STREAM_KEYS:
            raise _stream_error(f"unknown key; the keys of [[streams]] are: "
                                f"{', '.join(_STREAM_KEYS)}", file, label, key)
    for key in ("name", "filter"):
        if key not in entry:
            raise _stream_error("missing; every [[streams]] table needs a name and a filter",
                                file, label, key)
    name = entry["name"]
    if not isinstance(name, str) or not _STREAM_NAME_RE.fullmatch(name):
        raise _stream_error("expected 1 to 64 letters, digits, '_', '-' or '.', got "
                            f"{_show(name)}", file, label, "name")
    topic_filter = entry["filter"]
    if (not isinstance(topic_filter, str) or topic_filter.startswith("$share/")
            or not _is_topic_filter(topic_filter)):
        # 4.7.1 (5.0): '#' alone and last, '+' alone in its level; no shared filter.
        raise _stream_error("expected an MQTT topic filter such as \"sensors/#\" or "
                            f"\"+/temp\" (not a $share/ filter), got {_show(topic_filter)}",
                            file, label, "filter")
    max_age: int | None = None
    max_bytes: int | None = None
    if "max_age" in entry:
        try:
            max_age = parse_duration(entry["max_age"])
        except ValueError as exc:
            raise _stream_error(str(exc), file, label, "max_age") from None
        if max_age == 0:
            raise _stream_error("expected a duration above 0 (leave the key out for the "
                                "default of 7 days)", file, label, "max_age")
    if "max_bytes" in entry:
        raw = entry["max_bytes"]
        if type(raw) is not int or raw <= 0:
            raise _stream_error(f"expected a positive integer (bytes), got {_show(raw)}",
                                file, label, "max_bytes")
        max_bytes = raw
    if max_age is None and max_bytes is None:
        max_age, max_bytes = STREAM_DEFAULT_MAX_AGE_S, STREAM_DEFAULT_MAX_BYTES
    last_value = entry.get("last_value", False)
    if type(last_value) is not bool:
        raise _stream_error(f"expected true or false, got {_show(last_value)}",
                            file, label, "last_value")
    return StreamConfig(name, topic_filter, max_age, max_bytes, last_value)


# --------------------------------------------------------------------------- loading


def _parse_table(values: Mapping[str, object], table: str, label: str,
                 file: str | None) -> dict[str, Any]:
    """Parse the keys of one table into dataclass keyword arguments."""
    keys = _SCHEMA[table]
    out: dict[str, Any] = {}
    for key, value in values.items():
        spec = keys.get(key)
        if spec is None:
            raise _unknown_key(key, table, label, file)
        try:
            out[spec.field] = spec.parse(value)
        except _Invalid as exc:
            raise _error(str(exc), file=file, table=label, key=key) from None
    return out


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
        for key in ("cafile", "crlfile", "require_certificate", "use_identity_as_username"):
            if getattr(listener, key) not in (None, False):
                raise fail(key, "is a TLS setting: set certfile and keyfile too to make "
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


_LOCATION_RE: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _read_document(path: Path, file: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise _error(f"cannot read the configuration file: {reason}", file=file) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _error(f"line {line}: not valid UTF-8 (TOML files must be UTF-8)",
                     file=file) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _LOCATION_RE.search(message)
        if match is not None:
            where = f"line {match.group(1)}, column {match.group(2)}"
            message = f"{where}: invalid TOML: {message[: match.start()]}"
        else:
            message = f"invalid TOML: {message}"
        raise _error(message, file=file) from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML configuration file; None gives the embedded defaults.

    Raises ConfigError naming the file, the table and the key of the first problem found.
    """
    if path is None:
        return Config()
    file = str(path)
    document = _read_document(Path(path), file)

    sections: dict[str, dict[str, Any]] = {}
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    streams: tuple[StreamConfig, ...] = ()
    bridges_value: object = None
    for name, value in document.items():
        if name not in _SCHEMA or "." in name:
            raise _unknown_top_level(name, value, file)
        if name == "listeners":
            listeners = _parse_listeners(value, file)
            continue
        if name == "streams":
            streams = parse_streams(value, file=file)
            continue
        if name == "bridges":
            bridges_value = value
            continue
        if not isinstance(value, dict):
            raise _error(f"expected a table, written [{name}], got {_show(value)}",
                         file=file, key=name)
        sections[name] = _parse_table(value, name, name, file)

    auth_values = sections.get("auth", {})
    if "allow_anonymous" in auth_values:
        auth_values["allow_anonymous_explicit"] = True
    elif auth_values.get("password_file") is not None:
        # mosquitto 2's rule: once clients can authenticate, anonymous access is opt-in.
        # (A listener authenticating by certificate makes that default its own.)
        auth_values["allow_anonymous"] = False
    quota_values = sections.get("quotas", {})
    if "users" in quota_values:
        quota_values["users"] = _parse_user_quotas(quota_values["users"], file)

    broker = BrokerConfig(**sections.get("broker", {}))
    bridges: tuple[BridgeConfig, ...] = ()
    if bridges_value is not None:
        # Imported here: bridge/config.py imports this module (parse_duration).
        from edge_broker.bridge.config import parse_bridges

        bridges = parse_bridges(bridges_value, file=file, gateway_id=broker.gateway_id)
    config = Config(
        broker=broker,
        listeners=listeners,
        auth=AuthConfig(**auth_values),
        quotas=QuotasConfig(**quota_values),
        mqtt=MqttConfig(**sections.get("mqtt", {})),
        storage=StorageConfig(**sections.get("storage", {})),
        http=HttpConfig(**sections.get("http", {})),
        log=LogConfig(**sections.get("log", {})),
        streams=streams,
        bridges=bridges,
        source=file,
    )
    _check_listeners(config, host_flag=None)
    _check_http(config)
    return config


def apply_overrides(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    data_dir: str | Path | None = None,
    log_level: str | None = None,
) -> Config:
    """Apply command-line flags on top of a loaded configuration.

    --host/--port replace the address of the first listener (one is created from the
    defaults when there is none); --data-dir replaces [broker] data_dir; --log-level replaces
    [log] level. The flags are validated like the file's values, and the anonymous-access
    rule is checked again; errors name the flag.
    """
    def flag(name: str, parse: Parser, value: object) -> Any:
        try:
            return parse(value)
        except _Invalid as exc:
            raise _error(str(exc), file=None, key=name) from None

    if host is not None or port is not None:
        first = config.listeners[0] if config.listeners else ListenerConfig()
        if host is not None:
            first = replace(first, host=flag("--host", _host, host))
        if port is not None:
            first = replace(first, port=flag("--port", _int_range(0, 65535), port))
        config = replace(config, listeners=(first, *config.listeners[1:]))
    if data_dir is not None:
        path = flag("--data-dir", _data_dir, str(data_dir))
        config = replace(config, broker=replace(config.broker, data_dir=path))
    if log_level is not None:
        level = flag("--log-level", _choice(LOG_LEVELS), log_level)
        config = replace(config, log=replace(config.log, level=level))
    if host is not None or port is not None:
        _check_listeners(config, host_flag=host, port_flag=port)
    return config


# --------------------------------------------------------------------------- cross-checks


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


def _check_listeners(config: Config, *, host_flag: str | None,
                     port_flag: int | None = None) -> None:
    """The listener rules that span keys: no duplicate address; anonymous access (see the
    module docstring). After flags, the first listener's problems are reported against them.
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
