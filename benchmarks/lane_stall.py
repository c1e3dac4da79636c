"""How long the QoS 0 lane's appends hold the broker's event loop (docs/bridges.md "The QoS 0
lane"), in-process, without sockets: a `Lane` over a real `LaneFile` in a directory on disk,
fed rows of S1's messages (QoS 0, `bench/s1`, 100 B) one loop turn each, the process's
acknowledgements simulated (the lane's cursor moved every 10 rows, 5 rows behind), so the file
stays small and SQLite's WAL auto-checkpoint (every ~1,000 pages) runs as in a bridged S1.

    PYTHONSAFEPATH=1 PYTHON benchmarks/lane_stall.py [ROWS] [MESSAGES_PER_ROW] [DIR] [BUSY_MS]

(a file, not `-m benchmarks...`, and PYTHONSAFEPATH=1: the `edge_broker` of PYTHON's venv is
measured - a compiled build - not the checkout's). Defaults: 4,000 rows of 150 messages (a
row per 5 ms at 30,000 msgs/s), DIR /tmp, BUSY_MS 4: after each row the loop spins that
long of CPU holding the GIL (the broker's own work for those messages, ~25 us each, which a
writer thread has to win the GIL from), then yields one turn. Prints, over the loop's work
per row (`Lane.send`, which encodes the row and appends it or queues it, plus the cursor
store every 10 rows): p50, p99, p99.9 and max in ms of wall time, and the count over 5 ms;
the loop thread's CPU per message less the spin's (`loop_cpu`: the lane's work on the loop)
and the process's (both threads), in us; rows written and the lane's drops. Wall time
includes the loop thread being preempted (a busy machine): alternate the builds.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from edge_broker.core.changes import Message
from edge_broker.server.bridge_lane import Lane
from edge_broker.store.log.lane_file import LaneFile


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _run(rows: int, per_row: int, directory: str, busy_s: float) -> None:
    path = os.path.join(directory, f"lane-stall-{os.getpid()}.lane-b")
    file = LaneFile(path, "s1")
    lane = Lane("b", "", file, mark=0, notify=lambda message: None, row_interval_s=0)
    now = time.time()
    messages = [Message(n, "bench/s1", b"x" * 100, 0, False, received_at=now, origin="dev")
                for n in range(per_row)]
    held: list[float] = []
    cpu0 = time.thread_time()
    proc0 = time.process_time()
    for i in range(rows):
        t0 = time.perf_counter()
        lane.send(messages)
        if i % 10 == 9:  # the process's acknowledgement ("lane_ack"), 5 rows behind
            file.commit_cursor(max(0, file.next_offset - 1 - 5 * per_row))
        t1 = time.perf_counter()
        held.append(t1 - t0)
        c1 = time.thread_time()
        while time.thread_time() - c1 < busy_s:  # the broker's other work (CPU), GIL held
            pass
        await asyncio.sleep(0)  # one loop turn per row
    loop_cpu = time.thread_time() - cpu0 - rows * busy_s
    lane.close()
    wait = getattr(file, "wait_written", None)
    if wait is not None:
        wait()
    proc_cpu = time.process_time() - proc0
    written = file.next_offset - 1
    file.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    held.sort()
    total = rows * per_row
    ms = 1e3
    print(f"rows={rows} per_row={per_row} held_ms p50={_quantile(held, 0.5) * ms:.3f} "
          f"p99={_quantile(held, 0.99) * ms:.3f} p99.9={_quantile(held, 0.999) * ms:.3f} "
          f"max={held[-1] * ms:.3f} over_5ms={sum(1 for h in held if h > 0.005)} "
          f"loop_cpu={1e6 * loop_cpu / total:.2f} us/msg "
          f"process_cpu={1e6 * proc_cpu / total:.2f} us/msg "
          f"written={written} dropped={lane.dropped}")


def main(argv: list[str]) -> None:
    rows = int(argv[0]) if argv else 4000
    per_row = int(argv[1]) if len(argv) > 1 else 150
    directory = argv[2] if len(argv) > 2 else "/tmp"
    busy_s = float(argv[3]) / 1e3 if len(argv) > 3 else 0.004
    asyncio.run(_run(rows, per_row, directory, busy_s))


if __name__ == "__main__":
    main(sys.argv[1:])
