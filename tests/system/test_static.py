"""Static checks as part of the suite: mypy --strict on the whole package, ruff on the tree.

The executables come from the same environment as the interpreter running the tests (they
are in the `test` extra). mypy keeps its cache in .mypy_cache, so a second run takes seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT_S = 120


def run_tool(name: str, *args: str) -> None:
    executable = BIN / name
    if not executable.exists():
        pytest.skip(f"{executable} not found: pip install -e '.[test]'")
    result = subprocess.run([str(executable), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f"{name} {' '.join(args)} exited with {result.returncode}:\n"
        f"{result.stdout}{result.stderr}")


def test_mypy_strict_on_the_whole_package() -> None:
    # The compiled build (edge_broker/compile_plan.py) type-checks server/, store/ and bridge/
    # with mypyc: a type error there fails `pip install .` on a gateway, so it fails here first.
    run_tool("mypy", "--strict", "edge_broker")


def test_ruff_check() -> None:
    run_tool("ruff", "check", "--no-fix", ".")
