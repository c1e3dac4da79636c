"""How this copy of edge-broker was built: which modules run compiled (mypyc) and why.

    python -m edge_broker.buildinfo

A wheel built by `pip install .` carries `edge_broker/BUILD`, the build's own account
("compiled with mypyc", or "pure Python: <why>"); a source checkout or an editable install has
none. See docs/compiled.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import resources

import edge_broker
from edge_broker import compile_plan

COMPILED_PACKAGES = tuple(compile_plan.module_name(p) for p in compile_plan.COMPILED_PACKAGES)
# Modules that stay Python in every build: {module name: why}.
NOT_COMPILED = {compile_plan.module_name(path): why
                for path, why in compile_plan.NOT_COMPILED.items()}
_EXTENSION_SUFFIXES = (".so", ".pyd")


def modules() -> dict[str, bool]:
    """{module name: loaded from a compiled extension module} for every module the compiled
    build compiles (those of COMPILED_PACKAGES, subpackages included, but NOT_COMPILED)."""
    found: dict[str, bool] = {}
    for package_name in COMPILED_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            if info.ispkg or info.name in NOT_COMPILED:
                continue
            module = importlib.import_module(info.name)
            found[info.name] = (module.__file__ or "").endswith(_EXTENSION_SUFFIXES)
    return found


def build_status() -> str:
    """The status the build wrote into the wheel, or where this copy runs from."""
    try:
        return resources.files(edge_broker).joinpath("BUILD").read_text("utf-8").strip()
    except (FileNotFoundError, OSError):
        return "no build record (a source checkout or an editable install: pure Python)"


def summary() -> str:
    found = modules()
    compiled = sum(found.values())
    return (f"edge-broker from {edge_broker.__path__[0]}\n"
            f"build: {build_status()}\n"
            f"compiled modules: {compiled} of {len(found)}"
            + "".join(f"\n  {name}: {'compiled' if c else 'Python'}"
                      for name, c in sorted(found.items()))
            + f"\nPython in every build: {len(NOT_COMPILED)}"
            + "".join(f"\n  {name}: {why}" for name, why in sorted(NOT_COMPILED.items())))


if __name__ == "__main__":
    print(summary())
