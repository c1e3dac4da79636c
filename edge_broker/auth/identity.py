"""The identity a TLS client certificate gives (`use_identity_as_username`), from the dict that
`ssl.SSLSocket.getpeercert()` returns (no ssl import here: the server passes the dict)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The certificate subject's commonName, or None when there is no certificate, no CN, an
    empty CN, or several different CNs (ambiguous: such a client has no username and is
    refused when a username is required)."""
    if not peercert:
        return None
    names = {value for rdn in peercert.get("subject", ()) for key, value in rdn
             if key == "commonName"}
    if len(names) != 1:
        return None
    (name,) = names
    return name if isinstance(name, str) and name and "\x00" not in name else None
