"""One frozen dataclass per MQTT control packet, named as in the spec.

The packets are version-neutral: they carry MQTT 5 reason codes and properties, and the codec
translates for MQTT 3.1/3.1.1 (where properties do not exist and CONNACK carries a return
code). Fields that a version does not have are left at their defaults when decoding that
version, and ignored when encoding it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .properties import NO_PROPERTIES, Properties
from .types import PacketType, ProtocolLevel


@dataclass(frozen=True, slots=True)
class Will:
    """The will message carried in CONNECT, 3.1.2.5 / 3.1.3.2-3 (5.0)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    protocol_level: int = ProtocolLevel.MQTT_5
    clean_start: bool = True  # "Clean Session" in 3.1.1
    keep_alive: int = 60  # seconds, 0 disables
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.CONNECT


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool = False
    reason_code: int = 0  # MQTT 5 code; the codec maps it to a 3.1.1 return code
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.CONNACK


@dataclass(slots=True, init=False)
class Publish:
    """Not frozen, unlike the other packets: a broker builds two per message (decoded, then
    sent), and a frozen dataclass takes about 4x as long to construct (2.1 us against 0.46 us
    for seven fields, measured with timeit). Treat it as immutable all the same: the broker
    shares one instance between subscribers. Its `__init__` is written out (as @dataclass
    would generate it) so that mypyc compiles it instead of running the generated Python one."""

    topic: str  # "" only on MQTT 5 with a topic alias on the wire
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present iff qos > 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.PUBLISH

    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 dup: bool = False, packet_id: int | None = None,
                 properties: Properties = NO_PROPERTIES,
                 packet_type: PacketType | None = None) -> None:
        # `packet_type` is taken and ignored: the compiled build makes the class attribute a
        # dataclass field too (mypyc annotates it), so dataclasses.replace passes it. Its
        # default is None, a constant: mypyc evaluates `PacketType.PUBLISH` at each call.
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties


@dataclass(slots=True, init=False)
class PubAck:
    """Not frozen, for the reason `Publish` is not: a broker builds one per QoS 1 message
    it receives. Treat it as immutable all the same. `__init__` written out as `Publish`'s."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.PUBACK

    def __init__(self, packet_id: int, reason_code: int = 0,
                 properties: Properties = NO_PROPERTIES,
                 packet_type: PacketType | None = None) -> None:
        # `packet_type` taken and ignored, as in `Publish.__init__`.
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties


@dataclass(frozen=True, slots=True)
class PubRec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.PUBREC


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.PUBREL


@dataclass(frozen=True, slots=True)
class PubComp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.PUBCOMP


@dataclass(frozen=True, slots=True)
class Subscription:
    """One topic filter with its subscription options, 3.8.3.1 (5.0)."""

    topic_filter: str
    qos: int = 0  # "Maximum QoS"
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.SUBSCRIBE


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reason_codes: tuple[int, ...]  # 3.1.1 return codes are 0, 1, 2 and 0x80: same values
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.SUBACK


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.UNSUBSCRIBE


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # empty on 3.1.1, which has no payload here
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.UNSUBACK


@dataclass(frozen=True, slots=True)
class PingReq:
    packet_type = PacketType.PINGREQ


@dataclass(frozen=True, slots=True)
class PingResp:
    packet_type = PacketType.PINGRESP


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.DISCONNECT


@dataclass(frozen=True, slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    packet_type = PacketType.AUTH


Packet = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck
    | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect | Auth
)
