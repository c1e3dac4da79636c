"""Reading the file: TOML decoding with the error's line and column, `load_config` (every
table to its parser, the anonymous-access default, the cross-key checks) and
`apply_overrides` for the command-line flags."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edge_broker.config.checks import _check_http, _check_listeners
from edge_broker.config.messages import _error, _Invalid, _show
from edge_broker.config.model import (
    LOG_LEVELS,
    AuthConfig,
    BrokerConfig,
    Config,
    HttpConfig,
    ListenerConfig,
    LogConfig,
    MqttConfig,
    QuotasConfig,
    StorageConfig,
    StreamConfig,
)
from edge_broker.config.schema import _SCHEMA, _parse_table, _unknown_top_level
from edge_broker.config.sections import _parse_listeners, _parse_user_quotas
from edge_broker.config.streams import parse_streams
from edge_broker.config.values import Parser, _choice, _data_dir, _host, _int_range

if TYPE_CHECKING:
    from edge_broker.bridge.config import BridgeConfig


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
        # Imported here: bridge/config.py imports edge_broker.config (parse_duration).
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
