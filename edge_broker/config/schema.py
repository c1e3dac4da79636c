"""The tables and keys of the file: which parser each key has and which dataclass field it
fills (`_SCHEMA`), `known_keys()`, parsing one table's keys, and the unknown-key and
unknown-table messages with their hints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge_broker.config.durations import _duration
from edge_broker.config.messages import _error, _Invalid, _suggest
from edge_broker.config.model import (
    DURABILITY_LEVELS,
    LISTENER_PROTOCOLS,
    LOG_FORMATS,
    LOG_LEVELS,
    PERSISTENCE_KINDS,
    QUEUE_FULL_POLICIES,
    TLS_VERSIONS,
)
from edge_broker.config.values import (
    Parser,
    _bool,
    _choice,
    _cipher_list,
    _client_id_prefix,
    _data_dir,
    _file_path,
    _gateway_id,
    _host,
    _int_range,
    _rate,
    _readable_file,
    _unlimited_int,
)
from edge_broker.errors import ConfigError


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
        "tls_version": _Key("tls_version", _choice(TLS_VERSIONS)),
        "ciphers": _Key("ciphers", _cipher_list),
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


def toml_key(table: str, field: str) -> str:
    """The TOML name of a configuration dataclass field (`sys_interval_s` is written
    `sys_interval`); the field's own name where they agree or it has none."""
    for key, spec in _SCHEMA.get(table, {}).items():
        if spec.field == field:
            return key
    return field


def known_keys() -> dict[str, tuple[str, ...]]:
    """Every table and its keys as written in TOML ("listeners" is the [[listeners]] array;
    the keys of the [[quotas.users]] entries are under "quotas" as "users")."""
    return {table: tuple(keys) for table, keys in _SCHEMA.items() if "." not in table}


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


#
# A named stream is a filter over the broker's one append-only log (store/log/). Keys (all
# but `name` and `filter` optional): `name` (letters, digits, "_", "-", "."; 1 to 64
# characters; unique), `filter` (an MQTT topic filter, not $share/), `max_age` (a duration),
# `max_bytes` (positive integer: topic + payload + properties of the kept rows),
