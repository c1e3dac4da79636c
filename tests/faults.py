"""Fault injection for the power-loss tests, installed only by tests.

    python -m tests.faults --kill-in-commit N -- [edge-broker arguments]

runs the broker (`edge_broker.cli.main`) with `SqliteStore.before_commit` set to kill the
process with SIGKILL inside its N-th group commit, after the transaction's statements ran and
before COMMIT: the transaction is torn as by a power cut at that instant. Production code
never reads an environment variable or a flag for this; the hook is all it has.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from edge_broker.store.sqlite import SqliteStore


def kill_in_commit(number: int) -> Callable[[int], None]:
    def hook(attempt: int) -> None:
        if attempt == number:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("--kill-in-commit", type=int, metavar="N", required=True)
    parser.add_argument("broker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    SqliteStore.before_commit = kill_in_commit(args.kill_in_commit)
    from edge_broker import cli

    broker_args = args.broker_args
    if broker_args[:1] == ["--"]:
        broker_args = broker_args[1:]
    return cli.main(broker_args)


if __name__ == "__main__":
    sys.exit(main())
