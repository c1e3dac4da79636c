"""The configuration's frozen dataclasses (one per table, `Config` for the whole), their
allowed values and defaults. No parsing here: `Config()` is the embedded defaults, and a
`Config` built by hand is taken as it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from edge_broker.config.values import default_gateway_id, is_loopback_host

if TYPE_CHECKING:
    from edge_broker.bridge.config import BridgeConfig

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
TlsVersion = Literal["tlsv1.2", "tlsv1.3"]
TLS_VERSIONS: Final[tuple[TlsVersion, ...]] = ("tlsv1.2", "tlsv1.3")
QUEUE_FULL_POLICIES: Final[tuple[QueueFullPolicy, ...]] = ("drop-oldest", "drop-newest", "refuse")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 1883

STREAM_DEFAULT_MAX_AGE_S: Final = 7 * 86400
STREAM_DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024


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
    tls_version: TlsVersion = "tlsv1.2"
    """The lowest TLS version accepted (mosquitto's `tls_version`); never below 1.2."""
    ciphers: str | None = None
    """OpenSSL cipher list for TLS 1.2 (mosquitto's `ciphers`); None: Python's default."""

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
class StreamConfig:
    """One [[streams]] table. `max_age_s`/`max_bytes` of None: no bound of that kind."""

    name: str
    filter: str
    max_age_s: int | None = STREAM_DEFAULT_MAX_AGE_S
    max_bytes: int | None = STREAM_DEFAULT_MAX_BYTES
    last_value: bool = False


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
