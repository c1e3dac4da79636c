"""JetStreamSink with fast-ingest batches (bridge/jetstream_batch.py) against a real
nats-server (2.14+): every message stored once and in order, resends dropped by id inside a
batch, a refused message ends the count, a stream without `allow_batched` keeps one PubAck
per message."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from typing import Any

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

import nats
import nats.js.errors
from nats.js import api

from edge_broker.bridge.base import BridgeMessage, Resend
from edge_broker.bridge.jetstream import JetStreamSink
from edge_broker.errors import BridgeError
from tests.bridge.servers import NatsServer
from tests.bridge.test_jetstream import STORE_ID, bridge_config, messages, offsets, stored


def sink_for(server: NatsServer, **extra: Any) -> JetStreamSink:
    return JetStreamSink(bridge_config(server.url, **extra), gateway_id="gw7",
                         store_id=STORE_ID, ack_timeout=30.0)


async def add_stream(server: NatsServer, **config: Any) -> None:
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().add_stream(api.StreamConfig(
            name="EDGE", subjects=["site1.gw7.>"], duplicate_window=120.0, **config))
    finally:
        await nc.close()


async def test_pipelined_windows_store_every_message_once_in_order(
        nats_server: NatsServer) -> None:
    sink = sink_for(nats_server)
    await sink.start()
    try:
        assert sink.created_stream and sink.batched
        # Eight windows in flight at once (as the forwarder's pipeline has them): eight
        # batches open on the stream together.
        futures = [await sink.submit(messages(1 + 256 * i, 256, topic=f"sensors/t{i % 3}"))
                   for i in range(8)]
        assert [await f for f in futures] == [256] * 8
        # A crash before the cursor moved: the same entries again, windows cut elsewhere,
        # and new ones after them. Only the new ones are stored.
        futures = [await sink.submit(messages(1000, 100)),
                   await sink.submit(messages(1100, 1000))]
        assert [await f for f in futures] == [100, 1000]
    finally:
        await sink.close()
    assert offsets(await stored(nats_server.url)) == list(range(1, 2100))


def _stored_count(port: int, deadline_s: float = 10.0, want: int = 0) -> int:
    """The stream's message count, asked over a blocking socket of its own (the test's
    event loop stays blocked meanwhile), polled until it is `want` or the deadline."""
    end = time.monotonic() + deadline_s
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as raw:
        reader = raw.makefile("rb")
        reader.readline()  # INFO
        raw.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nSUB _INBOX.t 1\r\n')
        count = -1
        while count != want and time.monotonic() < end:
            raw.sendall(b"PUB $JS.API.STREAM.INFO.EDGE _INBOX.t 0\r\n\r\n")
            line = reader.readline()
            while not line.startswith(b"MSG "):
                if line.startswith(b"PING"):
                    raw.sendall(b"PONG\r\n")
                line = reader.readline()
            data = reader.read(int(line.split()[-1]) + 2)
            count = json.loads(data)["state"]["messages"]
        return count


async def test_a_submitted_window_reaches_the_server_while_the_loop_is_busy(
        nats_server: NatsServer) -> None:
    # The forwarder reads its next page right after a submit, holding the loop: the
    # window must be on its way by then, not waiting in nats-py's buffer for its flusher
    # task (the remote side would sit idle meanwhile).
    sink = sink_for(nats_server)
    await sink.start()
    try:
        acks = await sink.submit(messages(1, 256))
        assert _stored_count(nats_server.port, want=256) == 256  # the loop never ran
        assert await acks == 256
    finally:
        await sink.close()


def _wait_stopped(pid: int, deadline_s: float = 10.0) -> None:
    """Until the process is stopped (a signal is delivered, not at once, to a running one)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)  # polling /proc with a deadline: nothing to wait on
    raise AssertionError(f"process {pid} did not stop")


async def test_a_batch_without_replies_ends_at_ack_timeout(nats_server: NatsServer) -> None:
    sink = JetStreamSink(bridge_config(nats_server.url), gateway_id="gw7", store_id=STORE_ID,
                         ack_timeout=0.5)
    await sink.start()
    assert nats_server.proc is not None
    os.kill(nats_server.proc.pid, signal.SIGSTOP)  # it answers nothing from now on
    try:
        _wait_stopped(nats_server.proc.pid)
        acks = await sink.submit(messages(1, 10))
        with pytest.raises(BridgeError, match=r"no ack within 0\.5 s"):
            await acks
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
        await sink.close()


async def test_a_window_of_one_message(nats_server: NatsServer) -> None:
    sink = sink_for(nats_server)
    await sink.start()
    try:
        assert sink.batched
        assert await sink.send(messages(1, 1)) == 1
        assert await sink.send(messages(1, 1)) == 1  # a duplicate, counted as stored
        assert await sink.send(messages(2, 1)) == 1
    finally:
        await sink.close()
    assert offsets(await stored(nats_server.url)) == [1, 2]


def sized(first: int, count: int, big: set[int]) -> list[BridgeMessage]:
    """Messages whose offsets in `big` are over the stream's max_msg_size (1 KiB here)."""
    return [BridgeMessage(offset=o, topic="sensors/t1", payload=b"x" * (4000 if o in big else 8),
                          qos=1, publish_time=1_765_000_000.0) for o in range(first, first + count)]


async def test_a_refused_message_ends_the_count_and_nothing_after_it_is_stored(
        nats_server: NatsServer) -> None:
    await add_stream(nats_server, max_msg_size=1024, allow_batched=True)
    sink = sink_for(nats_server)
    await sink.start()
    try:
        assert not sink.created_stream and sink.batched
        # The 5th of 10 is too large for the stream: 4 are stored, the count is 4, and the
        # batch ends there (gap mode "fail"): 6..10 are not stored.
        assert await sink.send(sized(1, 10, {5})) == 4
        # Sent again from the cursor, the refused message is first: nothing is counted,
        # and the error says why.
        with pytest.raises(BridgeError, match="exceeds maximum"):
            await sink.send(sized(5, 6, {5}))
        # The last message refused (the batch's end marker comes after it).
        assert await sink.send(sized(20, 3, {22})) == 2
        # Windows in flight behind a refused one are batches of their own: stored.
        futures = [await sink.submit(sized(30, 4, {31})), await sink.submit(sized(40, 2, set()))]
        assert [await f for f in futures] == [1, 2]
    finally:
        await sink.close()
    assert offsets(await stored(nats_server.url)) == [1, 2, 3, 4, 20, 21, 30, 40, 41]


async def test_an_existing_stream_without_batches_keeps_one_ack_per_message(
        nats_server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    await add_stream(nats_server, max_msg_size=1024)
    caplog.set_level(logging.INFO, logger="edge_broker.bridge.jetstream")
    for duplicates in (100, 500):
        sink = sink_for(nats_server, name="unbatched")
        sink.ack_timeout = 3600.0
        await sink.start()
        try:
            assert not sink.batched
            assert await sink.send(messages(1, 300)) == 300
            assert await sink.send(messages(201, 200)) == 200
            assert sink.duplicates == duplicates
            # A message over the stream's max_msg_size ends the window before it: not sent
            # (sent, its refusal would have every window behind it sent again).
            assert sink.max_msg_size == 1024
            assert await asyncio.wait_for(sink.send(sized(401, 4, {403})), 60) == 2
            assert sink.written == 2
        finally:
            await sink.close()
    notes = [r for r in caplog.records if "does not allow batches" in r.getMessage()]
    assert len(notes) == 1  # said once, not at every (re)start
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info("EDGE")
    finally:
        await nc.close()
    assert not info.config.allow_batched  # never modified
    assert offsets(await stored(nats_server.url)) == [*range(1, 403)]


async def test_batches_disabled_on_the_stream_later_fall_back_to_one_ack_each(
        nats_server: NatsServer) -> None:
    sink = sink_for(nats_server)
    await sink.start()
    nc = await nats.connect(nats_server.url)
    try:
        assert sink.batched
        assert await sink.send(messages(1, 10)) == 10
        js = nc.jetstream()
        config = (await js.stream_info("EDGE")).config
        config.allow_batched = False
        await js.update_stream(config)
        with pytest.raises(Resend, match="disabled"):
            await sink.send(messages(11, 10))
        assert await sink.send(messages(11, 10)) == 10  # the same sink, one ack each
    finally:
        await nc.close()
        await sink.close()
    assert offsets(await stored(nats_server.url)) == list(range(1, 21))


async def test_no_stream_for_the_subject_is_a_resend(nats_server: NatsServer) -> None:
    """The stream is deleted under a running sink: "no responders" for the batch."""
    sink = sink_for(nats_server)
    await sink.start()
    nc = await nats.connect(nats_server.url)
    try:
        assert sink.batched
        await nc.jetstream().delete_stream("EDGE")
        with pytest.raises(Resend, match="no responders"):
            await asyncio.wait_for(sink.send(messages(1, 5)), 30)
    finally:
        await nc.close()
        await sink.close()


def test_api_errors_keep_their_code() -> None:
    from edge_broker.bridge.jetstream import _api_error

    error = _api_error({"code": 400, "err_code": 10054, "description": "too big"})
    assert isinstance(error, nats.js.errors.APIError) and error.err_code == 10054


async def test_replies_of_a_batch_and_what_they_confirm() -> None:
    """The replies as nats-server 2.14+ sends them (stream.go), without a server: what a
    window counts as stored after flow acks, a gap, an error and a lost connection."""
    from edge_broker.bridge.jetstream_batch import BatchPublisher
    from edge_broker.bridge.jetstream_frames import FrameBuilder

    loop = asyncio.get_running_loop()
    publisher = BatchPublisher(b"_INBOX.x.", lambda error: ValueError(repr(error)))
    builder = FrameBuilder("gw7", STORE_ID, lambda m: "site1.gw7.sensors.t1")
    data, window = publisher.frames(messages(1, 600), builder, "site1.gw7.sensors.t1",
                                    loop.create_future())
    key = window.key
    assert data.count(b"HPUB ") == 600 and data.endswith(b".601.3.$FI 0\r\n\r\n")
    assert b"_INBOX.x.%s.500.fail.1.0.$FI " % key in data
    assert b"_INBOX.x.%s.500.fail.2.1.$FI " % key in data

    def reply(seq: int, body: bytes) -> None:
        publisher.on_reply(b"%s.500.fail.%d.1.$FI" % (key, seq), body, None)

    reply(1, b'{"type":"ack","seq":0,"msgs":500}')
    reply(500, b'{"type":"ack","seq":500,"msgs":500}')
    assert window.confirmed() == 500 and not window.done.done()
    reply(520, b'{"type":"err","seq":520,"error":{"code":400,"err_code":10077}}')
    reply(521, b'{"type":"gap","last_seq":520,"seq":521}')
    assert window.confirmed() == 500 and not window.done.done()  # 501..519: not yet known
    reply(521, b'{"stream":"EDGE","seq":519,"batch":"%s","count":519}' % key)
    assert window.done.done() and window.confirmed() == 519
    assert isinstance(window.error, ValueError)
    publisher.release(window)
    reply(522, b'{"error":{"code":400,"err_code":10208}}')  # "unknown batch": ignored

    _, lost = publisher.frames(messages(1, 300), builder, "site1.gw7.sensors.t1",
                               loop.create_future())
    publisher.on_reply(b"%s.300.fail.40.1.$FI" % lost.key,
                       b'{"type":"ack","seq":40,"msgs":40}', None)
    publisher.lose_all(Resend("lost"))
    assert lost.done.done() and lost.confirmed() == 40  # only what a flow ack confirmed

    _, first = publisher.frames(messages(1, 5), builder, "site1.gw7.sensors.t1",
                                loop.create_future())
    publisher.on_reply(b"%s.5.fail.1.0.$FI" % first.key,
                       b'{"error":{"code":429,"err_code":10211}}', None)
    assert first.done.done() and first.confirmed() == 0 and isinstance(first.error, Resend)
