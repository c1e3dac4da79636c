"""The uplink's PubAcks taken from the bytes read (bridge/jetstream_acks.py) arrive exactly as
nats-py's own parser would hand them over, whatever the reads' boundaries, and everything
else still reaches nats-py, in order: error acks, 503 statuses, PINGs, other subscriptions."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

from nats.protocol.parser import Parser

from edge_broker.bridge.jetstream_acks import AckReader

PREFIX = "_INBOX.abcdefghijklmnopqrstuv."
SID = 7


class Recorder:
    """Stands for nats-py's client: what its parser dispatches, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        if sid == SID and headers is None:
            self.events.append(("ack", subject[len(PREFIX):], data))
        else:
            self.events.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))


def _msg(subject: str, sid: int, data: bytes, reply: str = "") -> bytes:
    reply_part = f" {reply}" if reply else ""
    return f"MSG {subject} {sid}{reply_part} {len(data)}\r\n".encode() + data + b"\r\n"


def _stream() -> bytes:
    acks = [_msg(f"{PREFIX}{n}", SID, json.dumps({"stream": "S", "seq": n},
                                                 separators=(",", ":")).encode())
            for n in range(1, 40)]
    error = json.dumps({"error": {"code": 503, "err_code": 10077,
                                  "description": "maximum messages exceeded"}}).encode()
    status = b"NATS/1.0 503\r\n\r\n"
    return b"".join([
        *acks[:10],
        b"PING\r\n",
        *acks[10:15],
        _msg(f"{PREFIX}15", SID, error),  # an error ack: must reach the sink as such
        _msg(f"{PREFIX}16", SID, b'{"stream":"S","seq":16,"duplicate":true}'),
        f"HMSG {PREFIX}17 {SID} {len(status)} {len(status)}\r\n".encode() + status + b"\r\n",
        _msg("other.subject", 3, b"hello", reply="_INBOX.x.1"),  # another subscription
        _msg(f"{PREFIX}18", SID, b"with reply", reply="r.1"),  # not a plain PubAck
        *acks[18:30],
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        *acks[30:],
        b"-ERR 'Stale Connection'\r\n",
        *acks[:3],
    ])


async def _nats_py_alone(stream: bytes) -> list[tuple[Any, ...]]:
    client = Recorder()
    await Parser(client).parse(stream)
    return client.events


async def _with_ack_reader(stream: bytes, cuts: list[int]) -> tuple[list[tuple[Any, ...]], int]:
    client = Recorder()
    parser = Parser(client)
    taken: list[int] = []

    def on_ack(token: bytes, data: bytes) -> None:
        taken.append(1)
        client.events.append(("ack", token, data))

    reader = AckReader(parser, parser.parse, SID, PREFIX, on_ack)
    last = 0
    for cut in [*cuts, len(stream)]:
        await reader.feed(stream[last:cut])
        last = cut
    return client.events, len(taken)


async def test_acks_read_before_nats_py_are_what_its_parser_hands_over() -> None:
    stream = _stream()
    expected = await _nats_py_alone(stream)
    assert ("ping",) in expected and ("err", "'stale connection'") in expected
    # in one read
    events, fast = await _with_ack_reader(stream, [])
    assert events == expected
    assert fast == 10  # those before the PING did not go through nats-py's parser
    # cut at every position
    for cut in range(1, len(stream)):
        events, _ = await _with_ack_reader(stream, [cut])
        assert events == expected, cut
    # and in many random small reads
    rng = random.Random(9)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(2, 60)))
        events, _ = await _with_ack_reader(stream, cuts)
        assert events == expected, cuts


async def test_a_cut_ack_is_dropped_when_the_connection_is_new() -> None:
    client = Recorder()
    parser = Parser(client)
    reader = AckReader(parser, parser.parse, SID, PREFIX,
                       lambda token, data: client.events.append(("ack", token, data)))
    whole = _msg(f"{PREFIX}1", SID, b'{"stream":"S","seq":1}')
    await reader.feed(whole[:20])
    parser.reset()  # what nats-py does on a reconnect
    await reader.feed(_msg(f"{PREFIX}2", SID, b'{"stream":"S","seq":2}'))
    assert client.events == [("ack", b"2", b'{"stream":"S","seq":2}')]
