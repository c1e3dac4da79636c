"""A small read-only HTTP/1.1 server for /metrics, /healthz and the status page.

No framework: the gateway serves three GET routes to a scraper and a browser, and a
dependency for that is not worth its weight on a Pi. Each request is read with bounded
sizes and a deadline, answered, and the connection is closed (`Connection: close`), so a
slow or hostile client holds one socket for at most `REQUEST_TIMEOUT_S` and a few KiB.

Routes are coroutines returning `Response`. When `authorize` is given (the listener is
reachable from other hosts), every request needs HTTP Basic credentials that it accepts;
others get 401 with a `WWW-Authenticate` challenge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("edge_broker.http")

MAX_REQUEST_HEAD = 8192  # request line and headers
REQUEST_TIMEOUT_S = 10.0

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Awaitable[Response]]
Authorize = Callable[[str, bytes], Awaitable[bool]]


class HttpServer:
    def __init__(self, routes: Mapping[str, Route], *, authorize: Authorize | None = None,
                 realm: str = "edge-broker") -> None:
        self.routes = dict(routes)
        self.authorize = authorize
        self.realm = realm
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host or None, port,
                                                  limit=MAX_REQUEST_HEAD)
        # With host "" there is a socket per address family, each with its own port when
        # port is 0: report the IPv4 one when there is one.
        sockets = sorted(self._server.sockets, key=lambda s: s.family != socket.AF_INET)
        sockname = sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response, head_only = await asyncio.wait_for(self._answer(reader),
                                                         REQUEST_TIMEOUT_S)
        except TimeoutError:
            response, head_only = Response(408, b"request timeout\n"), False
        except Exception:
            log.exception("internal error answering an HTTP request")
            response, head_only = Response(500, b"internal error\n"), False
        try:
            writer.write(_encode(response, head_only, self.realm))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return Response(431, b"request head too large\n"), False
        except asyncio.IncompleteReadError:
            return Response(400, b"incomplete request\n"), False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return Response(400, b"bad request line\n"), False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n"), False
        head_only = method == "HEAD"
        if self.authorize is not None:
            headers = _headers(lines[1:])
            if not await self._authorized(headers.get("authorization", "")):
                return Response(401, b"authentication required\n"), head_only
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return Response(404, b"not found\n"), head_only
        return await route(), head_only

    async def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        assert self.authorize is not None
        return await self.authorize(user.decode("utf-8", "replace"), password)


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _encode(response: Response, head_only: bool, realm: str) -> bytes:
    reason = _REASONS.get(response.status, "")
    head = [f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close"]
    if response.status == 401:
        head.append(f'WWW-Authenticate: Basic realm="{realm}", charset="UTF-8"')
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return data if head_only else data + response.body
