"""The store thread's work per drained message of a bridge, alone (no broker, no network).

    python -m benchmarks.core_store_drain [MESSAGES] [--window N] [--budget N] [--every N]
        [--sync FULL|NORMAL] [--retain-after N]

A log of MESSAGES rows (100-byte payloads, 4 topics, one bridge reader over all of them)
is made in a fresh file (WAL, as the store opens it); then, as in a drain, the reader's
cursor is committed once per `--every` acknowledgements of `--window` rows each (one
transaction per commit, synchronous NORMAL as BridgeStoreSide.commit does), with one
retention step (`--budget` rows, its own transaction at `--sync`) whenever
`--budget` rows have been passed since the last one. Printed: CPU seconds (this thread)
per message for the commits and for retention, separately.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from array import array
from pathlib import Path

from edge_broker.store.log import Log, LogMessage, cursors, retention_step, transaction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core_store_drain")
    parser.add_argument("messages", type=int, nargs="?", default=200_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--sync", default="FULL")
    parser.add_argument("--topics", type=int, default=4)
    parser.add_argument("--retain-after", type=int, default=0,
                        help="rows passed between retention runs (default: --budget); a "
                             "run steps until done, as the store after its 5 s interval")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(str(Path(tmp) / "log.db"), isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {args.sync}")
        log = Log()
        with transaction(conn):
            log.load(conn)
            cursors.add_reader(log, conn, "bridge:b")
            cursors.subscribe(log, conn, "bridge:b", "bench/#")
        total = args.messages
        for start in range(0, total, 10_000):
            with transaction(conn):
                log.append(conn, [LogMessage(f"bench/{n % args.topics}", b"x" * 100)
                                  for n in range(start, min(total, start + 10_000))], 1000.0)
        commit_cpu = retention_cpu = 0.0
        passed: list[cursors.Passed] = []
        since_retention = 0
        offset = 0
        acks = 0
        while offset < total:
            end = min(total, offset + args.window)
            rows = array("q")
            for o in range(offset + 1, end + 1):
                rows.extend((o, 100 + 7))
            passed.append(cursors.Passed(end - offset, (end - offset) * 107, rows))
            since_retention += end - offset
            offset = end
            acks += 1
            if acks % args.every == 0 or offset == total:
                t0 = time.thread_time()
                conn.execute("PRAGMA synchronous = NORMAL")
                with transaction(conn):
                    cursors.advance(log, conn, "bridge:b", passed, end=offset)
                conn.execute(f"PRAGMA synchronous = {args.sync}")
                commit_cpu += time.thread_time() - t0
                passed = []
            if since_retention >= (args.retain_after or args.budget) or offset == total:
                t0 = time.thread_time()
                while True:
                    with transaction(conn):
                        report = retention_step(log, conn, 2000.0, budget=args.budget)
                    if report.done:
                        break
                retention_cpu += time.thread_time() - t0
                since_retention = 0
        left = conn.execute("SELECT count(*) FROM log").fetchone()[0]
        print(f"{total} messages, window {args.window}, commit every {args.every} ack(s), "
              f"retention budget {args.budget}: commits {commit_cpu / total * 1e6:.3f} us/msg, "
              f"retention {retention_cpu / total * 1e6:.3f} us/msg, rows left {left}")
        conn.close()


if __name__ == "__main__":
    main()
