"""The JetStream uplink process's own work per drained message, without network or servers.

    python -m benchmarks.bridge_child_cpu STORE_DIR [MESSAGES] [WINDOW]

Runs what the uplink process (`separate_process = true`) does for each window of a drain:
`ChildLogReader.read_after` on the real `LogFile` (its thread included), `JetStreamSink.submit`
with a stand-in connection that keeps the HPUB bytes, the PubAcks fed as NATS protocol bytes
in 32 KiB reads through the sink's ack path (nats-py's `Parser`, and `AckReader` when the
code has it, as `JetStreamSink._take_acks` installs it), and `commit_cursor`. Prints CPU
time per message per phase; for a noise-free figure run it under callgrind twice (a few
hundred and some tens of thousands of MESSAGES) and divide the difference in instructions
(benchmarks/results/h5-jsdrain.md). STORE_DIR holds an edge-broker store with the backlog of
bridge "s11" (as S14 makes it); if it has none, one of 100,000 messages is made first (a
broker with the bridge and no server, 2 QoS 1 publishers).
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_broker.server import evloop

from . import brokers, loadgen
from .scenarios_bridge import TOPIC, bridge_toml

STORE_ID = "5eed0000000000a1"
INBOX = "_INBOX.abcdefghijklmnopqrstuv."
DB = "edge-broker.db"


def make_store(target: Path, total: int = 100_000, publishers: int = 2) -> None:
    rb = brokers.start("edge", extra_config=bridge_toml("jetstream", "nats://127.0.0.1:1",
                                                        separate=True))
    try:
        def one(n: int) -> None:
            loadgen.publish_only(rb.host, rb.port, loadgen.PubSpec(
                topic=f"{TOPIC}/{n}", qos=1, duration_s=3600, max_messages=total // publishers,
                client_id=f"bench-drain-{n}"), hard_timeout_s=900)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(publishers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rb.proc.terminate()
        rb.proc.wait(30)
        assert rb.data_dir is not None
        shutil.copytree(rb.data_dir, target, dirs_exist_ok=True)
    finally:
        rb.stop()


class _Connection:
    """Stands for nats-py's client as the sink writes to it."""

    is_closed = False
    is_draining_pubs = False
    is_connected = True
    max_payload = 1 << 20
    _max_pending_size = 1 << 30
    _pending_data_size = 0

    def __init__(self) -> None:
        self.out: list[bytes] = []

    async def _send_command(self, data: bytes) -> None:
        self.out.append(data)

    async def _flush_pending(self) -> None:
        pass


async def run(store: Path, limit: int, window: int) -> None:
    from nats.protocol.parser import Parser

    from edge_broker.bridge.config import parse_bridges
    from edge_broker.bridge.jetstream import JetStreamSink
    from edge_broker.bridge.jetstream_frames import FrameBuilder
    from edge_broker.server.bridge_child_log import ChildLogReader
    from edge_broker.store.log.bridge_file import LogFile

    (config,) = parse_bridges([{"name": "s11", "kind": "jetstream",
                                "servers": ["nats://127.0.0.1:1"], "subject_prefix": "bench.gw",
                                "jetstream_stream": "S14"}], file="t.toml", gateway_id="gw7")
    sink: Any = JetStreamSink(config, gateway_id="gw7", store_id=STORE_ID)
    connection = sink._nc = _Connection()
    sink._js = object()
    sink._reply_prefix = INBOX
    sink._frames = FrameBuilder("gw7", STORE_ID, sink.subject)
    skip = len(INBOX)

    class Client:
        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                               headers: bytes | None) -> None:
            sink._ack(subject[skip:], data, None)

    parser = Parser(Client())
    parse = parser.parse
    try:
        from edge_broker.bridge.jetstream_acks import AckReader

        parse = AckReader(parser, parser.parse, 1, INBOX, sink._ack_plain).feed
    except ImportError:  # older code: acks through nats-py's parser only
        pass
    spent = {"read": 0.0, "submit": 0.0, "acks": 0.0, "commit": 0.0}
    sent: list[Any] = []
    reader = ChildLogReader(LogFile(str(store / DB), "bridge:s11"), "bridge-s11", sent.append,
                            1 << 62, 0)
    total = cursor = seq = 0
    try:
        while total < limit:
            t0 = time.process_time()
            batch = await reader.read_after(cursor, window)
            t1 = time.process_time()
            if not batch:
                break
            acks = await sink.submit(batch)
            t2 = time.process_time()
            first = sink._token - len(batch)
            lines = []
            for token in range(first + 1, first + len(batch) + 1):
                seq += 1
                body = b'{"stream":"S14","seq":%d}' % seq
                lines.append(b"MSG %s%d 1 %d\r\n%s\r\n" % (INBOX.encode(), token, len(body),
                                                         body))
            stream = b"".join(lines)
            t3 = time.process_time()
            for at in range(0, len(stream), 32768):
                await parse(stream[at:at + 32768])
            count = await acks
            t4 = time.process_time()
            cursor = batch[count - 1].offset
            await reader.commit_cursor(cursor)
            t5 = time.process_time()
            spent["read"] += t1 - t0
            spent["submit"] += t2 - t1
            spent["acks"] += t4 - t3
            spent["commit"] += t5 - t4
            total += count
            connection.out.clear()
    finally:
        reader.close()
    per = {k: v / max(total, 1) * 1e6 for k, v in spent.items()}
    print(f"{total} messages, window {window}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
          + f", sum {sum(per.values()):.2f} us/msg (CPU time)")


def main(argv: list[str]) -> None:
    store = Path(argv[0])
    limit = int(argv[1]) if len(argv) > 1 else 1 << 62
    window = int(argv[2]) if len(argv) > 2 else 256
    if not (store / DB).exists():
        make_store(store)
    evloop.run(run(store, limit, window))


if __name__ == "__main__":
    main(sys.argv[1:])
