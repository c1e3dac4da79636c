"""The Kafka uplink process's own work per drained message, without network or servers.

    python -m benchmarks.kafka_child_cpu STORE_DIR [MESSAGES] [WINDOW] [--repeat N]

Runs what the uplink process (`separate_process = true`) does for each window of a Kafka
drain: `ChildLogReader.read_after` on the real `LogFile` (read on the loop, as the process
does), `KafkaSink.submit` with a stand-in producer (the sink's record batches, or aiokafka's
real `BatchBuilder`s when the sink uses those, built and their CRC computed at hand-over as
aiokafka's sender does, answered at once: no produce request is encoded or written), the
window's acknowledgements, and `commit_cursor`. Prints CPU time per message per phase.
For a noise-free figure run it under callgrind with two MESSAGES counts and divide the
difference in instructions (as benchmarks/bridge_child_cpu.py does for JetStream).

STORE_DIR holds an edge-broker store with the backlog of bridge "s11" (S14's shape: four QoS 1
devices on `bench/s11/<n>`); if it has none, one of 100,000 messages is made first.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from edge_broker.server import evloop

from .bridge_child_cpu import DB, STORE_ID, make_store


class _Cluster:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}


class _Client:
    cluster = _Cluster()


class _Producer:
    """Stands for AIOKafkaProducer as the sink uses it."""

    client = _Client()

    def __init__(self, batch_bytes: int) -> None:
        self.batch_bytes = batch_bytes
        self.built = 0

    def create_batch(self) -> Any:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(self.batch_bytes, 0)  # no compression

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        self.built += len(batch._build())  # the records' encoding and the CRC
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}


async def run(store: Path, limit: int, window: int) -> dict[str, float]:
    from edge_broker.bridge import kafka
    from edge_broker.bridge.config import parse_bridges
    from edge_broker.server.bridge_child_log import ChildLogReader
    from edge_broker.store.log.bridge_file import LogFile

    (config,) = parse_bridges([{"name": "s11", "kind": "kafka",
                                "servers": ["127.0.0.1:1"], "idempotence": False,
                                "topic_map": [{"filter": "#", "topic": "s14"}]},
                               ], file="t.toml", gateway_id="gw7")
    sink: Any = kafka.KafkaSink(config, gateway_id="gw7", store_id=STORE_ID)
    producer = sink._producer = _Producer(kafka.MAX_BATCH_BYTES)
    spent = {"read": 0.0, "submit": 0.0, "acks": 0.0, "commit": 0.0}
    sent: list[Any] = []
    reader = ChildLogReader(LogFile(str(store / DB), "bridge:s11"), "bridge-s11", sent.append,
                            1 << 62, 0)
    total = cursor = 0
    try:
        while total < limit:
            t0 = time.process_time()
            batch = await reader.read_after(cursor, window)
            t1 = time.process_time()
            if not batch:
                break
            acks = await sink.submit(batch)
            t2 = time.process_time()
            count = await acks  # the lanes hand over and "answer" on the next turns
            t3 = time.process_time()
            cursor = batch[count - 1].offset
            await reader.commit_cursor(cursor)
            t4 = time.process_time()
            spent["read"] += t1 - t0
            spent["submit"] += t2 - t1
            spent["acks"] += t3 - t2
            spent["commit"] += t4 - t3
            total += count
            sent.clear()
    finally:
        await sink.close()
        reader.close()
    per = {k: v / max(total, 1) * 1e6 for k, v in spent.items()}
    print(f"{total} messages, window {window}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
          + f", sum {sum(per.values()):.2f} us/msg (CPU time), "
          f"{producer.built / max(total, 1):.0f} batch bytes/msg", flush=True)
    return per


def main(argv: list[str]) -> None:
    repeat = 1
    if "--repeat" in argv:
        at = argv.index("--repeat")
        repeat = int(argv[at + 1])
        del argv[at:at + 2]
    store = Path(argv[0])
    limit = int(argv[1]) if len(argv) > 1 else 1 << 62
    window = int(argv[2]) if len(argv) > 2 else 256
    if not (store / DB).exists():
        make_store(store)
    for _ in range(repeat):
        evloop.run(run(store, limit, window))


if __name__ == "__main__":
    main(sys.argv[1:])
