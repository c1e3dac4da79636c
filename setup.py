"""setuptools glue for the optional mypyc build (build_support/edge_broker_build.py decides).

Everything else about the package is in pyproject.toml. This file only adds, when a wheel is
built and compiling is possible and wanted, the mypyc extension modules for the modules of
`edge_broker/{mqtt,core,server,store,bridge}/` that edge_broker/compile_plan.py lists (all but
a few, each with the reason it stays Python), and falls back to the pure-Python package
(with a message saying why) when compiling is not possible, unless EDGE_BROKER_COMPILE=1.
See docs/compiled.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import (
    CCompilerError,
    CompileError,
    ExecError,
    LinkError,
    PlatformError,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "build_support"))
import edge_broker_build as eb  # noqa: E402


def _load_plan():  # type: ignore[no-untyped-def]
    """edge_broker/compile_plan.py, loaded by path (importing the package is not needed)."""
    spec = importlib.util.spec_from_file_location(
        "edge_broker_compile_plan", HERE / "edge_broker" / "compile_plan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PLAN = _load_plan()
# Every module of these packages (recursively) is compiled, except NOT_COMPILED's, which
# stay Python for the reason given there (and the package __init__s).
COMPILED_PACKAGES: tuple[str, ...] = _PLAN.COMPILED_PACKAGES
NOT_COMPILED: dict[str, str] = _PLAN.NOT_COMPILED
# Written into the wheel: how it was built (edge_broker/buildinfo.py reads it).
BUILD_FILE = "edge_broker/BUILD"
# Commands that build the package's files; others (egg_info, sdist, ...) never compile.
_BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def compiled_sources() -> list[str]:
    """The modules mypyc compiles, relative to this directory (package __init__s stay .py)."""
    return [path for package in COMPILED_PACKAGES
            for path in (p.relative_to(HERE).as_posix()
                         for p in sorted((HERE / package).rglob("*.py")))
            if not path.endswith("/__init__.py") and path not in NOT_COMPILED]


def fail_or_fall_back(wanted: str, why: str) -> str:
    if wanted == "on":
        raise SystemExit(f"edge-broker build: {eb.ENV}=1 but cannot compile: {why}")
    eb.say(f"NOT compiled, installing the pure-Python package: {why}")
    return f"pure Python: {why}"


def plan() -> tuple[list[Any], str]:
    """(extension modules, build status) for this invocation of setup.py."""
    if os.environ.get(eb._EDITABLE_ENV):
        return [], "pure Python (editable install)"
    if not _BUILDING.intersection(sys.argv[1:]):
        return [], "pure Python"
    wanted = eb.mode()
    if wanted == "off":
        eb.say(f"pure-Python package ({eb.ENV}=0)")
        return [], f"pure Python ({eb.ENV}=0)"
    problem = eb.toolchain_problem()
    if problem is not None:
        return [], fail_or_fall_back(wanted, problem)
    try:
        from mypyc.build import mypycify
    except ImportError:
        return [], fail_or_fall_back(wanted, "mypyc is not installed (pip install mypy)")
    sources = compiled_sources()
    eb.say(f"compiling {len(sources)} modules of {', '.join(COMPILED_PACKAGES)} with mypyc "
           f"({len(NOT_COMPILED)} stay Python; {eb.ENV}=0 for the pure-Python package)")
    try:
        extensions = mypycify(sources, opt_level="3", debug_level="0")
    except (Exception, SystemExit) as exc:  # mypyc reports type errors with SystemExit
        if wanted == "on":
            raise
        return [], fail_or_fall_back(wanted, f"mypyc failed: {exc}")
    return list(extensions), "compiled with mypyc"


EXTENSIONS, STATUS = plan()


def write_status(build_lib: str, status: str) -> None:
    target = Path(build_lib, BUILD_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(status + "\n", encoding="utf-8")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            write_status(self.build_lib, STATUS)


class BuildExt(build_ext):
    """build_ext that falls back to the pure-Python package when the C compiler fails."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, CompileError, LinkError, ExecError, PlatformError,
                OSError) as exc:
            if eb.mode() == "on":
                raise
            for output in self.get_outputs():  # no half-compiled package
                Path(output).unlink(missing_ok=True)
            write_status(self.build_lib, fail_or_fall_back(
                "auto", f"the C compiler failed ({exc}); install: {eb.APT_HINT}"))


setup(ext_modules=EXTENSIONS, cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
