"""MQTT 5 reason codes: which packet may carry which (`REASON_CODES`), and the translation of
CONNACK codes to and from the return codes of 3.1/3.1.1. Used by the codec (mqtt/codec.py,
mqtt/encoding.py) and the connection (mqtt/control.py).
"""

from __future__ import annotations

from typing import Final

from .errors import LocalProtocolError
from .types import PacketType, ReasonCode

_P = PacketType

# The reason codes each packet may carry, from the packet sections of the 5.0 spec (3.2.2.2,
# 3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1). Receiving another one
# is a Protocol Error; sending one is a LocalProtocolError.
REASON_CODES: Final[dict[PacketType, frozenset[int]]] = {
    _P.CONNACK: frozenset({
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
        0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}),
    _P.PUBACK: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    _P.PUBREC: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    _P.PUBREL: frozenset({0x00, 0x92}),
    _P.PUBCOMP: frozenset({0x00, 0x92}),
    _P.SUBACK: frozenset({
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    _P.UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    _P.DISCONNECT: frozenset({
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
        0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
        0xA2}),
    _P.AUTH: frozenset({0x00, 0x18, 0x19}),
}

# [MQTT-3.9.3-2] (3.1.1): the SUBACK return codes of 3.1.1.
_SUBACK_V3_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})

# CONNACK return code of 3.1/3.1.1 (3.2.2.3 (3.1.1)) -> MQTT 5 reason code.
CONNACK_V3_TO_V5: Final[dict[int, int]] = {
    0: ReasonCode.SUCCESS,
    1: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    2: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    3: ReasonCode.SERVER_UNAVAILABLE,
    4: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    5: ReasonCode.NOT_AUTHORIZED,
}
# The reverse, plus the 5.0 failure codes that have an obvious 3.1.1 meaning.
CONNACK_V5_TO_V3: Final[dict[int, int]] = {
    **{v5: v3 for v3, v5 in CONNACK_V3_TO_V5.items()},
    ReasonCode.SERVER_BUSY: 3,
    ReasonCode.BAD_AUTHENTICATION_METHOD: 4,
    ReasonCode.BANNED: 5,
}


def connack_return_code(reason_code: int) -> int:
    """The 3.1/3.1.1 CONNACK return code for an MQTT 5 reason code.

    Failure codes without a 3.1.1 equivalent become 3 "Server unavailable": it tells the client
    the refusal is not about its credentials or identifier.
    """
    code = CONNACK_V5_TO_V3.get(reason_code)
    if code is not None:
        return code
    if 0x80 <= reason_code <= 0xFF:
        return 3
    raise LocalProtocolError(f"0x{reason_code:02X} is not a CONNACK reason code")
