"""sd_notify without libsystemd: tell systemd we are ready, stopping, or alive.

systemd passes the address of its notification socket in $NOTIFY_SOCKET (a path, or an
abstract socket name written with a leading "@"). Outside systemd the variable is unset and
every function here does nothing and returns False, so callers need no checks of their own.

The unit uses Type=notify and NotifyAccess=main: send from the main process (the broker's
own process, not a child).
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_interval_s"]

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", several assignments separated by newlines) to systemd.

    Returns True when the datagram was sent; False without $NOTIFY_SOCKET, with an address
    this module cannot use, or when sending fails (logged; never raised: a broker must not
    fail because its supervisor went away).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]  # Linux abstract namespace
    elif address.startswith("/"):
        target = address
    else:  # e.g. "vsock:..." (systemd in a VM); not needed on a gateway
        log.debug("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.split("\n", 1)[0], exc)
        return False
    return True


def ready() -> bool:
    """The broker is listening: systemd marks the unit started."""
    return notify("READY=1")


def stopping() -> bool:
    """The broker began an orderly shutdown."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive ping for WatchdogSec=; send at least every `watchdog_interval_s() / 2`."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """A one-line status shown by `systemctl status`."""
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog_interval_s() -> float | None:
    """The watchdog timeout in seconds from $WATCHDOG_USEC, or None when none applies to us.

    None when the variable is unset or invalid, or when $WATCHDOG_PID names another
    process (the variables were inherited). Ping at half this interval.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000
