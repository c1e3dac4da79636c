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
`sys_interval` is the field `sys_interval_s` (see `_KEY_TO_FIELD` in schema.py). Durations
accept an integer number of seconds or a string with one unit: "30s", "5min", "2h", "14d",
"1w", "1y" (365 days). A bare "m" is refused: mosquitto's persistent_client_expiration reads it as
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

The package, by responsibility: model.py (the dataclasses), loader.py (reading the file,
`load_config`, `apply_overrides`), schema.py (tables, keys, unknown-key hints), values.py
and durations.py (single values), sections.py ([[listeners]] with TLS, [[quotas.users]]),
streams.py ([[streams]]), checks.py (the security rules above), messages.py (how errors read).
Every public name is re-exported here: import from `edge_broker.config`.
"""

from __future__ import annotations

from edge_broker.config.checks import check_listeners
from edge_broker.config.durations import MAX_DURATION_S, parse_duration
from edge_broker.config.loader import apply_overrides, load_config
from edge_broker.config.model import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DURABILITY_LEVELS,
    LISTENER_PROTOCOLS,
    LOG_FORMATS,
    LOG_LEVELS,
    PERSISTENCE_KINDS,
    QUEUE_FULL_POLICIES,
    STREAM_DEFAULT_MAX_AGE_S,
    STREAM_DEFAULT_MAX_BYTES,
    AuthConfig,
    BrokerConfig,
    Config,
    Durability,
    HttpConfig,
    ListenerConfig,
    ListenerProtocol,
    LogConfig,
    LogFormat,
    LogLevel,
    MqttConfig,
    Persistence,
    QueueFullPolicy,
    QuotasConfig,
    StorageConfig,
    StreamConfig,
    UserQuota,
)
from edge_broker.config.schema import known_keys, toml_key
from edge_broker.config.streams import parse_streams
from edge_broker.config.values import Parser, default_gateway_id, is_loopback_host

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DURABILITY_LEVELS",
    "LISTENER_PROTOCOLS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_DURATION_S",
    "PERSISTENCE_KINDS",
    "QUEUE_FULL_POLICIES",
    "STREAM_DEFAULT_MAX_AGE_S",
    "STREAM_DEFAULT_MAX_BYTES",
    "AuthConfig",
    "BrokerConfig",
    "Config",
    "Durability",
    "HttpConfig",
    "ListenerConfig",
    "ListenerProtocol",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "MqttConfig",
    "Parser",
    "Persistence",
    "QueueFullPolicy",
    "QuotasConfig",
    "StorageConfig",
    "StreamConfig",
    "UserQuota",
    "apply_overrides",
    "check_listeners",
    "default_gateway_id",
    "is_loopback_host",
    "known_keys",
    "load_config",
    "parse_duration",
    "parse_streams",
    "toml_key",
]
