"""Protocol errors. One place (the connection handler in server/) puts them on the wire."""

from __future__ import annotations

from .types import ReasonCode


class ProtocolError(Exception):
    """Base of the protocol library's errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol.

    `reason_code` is the MQTT 5 reason code the spec asks for (sent in a DISCONNECT, or in the
    CONNACK when the error is found while connecting). On MQTT 3.1.1 the connection is closed.
    """

    def __init__(self, reason_code: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message

    def __repr__(self) -> str:
        return f"RemoteProtocolError({self.reason_code.name}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """Our own side tried to do something the protocol forbids (a bug in the caller)."""
