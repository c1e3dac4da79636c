"""Memory per idle connection, in-process (issue 12, S5): a broker on a thread of this process,
N idle MQTT 3.1.1 connections (the S5 CONNECT: benchmarks/wire.py) held by a child process, and
the broker process's Python allocations (tracemalloc) or RSS before and after, per connection.

    python -m benchmarks.idle_mem --connections 2000 [--rss] [--top 15]

tracemalloc counts only Python allocations (objects, dicts, buffers made through the Python
allocator), which is what the per-connection state in edge_broker changes; --rss measures the
process's RSS instead (tracemalloc off), which adds the kernel-side socket and allocator slack.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HOLDER = r"""
import socket, sys
sys.path.insert(0, sys.argv[4])
from benchmarks import wire
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.create_connection((host, port))
    s.sendall(wire.connect(f"idle-{sys.argv[5] if len(sys.argv) > 5 else ''}{i}",
                           keepalive_s=300))
    data = b""
    while len(data) < 4:
        chunk = s.recv(4 - len(data))
        if not chunk:
            raise SystemExit(f"connection {i} closed before CONNACK")
        data += chunk
    if data[0] != 0x20 or data[3] != 0:
        raise SystemExit(f"connection {i} refused: {data!r}")
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def malloc_in_use(field: str = "uordblks") -> int:
    """Bytes in use in the C heap (glibc mallinfo2 uordblks + hblkhd), 0 if unavailable:
    what objects larger than 512 B, C libraries (uvloop/libuv, sqlite) and the interpreter
    take besides pymalloc's arenas."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return int(getattr(info, field) + info.hblkhd)


def pymalloc_summary() -> dict[str, int]:
    """pymalloc's totals and its bytes per size class, in use and free
    (sys._debugmallocstats, which writes to the C stderr)."""
    import os
    import re

    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as out:
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    found: dict[str, int] = {}
    for line in text.splitlines():
        total = re.match(r"# (bytes in allocated blocks|bytes in available blocks|"
                         r"bytes lost to pool headers|bytes lost to quantization|"
                         r"bytes in empty pools)\s*=\s*([\d,]+)", line)
        if total:
            found[total.group(1)] = int(total.group(2).replace(",", ""))
        row = re.match(r"\s*\d+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", line)
        if row:
            size = int(row.group(1))
            found[f"size {size} in use"] = int(row.group(3)) * size
            found[f"size {size} free"] = int(row.group(4)) * size
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--preload", type=int, default=0,
                        help="connections opened (and held) before the baseline")
    parser.add_argument("--rss", action="store_true", help="RSS delta instead of tracemalloc")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (the broker runs uvloop when installed: server/run.py)")
    parser.add_argument("--top", type=int, default=15, help="allocation sites to show")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    sys.path.insert(0, str(root))
    from conftest import BrokerThread, broker_config  # type: ignore[import-not-found]

    if args.loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with tempfile.TemporaryDirectory() as tmp:
        broker = BrokerThread(broker_config(Path(tmp))).start()
        try:
            # Warm up: one connection in and out, so first-use caches are not counted.
            warm = subprocess.Popen([sys.executable, "-c", HOLDER, broker.host,
                                     str(broker.port), "1", str(root)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert warm.stdout is not None and warm.stdin is not None
            assert warm.stdout.readline().strip() == "ready"
            warm.stdin.close()
            warm.wait()
            # --preload: connections held before the baseline, so the heap left free by the
            # start-up (which a delta from a fresh start counts as negative cost) is used up
            # and the figure is the marginal cost of one more connection.
            preload = None
            if args.preload:
                preload = subprocess.Popen([sys.executable, "-c", HOLDER, broker.host,
                                            str(broker.port), str(args.preload), str(root),
                                            "pre"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True)
                assert preload.stdout is not None
                assert preload.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            gc.collect()
            if args.rss:
                before = rss_kb()
                heap0 = malloc_in_use()
                arena0 = malloc_in_use("arena")
                pools0 = pymalloc_summary()
            else:
                tracemalloc.start(1)
                snap0 = tracemalloc.take_snapshot()
                before = tracemalloc.get_traced_memory()[0]
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, broker.host,
                                       str(broker.port), str(args.connections), str(root)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None and holder.stdin is not None
            line = holder.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"holder failed: {line!r}")
            time.sleep(1.0)  # the broker finishes its per-connection work (commits, timers)
            count = broker.call(lambda: len(broker.app.connections))
            if args.loop == "asyncio":  # cancelled timers stay in its heap until due
                timers = broker.call(lambda: (len(broker.loop._scheduled),
                                              broker.loop._timer_cancelled_count))
                print(f"timers scheduled {timers[0]}, of which cancelled {timers[1]}")
            gc.collect()
            if args.rss:
                after = rss_kb()
                heap = (malloc_in_use() - heap0) / args.connections
                arena = (malloc_in_use("arena") - arena0) / args.connections
                print(f"C heap (malloc) in use: {heap:.0f} B per connection, "
                      f"taken from the system: {arena:.0f} B")
                pools = pymalloc_summary()
                for key, value in pools.items():
                    delta = (value - pools0.get(key, 0)) / args.connections
                    if abs(delta) >= 1:
                        print(f"pymalloc {key}: {delta:+.0f} B per connection")
                print(f"connections {count}: RSS {(after - before) / args.connections:.3f} KB "
                      f"per connection ({before} -> {after} KB)")
            else:
                after = tracemalloc.get_traced_memory()[0]
                snap1 = tracemalloc.take_snapshot()
                print(f"connections {count}: tracemalloc {(after - before) / args.connections:.1f} "
                      f"B per connection")
                for stat in snap1.compare_to(snap0, "lineno")[:args.top]:
                    print(f"  {stat.size_diff / args.connections:8.1f} B "
                          f"{stat.count_diff / args.connections:6.2f} blocks  "
                          f"{stat.traceback[0].filename.split('site-packages/')[-1]}"
                          f":{stat.traceback[0].lineno}")
            holder.stdin.close()
            holder.wait()
            if preload is not None:
                assert preload.stdin is not None
                preload.stdin.close()
                preload.wait()
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
