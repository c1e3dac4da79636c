"""The exposition format, read back by prometheus_client's own parser, and the small HTTP
server's answers to good, bad and unauthenticated requests."""

from __future__ import annotations

import asyncio
import base64

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_broker.server.http import MAX_REQUEST_HEAD, HttpServer, Response
from edge_broker.server.prometheus import Family, Histogram, render


def test_render_is_parsed_by_prometheus_client() -> None:
    latency = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.002, 0.002, 0.5):
        latency.observe(value)
    text = render([
        Family("edge_broker_publish_received_total", "counter", "PUBLISH received.").add(42),
        Family("edge_broker_dropped_messages_total", "counter", "Drops, by reason.")
        .add(3, reason="queue_full").add(1, reason='odd "quoted"\nname\\'),
        Family("edge_broker_queued_bytes", "gauge", "Bytes queued.").add(1.5e9),
        latency.family("edge_broker_commit_latency_seconds", "Commit latency."),
    ])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The parser strips _total from counter family names.
    received = families["edge_broker_publish_received"]
    assert received.type == "counter"
    assert received.samples[0].value == 42
    drops = {s.labels["reason"]: s.value for s in families["edge_broker_dropped_messages"].samples
             if s.name.endswith("_total")}
    assert drops == {"queue_full": 3, 'odd "quoted"\nname\\': 1}
    assert families["edge_broker_queued_bytes"].samples[0].value == 1.5e9
    histogram = families["edge_broker_commit_latency_seconds"]
    assert histogram.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 1, "0.01": 3, "0.1": 3, "+Inf": 4}
    count = [s.value for s in histogram.samples if s.name.endswith("_count")]
    assert count == [4]


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def _metrics() -> Response:
    return Response(200, b"m 1\n")


async def test_routes_and_errors() -> None:
    server = HttpServer({"/metrics": _metrics})
    _, port = await server.start("127.0.0.1", 0)
    try:
        status, headers, body = await _request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"m 1\n")
        assert headers["content-length"] == "4"
        status, _, body = await _request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"")
        status, _, _ = await _request(port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert status == 404
        status, _, _ = await _request(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == 405
        status, _, _ = await _request(port, b"garbage\r\n\r\n")
        assert status == 400
        too_long = b"GET /" + b"a" * MAX_REQUEST_HEAD + b" HTTP/1.1\r\n\r\n"
        status, _, _ = await _request(port, too_long)
        assert status == 431
    finally:
        await server.close()


@pytest.mark.parametrize("header, expected", [
    (None, 401),
    (b"Basic " + base64.b64encode(b"ops:wrong"), 401),
    (b"Basic !!!notbase64", 401),
    (b"Bearer abc", 401),
    (b"Basic " + base64.b64encode(b"ops:secret"), 200),
])
async def test_basic_auth_when_exposed(header: bytes | None, expected: int) -> None:
    async def authorize(user: str, password: bytes) -> bool:
        return (user, password) == ("ops", b"secret")

    server = HttpServer({"/metrics": _metrics}, authorize=authorize)
    _, port = await server.start("127.0.0.1", 0)
    try:
        raw = b"GET /metrics HTTP/1.1\r\n"
        if header is not None:
            raw += b"Authorization: " + header + b"\r\n"
        status, headers, _ = await _request(port, raw + b"\r\n")
        assert status == expected
        if expected == 401:
            assert headers["www-authenticate"].startswith("Basic realm=")
    finally:
        await server.close()
