"""Code shapes the compiled build runs wrong, kept out of the modules it compiles.

mypyc (2.4.1, the build's) keeps the exception being handled in the thread's `exc_info`, not
per coroutine as CPython does. A compiled `except` handler or `finally` that suspends is
resumed in another context than the one it started in, and then:

- the end of a `finally:` that contains an `await` raises the thread's handled exception of
  that moment: another one (the forwarder raised an old `Resend` instead of the
  `CancelledError` that stopped it, so the broker did not stop), none (the exception is
  swallowed), or, after a `try` that ended normally, the exception a caller is handling
  (even if nothing suspended);
- a bare `raise` (or `log.exception`) after an `await` in a handler uses that same stale one;
- a handler that awaited puts back, when it ends, what it had saved, into the context that
  resumed it: exceptions raised there later carry a stale `__context__` ("During handling of
  the above exception..." naming an old error in a log) and keep it alive.

So in a compiled module no `except` handler and no `finally` suspends (`await`, `async for`,
`async with`, an async comprehension, `yield`): keep the exception in a variable and handle
it after the `try` (`bridge/forward.py` `_outcome`). An `async with` is allowed only where its
`__aexit__` never suspends (its exception path awaits it, then re-raises the handled
exception): listed below, each with why. docs/compiled.md has the 20-line reproduction.
"""

from __future__ import annotations

import ast
from pathlib import Path

from edge_broker import buildinfo

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


def _walk(node: ast.AST) -> list[ast.AST]:
    """`node` and what it contains, but of a function defined in it only what runs where
    it is defined (decorators, defaults): its body runs later."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        decorators = [] if isinstance(node, ast.Lambda) else node.decorator_list
        now = [*decorators, *node.args.defaults,
               *(default for default in node.args.kw_defaults if default is not None)]
        return [inner for part in now for inner in _walk(part)]
    return [node, *(inner for child in ast.iter_child_nodes(node) for inner in _walk(child))]


def _first(nodes: list[ast.stmt]) -> ast.expr | ast.stmt | None:
    """The first node of `nodes` that suspends the coroutine running them."""
    found = [node for stmt in nodes for node in _walk(stmt)
             if isinstance(node, (ast.expr, ast.stmt)) and _suspends(node)]
    return min(found, key=lambda node: (node.lineno, node.col_offset), default=None)


def hazards(source: str, module: str) -> list[str]:
    """Each place in `source` that suspends in an `except` handler or a `finally`, and each
    `async with` not in ASYNC_WITH_ALLOWED."""
    found: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Try):
                blocks = [("an except", [*([ast.Expr(handler.type)] if handler.type else []),
                                         *handler.body]) for handler in child.handlers]
                for where, body in [*blocks, ("a finally", child.finalbody)]:
                    suspends = _first(body)
                    if suspends is not None:
                        found.append(f"{module}:{suspends.lineno} ({function}): suspends in "
                                     f"{where}")
            if (isinstance(child, ast.AsyncWith)
                    and (module, function) not in ASYNC_WITH_ALLOWED):
                found.append(f"{module}:{child.lineno} ({function}): async with")
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return found


def compiled_modules() -> list[str]:
    """The source files of the modules the compiled build compiles (compile_plan.py)."""
    return sorted(name.replace(".", "/") + ".py" for name in buildinfo.modules())


def test_no_compiled_module_suspends_while_handling_an_exception() -> None:
    modules = compiled_modules()
    assert "edge_broker/bridge/forward.py" in modules
    found = [hazard for module in modules
             for hazard in hazards((REPO / module).read_text(), module)]
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

async def c(x):
    async with x:
        pass

def d(x):
    try:
        yield x
    finally:
        yield None

async def e(x):
    try:
        await x
    finally:
        [y async for y in x]

async def f(x):
    try:
        await x
    except KeyError:
        pass
    except Exception:
        async for y in x:
            pass

async def g(x):
    try:
        await x
    except (await x.kinds()):
        pass
    finally:
        def later(y=await x):
            return y
'''

GOOD = '''
async def a(x, log):
    failed = None
    try:
        await x
    except Exception as exc:
        log.exception("failed")
        failed = exc
    finally:
        x.close()
    if failed:
        await x.close()
        raise failed

async def b(x):
    try:
        await x
    except Exception:
        async def later():
            await x
        return later
'''


def test_the_check_finds_each_shape_and_passes_the_safe_ones() -> None:
    found = hazards(BAD, "bad.py")
    assert [line.split(" ", 1)[0] for line in found] == [
        "bad.py:6", "bad.py:12", "bad.py:15", "bad.py:22", "bad.py:28", "bad.py:36",
        "bad.py:42", "bad.py:45"], found
    assert hazards(GOOD, "good.py") == []
