"""The dependency direction of DESIGN.md, checked on the source: server, cli > bridge > store >
auth > core > mqtt; config and errors are leaves. mqtt/ and core/ do no I/O and read no clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "edge_broker"
# The bridge CLI: replay --bridge reads the remote side (bridge level), bridges status asks the
# running server; cli_streams hands --bridge over to it.
RANK = {"mqtt": 0, "core": 1, "auth": 2, "store": 3, "bridge": 4, "server": 5, "cli": 6,
        "cli_admin": 6, "cli_security": 6, "cli_status": 6, "cli_streams": 6, "cli_bridges": 5.5,
        "cli_bridges_replay": 4.5, "certs": 3,
        "__main__": 7}
# dist: the installed version; logfilter: the handler's filter of library log lines (both
# stdlib only)
LEAVES = {"config", "errors", "dist", "logfilter", "__init__"}
# The config package's files that may name edge_broker.bridge.config: loader.py imports it
# inside load_config (and under TYPE_CHECKING), model.py under TYPE_CHECKING for Config.bridges.
CONFIG_IMPORTS_BRIDGE_CONFIG = {"config/loader.py", "config/model.py"}
NO_IO = {"asyncio", "socket", "ssl", "sqlite3", "aiosqlite", "time", "threading", "selectors",
         "subprocess"}


def _part(module: Path) -> str:
    return module.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(module: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of everything a module imports, relative imports resolved."""
    tree = ast.parse(module.read_text(), str(module))
    package = module.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
                if not node.module:
                    found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
                    continue
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: str(m.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(module: Path) -> None:
    part = _part(module)
    for name, line in _imports(module):
        top = name.split(".")
        if top[0] != "edge_broker" or len(top) < 2:
            continue
        target = top[1]
        where = f"{module.relative_to(PACKAGE.parent)}:{line} imports {name}"
        if target == part or target in {"errors", "dist", "logfilter", "__init__"}:
            continue
        if target == "config":
            assert part not in {"mqtt", "core"}, where
            continue
        if (module.relative_to(PACKAGE).as_posix() in CONFIG_IMPORTS_BRIDGE_CONFIG
                and name == "edge_broker.bridge.config"):
            # The one exception to "config is a leaf": load_config parses [[bridges]] with
            # the bridges' own schema (imported inside load_config, when the table is there).
            continue
        assert part not in LEAVES, f"{where}: config and errors must stay leaves"
        assert RANK[target] < RANK[part], f"{where}: against the dependency direction"


@pytest.mark.parametrize("module", [m for m in MODULES if _part(m) in {"mqtt", "core"}],
                         ids=lambda m: str(m.relative_to(PACKAGE)))
def test_protocol_and_core_do_no_io(module: Path) -> None:
    for name, line in _imports(module):
        assert name.split(".")[0] not in NO_IO, f"{module.name}:{line} imports {name}"


def test_only_the_sqlite_store_imports_sqlite() -> None:
    for module in MODULES:
        for name, line in _imports(module):
            if name.split(".")[0] in {"sqlite3", "aiosqlite"}:
                # store/log/ is the append-only log, run by the sqlite store's writer thread.
                where = module.relative_to(PACKAGE).as_posix()
                assert where.startswith(("store/sqlite/", "store/log/")), (
                    f"{module}:{line} imports {name}")


def test_the_checker_sees_relative_imports() -> None:
    client = PACKAGE / "server" / "client.py"
    assert any(name.startswith("edge_broker.mqtt") for name, _ in _imports(client))


def _server_imports(name: str) -> set[str]:
    """The server modules `name` imports, TYPE_CHECKING imports included."""
    found = set()
    for imported, _ in _imports(PACKAGE / "server" / f"{name}.py"):
        parts = imported.split(".")
        if parts[:2] == ["edge_broker", "server"] and len(parts) > 2:
            found.add(parts[2])
    return found - {name}


@pytest.mark.parametrize("start", ["admin", "client"])
def test_handlers_see_the_app_only_through_its_interface(start: str) -> None:
    """server/app.py builds the connection handlers and the admin server, which call back into
    it through the protocols of server/interface.py: nothing they import leads back to app.py,
    not even imports for type checking, so there is no import cycle through the app."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        name = todo.pop()
        for imported in sorted(_server_imports(name)):
            if imported not in paths:
                paths[imported] = [*paths[name], imported]
                todo.append(imported)
    assert "app" not in paths, "server/" + " -> ".join(f"{m}.py" for m in paths.get("app", []))
