"""Value parsers for single keys: bounded integers, booleans, choices, rates, paths (readable
files for TLS), client-id prefixes, hosts and gateway ids; and which hosts are loopback."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from edge_broker.config.messages import _expected, _Invalid, _show, _suggest

Parser = Callable[[object], Any]


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


def _cipher_list(value: object) -> str:
    """An OpenSSL cipher list (checked against OpenSSL by the TLS listener's set-up)."""
    if not isinstance(value, str) or not value.strip() or _CONTROL_RE.search(value):
        raise _Invalid(f'expected an OpenSSL cipher list such as "ECDHE+AESGCM:ECDHE+AES", '
                       f"got {_show(value)}")
    return value


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
