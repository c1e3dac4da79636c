"""Profile edge-broker under a benchmark scenario, with cProfile on the standard event loop.

    python -m benchmarks --brokers edge --scenarios S1 --no-ceiling \\
        --edge-cmd '{python} -m benchmarks.profile_broker {config} 8 /tmp/s1.pstats'
    python -m benchmarks.profile_broker --summary /tmp/s1.pstats

The first command runs the broker in-process under cProfile for at most 8 seconds (or until
the runner stops it) and writes the stats; the second prints the busy time per message split by
part of the broker (receive, core, send, server glue), as in ANALYSIS.md. cProfile slows the
broker several times over: compare shares, not absolute figures. (py-spy cannot see the
Python frames that uvloop calls, hence the standard loop here.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import signal
import sys

# Which part of the broker a function belongs to, by "file:line(name" substring; first match.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("receive: framing, decoding, validation",
     ("(split_frame", "(decode_publish", "mqtt/connection.py", "mqtt/topics.py",
      "mqtt/wire.py")),
    ("core: route, queue, pull", ("core/broker.py", "core/session.py", "core/router.py")),
    ("send: encoding, socket writes", ("(encode_publish", "'send' of '_socket")),
    ("server glue: batches, commit pipeline", ("server/", "store/")),
]


def run(config_path: str, seconds: float, out: str) -> None:
    from edge_broker.config import load_config
    from edge_broker.server.app import BrokerApp

    config = load_config(config_path)

    async def serve() -> None:
        app = BrokerApp(config)
        await app.start()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):  # the runner stops brokers with SIGTERM
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        await app.stop()

    profile = cProfile.Profile()
    profile.enable()
    asyncio.run(serve())
    profile.disable()
    profile.dump_stats(out)


def summary(path: str) -> str:
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    shares = dict.fromkeys([name for name, _ in PARTS], 0.0)
    other = idle = 0.0
    messages = 0
    for (file, line, name), (_, calls, own, _, _) in stats.items():
        key = f"{file}:{line}({name}"
        if "poll" in name:
            idle += own
            continue
        if name == "publish" and file.endswith("core/broker.py"):
            messages = calls
        for part, patterns in PARTS:
            if any(p in key for p in patterns):
                shares[part] += own
                break
        else:
            other += own
    busy = sum(shares.values()) + other
    lines = [f"{messages:,} messages published, {busy:.2f} s busy "
             f"({busy / max(messages, 1) * 1e6:.1f} us per message under cProfile)"]
    for part, seconds in [*shares.items(), ("other: builtins, event loop", other)]:
        lines.append(f"  {part:<42} {seconds / busy * 100:5.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_broker",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", metavar="PSTATS", help="print the split of a stats file")
    parser.add_argument("args", nargs="*", metavar="CONFIG SECONDS OUT")
    options = parser.parse_args(argv)
    if options.summary:
        print(summary(options.summary))
        return 0
    if len(options.args) != 3:
        parser.error("give CONFIG SECONDS OUT, or --summary PSTATS")
    config_path, seconds, out = options.args
    run(config_path, float(seconds), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
