"""`[[bridges]]`: one table per bridge, parsed into frozen dataclasses.

`parse_bridges(value, file=..., gateway_id=...)` takes the value of the top-level `bridges`
key of a TOML document (a list of tables) and returns a tuple of `BridgeConfig`. Every
problem raises `edge_broker.errors.ConfigError` naming the file, the table and the key, in
the words `edge_broker/config/` uses, e.g. (one line)::

    /etc/edge-broker.toml: [[bridges]] #2 "central" subject_prefix:
        expected a NATS subject without wildcards, got "site1.*"

The table label is `[[bridges]] #N` (numbered from 1), followed by the bridge's name in
quotes when the table has a valid one. `require_extras(bridges, file=...)` imports the
optional dependency of each enabled bridge (nats-py, aiokafka) and raises a ConfigError
naming the `pip install` that fixes it when it is missing; nothing is imported before that.

Every key is documented in deploy/bridge-jetstream.toml, deploy/bridge-kafka.toml,
deploy/bridge-mqtt.toml and docs/bridges.md.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from edge_broker.errors import ConfigError

from . import config_values as v
from .topic_map import KafkaRoute, TopicLine

__all__ = [
    "BRIDGE_KINDS",
    "EXTRAS",
    "BridgeConfig",
    "JetStreamOptions",
    "KafkaOptions",
    "MqttOptions",
    "TlsOptions",
    "parse_bridges",
    "require_extras",
]

BridgeKind = Literal["jetstream", "kafka", "mqtt"]
BRIDGE_KINDS: Final[tuple[BridgeKind, ...]] = ("jetstream", "kafka", "mqtt")
# kind -> (module imported, PyPI package that provides it). The error names the package
# itself: `pip install 'edge-broker[nats]'` only works for an install from PyPI.
EXTRAS: Final[dict[str, tuple[str, str]]] = {"jetstream": ("nats", "nats-py"),
                                              "kafka": ("aiokafka", "aiokafka")}


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS towards the remote side. `enabled` False means a plain TCP connection."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class JetStreamOptions:
    subject_prefix: str
    stream: str
    stream_subjects: tuple[str, ...]
    stream_retention: Literal["limits", "interest", "workqueue"] = "limits"
    stream_storage: Literal["file", "memory"] = "file"
    stream_replicas: int = 1
    stream_max_age_s: int = 0
    stream_max_bytes: int = 0
    duplicate_window_s: int = 120
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    token: str | None = None
    downlink_stream: str = ""
    downlink_durable: str = ""


@dataclass(frozen=True, slots=True)
class KafkaOptions:
    topic_map: tuple[KafkaRoute, ...]
    key: Literal["topic", "client_id"] = "topic"
    idempotence: bool = True
    compression: Literal["none", "gzip"] = "none"
    sasl_mechanism: str | None = None
    downlink_local_prefix: str = "cmd/"
    downlink_group: str = ""


@dataclass(frozen=True, slots=True)
class MqttOptions:
    topics: tuple[TopicLine, ...]
    mqtt_version: Literal["5", "3.1.1"] = "5"
    client_id: str = ""
    keepalive_s: int = 60
    session_expiry_s: int = 86400
    try_private: bool = True
    notification_topic: str = ""
    local_state_topic: str = ""
    round_robin: bool = False
    """False: the first server is the main one, returned to (bridge/mqtt_servers.py)."""
    primary_retry_s: int = 5


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """One [[bridges]] table. Exactly one of jetstream / kafka / mqtt is set, by `kind`."""

    name: str
    kind: BridgeKind
    servers: tuple[str, ...]
    enabled: bool = True
    uplink: tuple[str, ...] = ()
    """Local topic filters forwarded (for "mqtt": the local filters of the out/both lines)."""
    downlink: tuple[str, ...] = ()
    """Remote sources: NATS subjects, Kafka topics, or remote MQTT filters of in/both lines."""
    downlink_identity: str = ""
    max_backlog_bytes: int = 0
    """0 = bounded only by [storage] max_store_bytes."""
    window: int = 256
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    ack_timeout_s: float = 3.0
    """JetStream, Kafka: seconds a sent window waits for its acknowledgements before what
    is not acknowledged is sent again on a new connection."""
    username: str | None = None
    password: str | None = None
    tls: TlsOptions = TlsOptions()
    jetstream: JetStreamOptions | None = None
    kafka: KafkaOptions | None = None
    mqtt: MqttOptions | None = None
    separate_process: bool = False
    """jetstream/kafka: the uplink runs in a process of its own (server/bridge_proc.py)."""
    process_nice: int = 0  # that process's niceness increment (0: the broker's priority)


# --------------------------------------------------------------------------- schema

# `separate_process` when not set (jetstream and kafka; an mqtt bridge's one connection
# carries its downlink too, which stays in the broker, so it always runs there).
SEPARATE_PROCESS_DEFAULT: Final = False

Parser = Callable[[object], Any]

COMMON_KEYS: Final[dict[str, Parser]] = {
    "name": v.name,
    "kind": v.choice(*BRIDGE_KINDS),
    "enabled": v.boolean,
    "servers": v.list_of(v.string, "server addresses", nonempty=True),  # checked per kind
    "downlink_identity": v.nonempty,
    "max_backlog_bytes": v.unlimited,
    "window": v.int_range(1, 65535),
    "backoff_initial": v.positive_duration,
    "backoff_max": v.positive_duration,
    "username": v.string,
    "password": v.string,
    "tls": v.boolean,
    "tls_ca_file": v.nonempty,
    "tls_cert_file": v.nonempty,
    "tls_key_file": v.nonempty,
    "tls_server_name": v.nonempty,
}
KIND_KEYS: Final[dict[str, dict[str, Parser]]] = {
    "jetstream": {
        "uplink": v.list_of(v.mqtt_filter, "MQTT topic filters"),
        "separate_process": v.boolean,
        "process_nice": v.int_range(0, 19),
        "downlink": v.list_of(v.subject_filter, "NATS subjects"),
        "subject_prefix": v.subject,
        "jetstream_stream": v.stream_name,
        "stream_subjects": v.list_of(v.subject_filter, "NATS subjects", nonempty=True),
        "stream_retention": v.choice("limits", "interest", "workqueue"),
        "stream_storage": v.choice("file", "memory"),
        "stream_replicas": v.int_range(1, 5),
        "stream_max_age": v.duration,
        "stream_max_bytes": v.unlimited,
        "duplicate_window": v.positive_duration,
        "ack_timeout": v.positive_duration,
        "creds_file": v.nonempty,
        "nkey_seed_file": v.nonempty,
        "token": v.nonempty,
        "downlink_stream": v.stream_name,
        "downlink_durable": v.stream_name,
    },
    "kafka": {
        "uplink": v.list_of(v.mqtt_filter, "MQTT topic filters"),
        "separate_process": v.boolean,
        "process_nice": v.int_range(0, 19),
        "downlink": v.list_of(v.kafka_topic, "Kafka topics"),
        "topic_map": v.list_of(v.kafka_route, "routes", nonempty=True),
        "key": v.choice("topic", "client_id"),
        "ack_timeout": v.positive_duration,
        "idempotence": v.boolean,
        "compression": v.choice("none", "gzip"),
        "sasl_mechanism": v.choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        "downlink_local_prefix": v.local_prefix,
        "downlink_group": v.nonempty,
    },
    "mqtt": {
        "topics": v.list_of(v.topic_line, "topic lines", nonempty=True),
        "mqtt_version": v.choice("5", "3.1.1"),
        "client_id": v.nonempty,
        "keepalive": v.keepalive,
        "session_expiry": v.duration,
        "try_private": v.boolean,
        "notification_topic": v.state_topic,
        "local_state_topic": v.state_topic,
        "round_robin": v.boolean,
        "primary_retry": v.positive_duration,
    },
}
_SERVER_PARSERS: Final[dict[str, Parser]] = {
    "jetstream": v.url(("nats", "tls"), bare_ok=True),
    "kafka": v.host_port,
    "mqtt": v.url(("mqtt", "mqtts"), bare_ok=False),
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "jetstream": ("subject_prefix", "jetstream_stream"),
    "kafka": ("topic_map",),
    "mqtt": ("topics",),
}


def known_keys() -> dict[str, tuple[str, ...]]:
    """Every key of a [[bridges]] table, by kind (for documentation checks)."""
    return {kind: tuple(COMMON_KEYS) + tuple(keys) for kind, keys in KIND_KEYS.items()}


# --------------------------------------------------------------------------- parsing


def _label(index: int, name: object = None) -> str:
    label = f"[[bridges]] #{index + 1}"
    if isinstance(name, str) and v.NAME_RE.fullmatch(name):
        label += f' "{name}"'
    return label


def _error(message: str, *, file: str | None, table: str | None = None,
           key: str | None = None) -> ConfigError:
    where = " ".join(part for part in (table, key) if part)
    error = ConfigError(f"{where}: {message}" if where else message, file=file)
    error.table = table
    error.key = key
    return error


def parse_bridges(value: object, *, file: str | None,
                  gateway_id: str) -> tuple[BridgeConfig, ...]:
    """The `bridges` value of a TOML document as BridgeConfig tuples (see module doc)."""
    if isinstance(value, dict):
        raise _error("expected an array of tables, written [[bridges]] (two brackets), "
                     "got a table written [bridges]", file=file, table="[bridges]")
    if not isinstance(value, list):
        raise _error(f"expected an array of tables, written [[bridges]], got {v.show(value)}",
                     file=file, key="bridges")
    bridges: list[BridgeConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise _error(f"expected a table, got {v.show(entry)}", file=file,
                         table=_label(index))
        bridge = _parse_one(entry, _label(index, entry.get("name")), file, gateway_id)
        if bridge.name in seen:
            raise _error(f"the name is already used by [[bridges]] #{seen[bridge.name] + 1}",
                         file=file, table=_label(index, bridge.name), key="name")
        seen[bridge.name] = index
        bridges.append(bridge)
    return tuple(bridges)


def _parse_one(entry: Mapping[str, object], label: str, file: str | None,
               gateway_id: str) -> BridgeConfig:
    def fail(message: str, key: str | None = None) -> ConfigError:
        return _error(message, file=file, table=label, key=key)

    for key in ("name", "kind", "servers"):
        if key not in entry:
            raise fail("missing; every bridge needs name, kind and servers", key)
    kind = _value(entry, "kind", COMMON_KEYS["kind"], fail)
    kind_keys = KIND_KEYS[kind]
    values: dict[str, Any] = {}
    for key in entry:
        parser = COMMON_KEYS.get(key) or kind_keys.get(key)
        if parser is None:
            raise fail(_unknown_key_hint(key, kind), key)
        values[key] = _value(entry, key, parser, fail)
    for key in _REQUIRED[kind]:
        if key not in values:
            raise fail(f'missing; a "{kind}" bridge needs it (see deploy/bridge-{kind}.toml)',
                       key)
    servers = tuple(_value({"servers": s}, "servers", _SERVER_PARSERS[kind], fail)
                    for s in values["servers"])
    name: str = values["name"]

    tls_keys = ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name")
    tls_scheme = any(s.startswith(("tls://", "mqtts://")) for s in servers)
    if values.get("tls") is False and (tls_scheme or any(k in values for k in tls_keys)):
        raise fail("tls = false, but a tls:// or mqtts:// server or a tls_* key asks for TLS",
                   "tls")
    if ("tls_cert_file" in values) != ("tls_key_file" in values):
        raise fail("tls_cert_file and tls_key_file go together", "tls_cert_file")
    tls = TlsOptions(
        enabled=bool(values.get("tls")) or tls_scheme or any(k in values for k in tls_keys),
        ca_file=values.get("tls_ca_file"), cert_file=values.get("tls_cert_file"),
        key_file=values.get("tls_key_file"), server_name=values.get("tls_server_name"))
    if ("username" in values) != ("password" in values):
        raise fail("username and password go together", "password" if "username" in values
                   else "username")

    backoff_initial = values.get("backoff_initial", 1)
    backoff_max = values.get("backoff_max", 60)
    if backoff_max < backoff_initial:
        raise fail(f"must be at least backoff_initial ({backoff_initial} s)", "backoff_max")

    common: dict[str, Any] = dict(
        name=name, kind=kind, servers=servers, enabled=values.get("enabled", True),
        downlink_identity=values.get("downlink_identity", f"bridge-{name}"),
        max_backlog_bytes=values.get("max_backlog_bytes", 0),
        window=values.get("window", 256), backoff_initial_s=float(backoff_initial),
        backoff_max_s=float(backoff_max), ack_timeout_s=float(values.get("ack_timeout", 3)),
        username=values.get("username"), password=values.get("password"), tls=tls,
        separate_process=values.get("separate_process",
                                    kind != "mqtt" and SEPARATE_PROCESS_DEFAULT),
        process_nice=values.get("process_nice", 0))
    safe_gateway = re.sub(r"[^A-Za-z0-9_-]", "_", gateway_id)
    safe_name = name.replace(".", "_")

    if kind == "jetstream":
        prefix: str = values["subject_prefix"]
        methods = [k for k in ("creds_file", "nkey_seed_file", "token", "username")
                   if k in values]
        if len(methods) > 1:
            raise fail(f"choose one way to authenticate, got {' and '.join(methods)}",
                       methods[1])
        downlink: tuple[str, ...] = values.get("downlink", ())
        for subject in downlink:
            if not subject.startswith(prefix + "."):
                raise fail(f'"{subject}" is not under subject_prefix "{prefix}": downlink '
                           "subjects map back to topics by removing the prefix", "downlink")
        stream = values["jetstream_stream"]
        js = JetStreamOptions(
            subject_prefix=prefix, stream=stream,
            stream_subjects=values.get("stream_subjects", (f"{prefix}.>",)),
            stream_retention=values.get("stream_retention", "limits"),
            stream_storage=values.get("stream_storage", "file"),
            stream_replicas=values.get("stream_replicas", 1),
            stream_max_age_s=values.get("stream_max_age", 0),
            stream_max_bytes=values.get("stream_max_bytes", 0),
            duplicate_window_s=values.get("duplicate_window", 120),
            creds_file=values.get("creds_file"), nkey_seed_file=values.get("nkey_seed_file"),
            token=values.get("token"),
            downlink_stream=values.get("downlink_stream", stream),
            downlink_durable=values.get("downlink_durable", f"{safe_gateway}-{safe_name}"))
        return BridgeConfig(**common, uplink=values.get("uplink", ()), downlink=downlink,
                            jetstream=js)
    if kind == "kafka":
        mechanism = values.get("sasl_mechanism")
        if mechanism is not None and "username" not in values:
            raise fail("SASL needs username and password", "sasl_mechanism")
        if mechanism is None and "username" in values:
            raise fail("username/password are sent with SASL: set sasl_mechanism",
                       "username")
        kafka = KafkaOptions(
            topic_map=values["topic_map"], key=values.get("key", "topic"),
            idempotence=values.get("idempotence", True),
            compression=values.get("compression", "none"), sasl_mechanism=mechanism,
            downlink_local_prefix=values.get("downlink_local_prefix", "cmd/"),
            downlink_group=values.get("downlink_group",
                                      f"edge-broker-{safe_gateway}-{safe_name}"))
        uplink = values.get("uplink", tuple(route.filter for route in kafka.topic_map))
        return BridgeConfig(**common, uplink=uplink, downlink=values.get("downlink", ()),
                            kafka=kafka)
    lines: tuple[TopicLine, ...] = values["topics"]
    client_id = values.get("client_id", f"{gateway_id}-{name}")
    mqtt = MqttOptions(
        topics=lines, mqtt_version=values.get("mqtt_version", "5"), client_id=client_id,
        keepalive_s=values.get("keepalive", 60),
        session_expiry_s=values.get("session_expiry", 86400),
        try_private=values.get("try_private", True),
        notification_topic=values.get("notification_topic",
                                      f"edge-broker/{gateway_id}/bridges/{name}/state"),
        local_state_topic=values.get("local_state_topic", f"$SYS/broker/bridges/{name}/state"),
        round_robin=values.get("round_robin", False),
        primary_retry_s=values.get("primary_retry", 5))
    return BridgeConfig(
        **common, uplink=tuple(line.local_filter for line in lines if line.uplink),
        downlink=tuple(line.remote_filter for line in lines if line.downlink), mqtt=mqtt)


def _value(entry: Mapping[str, object], key: str, parser: Parser,
           fail: Callable[[str, str | None], ConfigError]) -> Any:
    try:
        return parser(entry[key])
    except v.Invalid as exc:
        raise fail(str(exc), key) from None


def _unknown_key_hint(key: str, kind: str) -> str:
    own = (*COMMON_KEYS, *KIND_KEYS[kind])
    close = difflib.get_close_matches(key.replace("-", "_").lower(), own, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]}?"
    if kind == "mqtt" and key in ("uplink", "downlink"):
        return "unknown key; an mqtt bridge lists its topics in topic lines (topics = [...])"
    other = [k for k, keys in KIND_KEYS.items() if key in keys]
    if other:
        kinds = " or ".join(f'"{k}"' for k in other)
        return f'unknown key for a "{kind}" bridge; {key} belongs to {kinds} bridges'
    return f'unknown key; the keys of a "{kind}" bridge are: {", ".join(own)}'


def require_extras(bridges: tuple[BridgeConfig, ...], *, file: str | None) -> None:
    """Import the optional package of every enabled bridge (a ConfigError naming the `pip
    install` if missing; for NATS creds_file/nkey_seed_file also `nkeys`), then check
    jetstream stream_subjects. Called after parsing."""
    for index, bridge in enumerate(bridges):
        if not bridge.enabled or bridge.kind not in EXTRAS:
            continue
        module, package = EXTRAS[bridge.kind]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise _error(
                f'the "{bridge.kind}" bridge needs the Python module {module!r} '
                f"(package {package}), which cannot be imported ({exc}); install it with: "
                f"pip install {package}",
                file=file, table=_label(index, bridge.name), key="kind") from None
        js = bridge.jetstream
        key = None if js is None else "creds_file" if js.creds_file is not None else \
            "nkey_seed_file" if js.nkey_seed_file is not None else None
        if key is not None:
            try:  # nats-py signs the server's nonce with it, imported only then
                importlib.import_module("nkeys")
            except ImportError as exc:
                raise _error(f"needs the Python module 'nkeys' (package nkeys), which cannot "
                             f"be imported ({exc}); install it with: pip install nkeys",
                             file=file, table=_label(index, bridge.name), key=key) from None
        if js is not None:  # nats-py is there: jetstream.py imports it
            from .jetstream import filter_covers
            if not any(filter_covers(s, js.subject_prefix) for s in js.stream_subjects):
                raise _error(f'none captures "{js.subject_prefix}.>", what the bridge sends',
                             file=file, table=_label(index, bridge.name), key="stream_subjects")
