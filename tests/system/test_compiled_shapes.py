"""Code shapes the compiled build runs wrong, kept out of the modules it compiles.

mypyc (2.4.1, the build's) keeps the exception being handled in the thread's `exc_info`, not
per coroutine as CPython does; a compiled handler that awaited puts back, when it ends, what
it saved, into whichever context resumed it. So "the exception being handled" is whatever
the code around left there: a stale exception, or none. Compiled code must not rely on it:

- no `await` (nor `async for`, `async with`, an async comprehension, `yield`) in a
  `finally:` - the end of such a `finally` raises the thread's handled exception of that
  moment: another one (the forwarder raised an old `Resend` instead of the `CancelledError`
  that stopped it, so the broker did not stop), none (the exception is swallowed), or, after
  a `try` that ended normally, the exception a caller is handling (even if nothing
  suspended);
- an `async with` only where `__aexit__` never suspends (its exception path awaits it, then
  re-raises the handled exception): listed below, each with why.

And no module, compiled or not, re-raises or reads the handled exception after an `await` in
an `except` handler (bare `raise`, `log.exception(...)`, `exc_info=True`, `sys.exc_info()`):
in Python code that awaits compiled code it is as stale (`raise exc`, with the name, is
right; its `__context__` may still name a stale exception).

docs/compiled.md has the 20-line reproduction.
"""

from __future__ import annotations

import ast
from pathlib import Path

from edge_broker import compile_plan

REPO = Path(__file__).resolve().parents[2]

# (module, function) -> why its `async with` is right compiled.
ASYNC_WITH_ALLOWED = {
    ("edge_broker/bridge/kafka_records.py", "_pump"):
        "self._lock is an asyncio.Lock: __aexit__ releases it without suspending",
    ("edge_broker/bridge/kafka_records.py", "hand_over_all"):
        "self._lock is an asyncio.Lock: __aexit__ releases it without suspending",
}

_SUSPENDS = (ast.Await, ast.AsyncFor, ast.AsyncWith, ast.Yield, ast.YieldFrom)


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _suspends(node: ast.AST) -> bool:
    if isinstance(node, _SUSPENDS):
        return True
    return (isinstance(node, _COMPREHENSIONS)
            and any(generator.is_async for generator in node.generators))


def _first(nodes: list[ast.stmt]) -> ast.expr | ast.stmt | None:
    """The first node of `nodes` (walked) that suspends the coroutine."""
    found = [node for stmt in nodes for node in ast.walk(stmt)
             if isinstance(node, (ast.expr, ast.stmt)) and _suspends(node)]
    return min(found, key=lambda node: (node.lineno, node.col_offset), default=None)


def _reads_handled_exception(node: ast.Raise | ast.Call) -> bool:
    """A bare `raise`, `exc_info=True`, `<logger>.exception(...)` or `sys.exc_info()`."""
    if isinstance(node, ast.Raise):
        return node.exc is None
    if any(keyword.arg == "exc_info" and isinstance(keyword.value, ast.Constant)
           and keyword.value.value is True for keyword in node.keywords):
        return True
    func = node.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
        return False
    return ((func.attr == "exception" and "log" in func.value.id.lower())
            or (func.attr == "exc_info" and func.value.id == "sys"))


def hazards(source: str, module: str, *, compiled: bool = True) -> list[str]:
    """Each place in `source` that would use a stale handled exception (`compiled`: also
    those that only compiled code gets wrong)."""
    found: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Try):
                suspends = _first(child.finalbody)
                if compiled and suspends is not None:
                    found.append(f"{module}:{suspends.lineno} ({function}): suspends in a "
                                 "finally")
                for handler in child.handlers:
                    suspends = _first(handler.body)
                    if suspends is None:
                        continue
                    for stmt in handler.body:
                        for inner in ast.walk(stmt):
                            if (isinstance(inner, (ast.Raise, ast.Call))
                                    and _reads_handled_exception(inner)
                                    and inner.lineno > suspends.lineno):
                                found.append(
                                    f"{module}:{inner.lineno} ({function}): reads the handled "
                                    f"exception after the await on line {suspends.lineno}")
            if (compiled and isinstance(child, ast.AsyncWith)
                    and (module, function) not in ASYNC_WITH_ALLOWED):
                found.append(f"{module}:{child.lineno} ({function}): async with")
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return found


def compiled_modules() -> list[str]:
    return [path for package in compile_plan.COMPILED_PACKAGES
            for path in (p.relative_to(REPO).as_posix()
                         for p in sorted((REPO / package).rglob("*.py")))
            if not path.endswith("/__init__.py") and path not in compile_plan.NOT_COMPILED]


def test_no_module_uses_the_handled_exception_after_an_await() -> None:
    compiled = compiled_modules()
    assert "edge_broker/bridge/forward.py" in compiled
    modules = [p.relative_to(REPO).as_posix()
               for p in sorted((REPO / "edge_broker").rglob("*.py"))]
    found = [hazard for module in modules
             for hazard in hazards((REPO / module).read_text(), module,
                                   compiled=module in compiled)]
    assert not found, "\n".join(found)


BAD = '''
async def a(x):
    try:
        await x
    finally:
        await x.close()

async def b(x):
    try:
        await x
    except Exception:
        await x.close()
        raise

async def c(x, log):
    try:
        pass
    except Exception:
        await x.close()
        log.warning("failed", exc_info=True)

async def d(x):
    async with x:
        pass

def e(x):
    try:
        yield x
    finally:
        yield None

async def f(x):
    try:
        await x
    finally:
        [y async for y in x]

async def g(x):
    try:
        await x
    except Exception:
        await x.close()
        print(sys.exc_info())
'''

GOOD = '''
async def a(x):
    try:
        await x
    except BaseException as exc:
        await x.close()
        raise exc

async def b(x, log):
    try:
        await x
    except Exception:
        log.exception("failed")
        raise
    finally:
        x.close()

async def c(x, log):
    try:
        await x
    except Exception as exc:
        await x.close()
        log.warning("failed", exc_info=exc)
        x.exception()
        raise exc
'''


def test_the_check_finds_each_shape_and_passes_the_safe_ones() -> None:
    found = hazards(BAD, "bad.py")
    assert [line.split(" ", 1)[0] for line in found] == [
        "bad.py:6", "bad.py:13", "bad.py:20", "bad.py:23", "bad.py:30", "bad.py:36",
        "bad.py:43"], found
    assert hazards(GOOD, "good.py") == []
    # Python's own `finally` keeps its exception; its handlers read the thread's.
    assert [line.split(" ", 1)[0] for line in hazards(BAD, "bad.py", compiled=False)] == [
        "bad.py:13", "bad.py:20", "bad.py:43"]
