"""Mutation testing of the verdict engine: change one thing at a time in stoker/detect/ and see a test fail.

A small AST mutator of our own (mutmut 3 mutates only inside functions, so a changed row of
detect/policy.py, where the engine's numbers live, would never be tried; cosmic-ray's
default operators give tens of thousands of mutants, more than a 2-core machine runs in
an afternoon). Each mutant is one of:

- a number: an int n becomes n + 1, a float x becomes 1.5 x (0.0 becomes 1.0);
- a comparison: < and <=, > and >=, == and !=, `in` and `not in`, `is` and `is not` swapped;
- a boolean: `and` and `or` swapped, a `not` dropped, True and False swapped;
- arithmetic: + and -, * and / swapped; `min` and `max` swapped.

Docstrings, annotations, f-strings and log calls are left alone. The tests run in a forked
child of a process that has imported them once; the child patches the mutated module in
place (functions and methods get the mutant's code, module-level values are rebound in every
module that imported them) and runs the tests, collected once by pytest in the parent, stopping at
the first failure.
A mutant is killed when a test fails or the run exceeds `--timeout` (an endless loop).

    python -m bench.mutation [--files stoker/detect/causes.py ...] [--tests tests/test_detect.py]
                             [--timeout 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import os
import signal
import sys
import time
import types
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from bench.common import emit

ROOT = Path(__file__).resolve().parent.parent
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
SWAP_CALLS = {"min": "max", "max": "min"}


def _skipped(tree: ast.Module) -> set[int]:
    """Nodes no mutant touches: docstrings, annotations, f-strings, log calls, TYPE_CHECKING blocks."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            mark(body[0])
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            mark(node)  # attribute docstrings
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                mark(a.annotation)
        if isinstance(node, ast.JoinedStr):
            mark(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "log":
            mark(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            mark(node)
    return skip


def mutants(source: str) -> list[tuple[int, str, str]]:
    """(line, description, mutated source) for every mutant of `source`."""
    tree = ast.parse(source)
    skip = _skipped(tree)
    sites = [n for n in ast.walk(tree) if id(n) not in skip]
    out = []
    for index, node in enumerate(sites):
        for change in _changes(node):
            mutated = copy.deepcopy(tree)
            target = [n for n in ast.walk(mutated) if id(n) not in _skipped_ids(mutated)][index]
            description = change(target)
            out.append((node.lineno, description, ast.unparse(mutated)))
    return out


_SKIP_CACHE: dict[int, set[int]] = {}


def _skipped_ids(tree: ast.Module) -> set[int]:
    key = id(tree)
    if key not in _SKIP_CACHE:
        _SKIP_CACHE.clear()
        _SKIP_CACHE[key] = _skipped(tree)
    return _SKIP_CACHE[key]


def _changes(node: ast.AST) -> list:
    """The mutations possible at `node`, each a function that applies itself and says what it did."""
    out = []
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        def number(n, v=node.value):
            n.value = v + 1 if isinstance(v, int) else (v * 1.5 if v else 1.0)
            return f"{v!r} -> {n.value!r}"
        out.append(number)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        def flip(n, v=node.value):
            n.value = not v
            return f"{v} -> {not v}"
        out.append(flip)
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE:
                def compare(n, i=i, op=type(op)):
                    n.ops[i] = COMPARE[op]()
                    return f"{op.__name__} -> {COMPARE[op].__name__}"
                out.append(compare)
    elif isinstance(node, ast.BoolOp):
        def boolop(n):
            before = type(n.op).__name__
            n.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
            return f"{before} -> {type(n.op).__name__}"
        out.append(boolop)
    elif isinstance(node, ast.BinOp) and type(node.op) in ARITH:
        def arith(n):
            before = type(n.op)
            n.op = ARITH[before]()
            return f"{before.__name__} -> {type(n.op).__name__}"
        out.append(arith)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SWAP_CALLS:
        def call(n):
            before = n.func.id
            n.func.id = SWAP_CALLS[before]
            return f"{before} -> {n.func.id}"
        out.append(call)
    return out


def _not_mutants(source: str) -> list[tuple[int, str, str]]:
    """`not x` -> `x`, separately: it replaces the node rather than changing it."""
    tree = ast.parse(source)
    skip = _skipped(tree)
    out = []
    count = sum(1 for n in ast.walk(tree) if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not)
                and id(n) not in skip)
    for k in range(count):
        mutated = ast.parse(source)
        skip_m = _skipped(mutated)
        nots = [n for n in ast.walk(mutated) if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not)
                and id(n) not in skip_m]
        target = nots[k]
        line = target.lineno

        class Drop(ast.NodeTransformer):
            def visit_UnaryOp(self, n):
                self.generic_visit(n)
                return n.operand if n is target else n

        out.append((line, "not x -> x", ast.unparse(Drop().visit(mutated))))
    return out


# -- applying a mutant in a forked child ------------------------------------------------------

def _patch_function(old: types.FunctionType, new: types.FunctionType) -> None:
    old.__code__, old.__defaults__, old.__kwdefaults__ = new.__code__, new.__defaults__, new.__kwdefaults__


def _patch_class(old: type, new: type) -> None:
    dataclass = hasattr(new, "__dataclass_fields__")
    for name, value in vars(new).items():
        current = vars(old).get(name)
        if name == "__init__" and dataclass and isinstance(current, types.FunctionType):
            current.__defaults__, current.__kwdefaults__ = value.__defaults__, value.__kwdefaults__  # generated
        elif name.startswith("__") and name.endswith("__") and name != "__init__":
            continue  # the class's machinery (fields, slots, match args, docs)
        elif isinstance(value, types.FunctionType) and isinstance(current, types.FunctionType):
            _patch_function(current, value)
        elif isinstance(value, property) and isinstance(current, property):
            for part in ("fget", "fset"):
                if getattr(value, part) is not None and getattr(current, part) is not None:
                    _patch_function(getattr(current, part), getattr(value, part))
        elif isinstance(value, (staticmethod, classmethod)) and isinstance(current, type(value)):
            _patch_function(current.__func__, value.__func__)
        elif not isinstance(value, (types.FunctionType, property, staticmethod, classmethod, type,
                                    types.MemberDescriptorType, types.GetSetDescriptorType)):
            setattr(old, name, value)  # a class attribute: a dataclass field's default


def apply(module: types.ModuleType, source: str) -> None:
    """Make `module` behave as `source` says, keeping its functions' and classes' identity."""
    if not source:
        return
    ns: dict = {"__name__": module.__name__, "__file__": module.__file__, "__package__": module.__package__}
    exec(compile(source, module.__file__, "exec"), ns)
    for name, new in ns.items():
        if name.startswith("__"):
            continue
        old = getattr(module, name, None)
        if isinstance(old, types.FunctionType) and isinstance(new, types.FunctionType):
            _patch_function(old, new)
        elif isinstance(old, type) and isinstance(new, type) and old.__module__ == module.__name__:
            _patch_class(old, new)
        elif old is not None and not isinstance(old, (types.ModuleType, type, types.FunctionType)):
            for m in list(sys.modules.values()):
                if m is not None and getattr(m, name, None) is old:
                    setattr(m, name, new)


def run_one(module: types.ModuleType, source: str, items: list, timeout: float) -> str:
    """killed | survived | timeout, for one mutant: the collected tests run in a forked child, in order,
    until one fails."""
    from _pytest.runner import runtestprotocol

    pid = os.fork()
    if pid == 0:
        signal.alarm(int(timeout))
        failed = True
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                apply(module, source)
                failed = False
                for i, item in enumerate(items):
                    reports = runtestprotocol(item, log=False, nextitem=items[i + 1] if i + 1 < len(items) else None)
                    if any(r.failed for r in reports):
                        failed = True
                        break
        except BaseException:  # noqa: BLE001 - a mutant that breaks the module kills itself
            failed = True
        os._exit(1 if failed else 0)
    started = time.monotonic()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return "timeout"
    return "survived" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and \
        time.monotonic() - started < timeout else "killed"


class Mutate:
    """A pytest plugin: collect the tests once, then run them against each mutant instead of once."""

    def __init__(self, files: list[str], timeout: float, limit: int):
        self.files, self.timeout, self.limit = files, timeout, limit
        self.results: list[dict] = []

    def pytest_runtestloop(self, session) -> bool:
        import importlib

        items = list(session.items)
        if run_one(types.ModuleType("none"), "", items, self.timeout) != "survived":
            raise SystemExit("the tests fail without any mutant")
        for path in self.files:
            name = ".".join(Path(path).with_suffix("").parts)
            module = importlib.import_module(name)
            source = Path(path).read_text()
            if run_one(module, source, items, self.timeout) != "survived":  # the patching itself must be harmless
                raise SystemExit(f"{path}: the tests fail with the module patched by its own source")
            found = mutants(source) + _not_mutants(source)
            if self.limit:
                found = found[:self.limit]
            survivors, killed, timeouts = [], 0, 0
            for line, description, mutated in found:
                result = run_one(module, mutated, items, self.timeout)
                killed += result != "survived"
                timeouts += result == "timeout"
                if result == "survived":
                    survivors.append(f"{path}:{line}: {description}")
            self.results.append({"file": path, "mutants": len(found), "killed": killed, "timeouts": timeouts,
                                 "survivors": survivors})
            print(f"\n{path}: {killed}/{len(found)} killed", flush=True)
            for s in survivors:
                print(f"  survived {s}", flush=True)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", default=sorted(str(p.relative_to(ROOT))
                                                             for p in (ROOT / "stoker" / "detect").glob("*.py")))
    parser.add_argument("--tests", nargs="+", default=["tests/test_detect.py"])
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--limit", type=int, default=0, help="at most this many mutants per file (0: all)")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import pytest

    plugin = Mutate(args.files, args.timeout, args.limit)
    pytest.main(["-q", "-p", "no:cacheprovider", *args.tests], plugins=[plugin])
    total = sum(f["mutants"] for f in plugin.results)
    killed = sum(f["killed"] for f in plugin.results)
    emit("mutation", {"files": plugin.results, "mutants": total, "killed": killed,
                      "score": round(killed / total, 4) if total else None, "tests": args.tests}, args.out)


if __name__ == "__main__":
    main()
