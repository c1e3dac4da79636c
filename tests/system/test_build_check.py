"""The compiled build's type check does not depend on which optional packages are installed.

mypyc type-checks the package when `pip install .` compiles it, with the project's mypy
configuration, and mypy looks for imported packages in the building interpreter's
site-packages (even in pip's isolated build environment). The README's `pip install .` in a
fresh venv has none of the extras there; a rebuild, the benchmarks' builds and
tests/system/test_compiled.py's build have all of them. A module that type-checked only
against an installed extra (e599643's server/evloop.py returned `uvloop.new_event_loop`: Any
without uvloop, `no-any-return`) compiled in every build we tested and silently installed
pure Python for the README's user. The configuration (pyproject.toml) therefore makes mypy
skip every such package (`follow_imports = "skip"`: Any, installed or not).

This checks that, with the configuration the build uses (mypy finds it from the project
directory, as mypyc does), mypy does not read any of them although this venv has them: it
types each of them as Any (`reveal_type` of the module), as where it is not installed.
The packages are the optional extras' distributions (pyproject.toml) and every package outside
the standard library that edge_broker imports. A few seconds; no wheel is built.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "edge_broker"
# Extras of tools only, never imported by edge_broker (the `test` extra is the suite's).
TOOL_EXTRAS = {"test"}
TIMEOUT_S = 120


def _distribution_name(requirement: str) -> str:
    name = re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_distributions() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    return sorted({_distribution_name(req)
                   for extra, reqs in project["optional-dependencies"].items()
                   if extra not in TOOL_EXTRAS for req in reqs})


def imported_third_party() -> set[str]:
    """Every module edge_broker imports that is neither its own nor the standard library's."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found.update(name for name in names
                         if name.split(".")[0] not in sys.stdlib_module_names
                         and name.split(".")[0] != "edge_broker")
    return found


def modules_to_probe() -> tuple[list[str], list[str]]:
    """(modules to probe, extras' distributions not installed here)."""
    by_distribution: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            by_distribution.setdefault(_distribution_name(distribution), set()).add(module)
    missing = [d for d in extra_distributions() if d not in by_distribution]
    modules = imported_third_party()
    for distribution in extra_distributions():
        modules.update(m for m in by_distribution.get(distribution, ())
                       if m.isidentifier() and not m.startswith("_"))
    return sorted(modules), missing


def test_the_build_type_check_cannot_see_the_optional_packages(tmp_path: Path) -> None:
    modules, missing = modules_to_probe()
    if missing:
        # Then this venv cannot show whether the check would read them.
        pytest.skip(f"extras not installed here: {', '.join(missing)} "
                    "(pip install -e '.[test]' installs them all)")
    assert {"uvloop", "websockets", "nats", "aiokafka"} <= {m.split(".")[0] for m in modules}
    probe = tmp_path / "probe_extras.py"
    # Line 2i+1 imports modules[i], line 2i+2 reveals its type.
    probe.write_text("".join(f"import {module} as _m{i}\nreveal_type(_m{i})\n"
                             for i, module in enumerate(modules)), encoding="utf-8")
    # No --config-file: mypy finds the project's configuration from the project directory,
    # as mypyc does in setup.py.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", str(probe)],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    revealed = {int(line_no) // 2 - 1: kind for line_no, kind in re.findall(
        rf'{re.escape(probe.name)}:(\d+): note: Revealed type is "([^"]*)"', output)}
    assert sorted(revealed) == list(range(len(modules))), output
    seen = [module for i, module in enumerate(modules) if revealed[i] != "Any"]
    assert not seen, (
        f"the build's type check reads {', '.join(seen)}, which some installs have and others "
        "not (mypyc then passes or fails depending on the environment): add them to the "
        'follow_imports = "skip" override in pyproject.toml\n' + output)
    assert "error" not in output, output
