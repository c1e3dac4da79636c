"""Micro benchmark of the SQLite store alone: group commit under concurrent publishers.

    python -m benchmarks.store_bench                      # fsync and os, 10 x 100-message batches
    python -m benchmarks.store_bench --durability fsync --messages 500000 --acks

Each of `--publishers` tasks applies batches of `--batch` QoS 1 messages (a MessageSaved and
a DeliverySaved each, as the core emits for one persistent subscriber) and awaits each batch
before the next, as a connection does before sending its PUBACKs. With `--acks` every batch
also deletes the deliveries of that publisher's previous batch (the subscriber acked them), so
the file stays small: the steady state of a broker that keeps up. The change lists are built
before the clock starts, so the numbers are the store's own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_broker.core.changes import (
    Change,
    DeliveryDeleted,
    DeliveryRecord,
    DeliverySaved,
    Message,
    MessageSaved,
)
from edge_broker.store.sqlite import SqliteStore


def build_batches(publisher: int, publishers: int, batches: int, size: int, payload: bytes,
                  acks: bool, subscribers: int = 1) -> list[list[Change]]:
    """One publisher's batches. Message and delivery ids come from one counter in the core,
    handed out in the order batches arrive; round robin over the publishers mimics that.
    Each message gets one delivery per subscriber (`subscribers` offline sessions of that
    publisher; S4 of the runner is 1 publisher x 10 subscribers)."""
    out: list[list[Change]] = []
    previous: list[tuple[str, int]] = []
    names = [f"sub-{publisher}" if subscribers == 1 else f"sub-{publisher}-{k}"
             for k in range(subscribers)]
    topic = f"site/gw1/sensor/{publisher}/temperature"
    for k in range(batches):
        changes: list[Change] = []
        first = 1 + (k * publishers + publisher) * size
        ids = list(range(first, first + size))
        current: list[tuple[str, int]] = []
        for mid in ids:
            changes.append(MessageSaved(Message(mid, topic, payload, 1, False,
                                                received_at=1_700_000_000.0 + mid)))
            for j, name in enumerate(names):
                did = (mid - 1) * subscribers + j + 1
                changes.append(DeliverySaved(DeliveryRecord(name, did, mid, 1, False)))
                current.append((name, did))
        if acks:
            changes.extend(DeliveryDeleted(name, did) for name, did in previous)
            previous = current
        out.append(changes)
    return out


async def run_one(durability: str, args: argparse.Namespace, directory: Path) -> dict[str, float]:
    path = directory / f"bench-{durability}.db"
    for suffix in ("", "-wal", "-shm", ".ballast"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    store = SqliteStore(path, durability=durability)
    await store.open()
    per_publisher = args.messages // (args.publishers * args.batch)
    payload = bytes(args.payload)
    work = [build_batches(p, args.publishers, per_publisher, args.batch, payload, args.acks,
                          args.subscribers)
            for p in range(args.publishers)]
    changes = sum(len(b) for batches in work for b in batches)
    messages = per_publisher * args.batch * args.publishers
    latencies: list[float] = []

    async def publisher(batches: list[list[Change]]) -> None:
        for batch in batches:
            started = time.perf_counter()
            await store.apply(batch)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(publisher(batches) for batches in work))
    elapsed = time.perf_counter() - started
    stats = await store.stats()
    await store.close()
    latencies.sort()
    return {
        "messages": messages,
        "seconds": elapsed,
        "msgs_per_s": messages / elapsed,
        "changes_per_s": changes / elapsed,
        "commits_per_s": stats.commits / elapsed,
        "commits": stats.commits,
        "fsyncs_per_msg": stats.fsyncs / messages,
        "changes_per_commit": stats.changes_written / max(1, stats.commits),
        "rows_per_change": stats.rows_written / max(1, stats.changes_written),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "file_mib": stats.file_bytes / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durability", default="fsync,os",
                        help="comma-separated: fsync, os, none (default fsync,os)")
    parser.add_argument("--publishers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="messages per batch")
    parser.add_argument("--messages", type=int, default=200_000, help="total messages")
    parser.add_argument("--payload", type=int, default=64, help="payload bytes")
    parser.add_argument("--subscribers", type=int, default=1,
                        help="offline subscribers per publisher: deliveries per message "
                        "(S4: --publishers 1 --subscribers 10)")
    parser.add_argument("--acks", action="store_true",
                        help="each batch also deletes the publisher's previous batch")
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory for the database (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        directory = args.dir or Path(tmp)
        print(f"{args.publishers} publishers x batches of {args.batch} QoS 1 messages "
              f"({args.payload} B payload{', with acks' if args.acks else ''}, "
              f"{args.subscribers} deliveries each), "
              f"{args.messages} messages, in {directory}")
        print(f"{'durability':<10} {'msgs/s':>9} {'changes/s':>10} {'commits/s':>9} "
              f"{'fsyncs/msg':>10} {'chg/commit':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'file MiB':>8}")
        for durability in args.durability.split(","):
            r = asyncio.run(run_one(durability.strip(), args, directory))
            print(f"{durability:<10} {r['msgs_per_s']:>9.0f} {r['changes_per_s']:>10.0f} "
                  f"{r['commits_per_s']:>9.1f} {r['fsyncs_per_msg']:>10.5f} "
                  f"{r['changes_per_commit']:>10.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                  f"{r['file_mib']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
