"""The load generator's TLS socket helpers (S11-S13; loadgen.py uses them only when a spec has
`cafile`, so the plain path never calls them).

An `ssl.SSLSocket` returns at most one TLS record (16 KB) per recv() and may hold decrypted bytes
that select() cannot see (`pending()`): `read_more` / `read_ready` read on until the kernel
buffer is empty (up to TLS_READ_MAX, as one plain recv) so that nothing waits unseen.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time


def client_tls(cafile: str | None) -> ssl.SSLContext | None:
    """The load generator's TLS context (None: plain TCP): TLS 1.2 minimum, the server's
    certificate verified against `cafile` and its name (the IP address connected to)."""
    if cafile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


TLS_READ_MAX = 1 << 18   # bytes gathered per readable event on a TLS socket (= one plain recv)


def read_more(sock: ssl.SSLSocket, chunk: bytes) -> bytes:
    """After a recv() on a non-blocking TLS socket: the records already in the kernel buffer
    too (one recv() returns one record), leaving nothing decrypted in `pending()`."""
    parts = [chunk]
    got = len(chunk)
    while got < TLS_READ_MAX or sock.pending():
        try:
            more = sock.recv(TLS_READ_MAX)
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            break
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts) if len(parts) > 1 else chunk


def read_ready(sock: ssl.SSLSocket, sel: selectors.BaseSelector, data: bytes) -> bytes:
    """The publisher's TLS socket (blocking, with a timeout): after one recv(), the records
    already readable too (a broker may send each PUBACK in its own record), up to
    TLS_READ_MAX bytes, and whatever is decrypted in `pending()`."""
    parts = [data]
    got = len(data)
    while sock.pending() or (got < TLS_READ_MAX and sel.select(0)):
        more = sock.recv(sock.pending() or TLS_READ_MAX)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts) if len(parts) > 1 else data


def wait_closed(sock: socket.socket, timeout_s: float) -> bool:
    """After DISCONNECT: read until the broker closes the connection (it must, [MQTT-3.14.4-1]
    (3.1.1)), at most `timeout_s`. True if it did."""
    deadline = time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                return True
    except TimeoutError:
        return False
    except (OSError, ValueError):
        return True   # reset or TLS EOF: closed too
    return False

