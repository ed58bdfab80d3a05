"""The suite's own rules, checked on the source of every test module (issue 11):

- every test (`test*` function or `Test*` method) asserts something: an `assert`, `pytest.raises`/`warns`/`fail`, or a
  call of a helper of the suite that asserts (a function or method defined under tests/ whose
  body does one of these, or raises AssertionError, or calls such a helper);
- nothing under tests/ sleeps a fixed time to synchronise: it waits on the condition itself
  with tests/waiting.py's `wait_until`, the one place allowed to sleep (between polls).

Helpers are matched by name, so a test calling any function or method of that name counts."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
WAITING = TESTS / "waiting.py"
PYTEST_CHECKS = {"raises", "warns", "fail"}
SLEEPS = {("time", "sleep"), ("asyncio", "sleep")}


def called_name(call: ast.Call) -> str | None:
    """`f` for `f(...)`, `obj.f(...)` and `a.b.f(...)`."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def checks_directly(node: ast.AST) -> bool:
    """An assert, a pytest check, or a raise of AssertionError anywhere inside `node`."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.Assert):
            return True
        if (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr in PYTEST_CHECKS
                and isinstance(inner.func.value, ast.Name) and inner.func.value.id == "pytest"):
            return True
        if isinstance(inner, ast.Raise) and inner.exc is not None:
            raised = inner.exc.func if isinstance(inner.exc, ast.Call) else inner.exc
            if isinstance(raised, ast.Name) and raised.id == "AssertionError":
                return True
    return False


def calls(node: ast.AST) -> set[str]:
    return {name for inner in ast.walk(node) if isinstance(inner, ast.Call) and (name := called_name(inner))}


def functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def asserting_helpers(trees: dict[str, ast.Module]) -> set[str]:
    """Names of the functions and methods of the suite that assert, directly or through another."""
    defined = [function for tree in trees.values() for function in functions(tree)
               if not function.name.startswith("test")]
    found = {function.name for function in defined if checks_directly(function)}
    grown = True
    while grown:
        more = {function.name for function in defined if function.name not in found and calls(function) & found}
        found |= more
        grown = bool(more)
    return found


def defined_tests(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """What pytest collects as tests: module-level `test*` functions and the `test*` methods of `Test*` classes."""
    bodies = [tree.body] + [node.body for node in tree.body if isinstance(node, ast.ClassDef)
                            and node.name.startswith("Test")]
    return [node for body in bodies for node in body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")]


def assertionless_tests(trees: dict[str, ast.Module]) -> list[str]:
    helpers = asserting_helpers(trees)
    return [
        f"{path}::{test.name} (line {test.lineno}) asserts nothing: it has no assert, no pytest.raises, "
        f"pytest.warns or pytest.fail, and calls no helper of the suite that asserts"
        for path, tree in sorted(trees.items()) if Path(path).name.startswith("test_")
        for test in defined_tests(tree) if not checks_directly(test) and not calls(test) & helpers
    ]


def fixed_sleeps(trees: dict[str, ast.Module]) -> list[str]:
    """Every call of time.sleep / asyncio.sleep (also imported by name, or through a module
    imported under another name) outside tests/waiting.py."""
    found = []
    for path, tree in sorted(trees.items()):
        if Path(path) == WAITING.relative_to(TESTS.parent):
            continue
        imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names if (node.module, alias.name) in SLEEPS}
        modules = {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
            func = call.func
            by_module = (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                         and (modules.get(func.value.id, func.value.id), func.attr) in SLEEPS)
            if by_module or (isinstance(func, ast.Name) and func.id in imported):
                found.append(f"{path}:{call.lineno} sleeps a fixed time: wait on the condition itself "
                             f"with tests.waiting.wait_until")
    return found


def parsed(sources: dict[str, str]) -> dict[str, ast.Module]:
    return {path: ast.parse(source, filename=path) for path, source in sources.items()}


def suite() -> dict[str, ast.Module]:
    return parsed({str(path.relative_to(TESTS.parent)): path.read_text() for path in sorted(TESTS.rglob("*.py"))})


def test_every_test_of_the_suite_asserts_something():
    trees = suite()
    assert len([test for tree in trees.values() for test in defined_tests(tree)]) > 200, "the suite was not found"
    offenders = assertionless_tests(trees)
    assert not offenders, "\n" + "\n".join(offenders)


def test_nothing_in_the_suite_sleeps_outside_the_waiting_helper():
    offenders = fixed_sleeps(suite())
    assert not offenders, "\n" + "\n".join(offenders)


# --- the rules themselves, on made-up modules ------------------------------------------------------------


HELPERS = '''
import time as clock
from time import sleep as nap

def check(value):
    assert value

def check_twice(value):
    check(value)
    check(value)

def expect_nothing():
    raise AssertionError("nothing expected")

def quiet(value):
    return value
'''

TESTS_MODULE = '''
import asyncio
import pytest
from helpers import check_twice

def test_asserts():
    assert 1

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_fails():
    pytest.fail("never")

def test_through_a_helper_of_a_helper(stack):
    stack.check_twice(1)

def test_through_a_raising_helper():
    expect_nothing()

def test_only_prints():
    print(quiet(1))

class TestGroup:
    def test_method_without_assert(self):
        quiet(2)

async def test_sleeps():
    await asyncio.sleep(1)
    assert True
'''


def test_the_rules_name_each_test_without_assertion_and_each_sleep():
    trees = parsed({"tests/helpers.py": HELPERS, "tests/unit/test_made_up.py": TESTS_MODULE})
    assert assertionless_tests(trees) == [
        "tests/unit/test_made_up.py::test_only_prints (line 22) asserts nothing: it has no assert, no "
        "pytest.raises, pytest.warns or pytest.fail, and calls no helper of the suite that asserts",
        "tests/unit/test_made_up.py::test_method_without_assert (line 26) asserts nothing: it has no assert, no "
        "pytest.raises, pytest.warns or pytest.fail, and calls no helper of the suite that asserts",
    ]
    trees["tests/helpers.py"] = ast.parse(HELPERS + "\ndef wait():\n    clock.sleep(1)\n    nap(2)\n")
    assert fixed_sleeps(trees) == [
        "tests/helpers.py:19 sleeps a fixed time: wait on the condition itself with tests.waiting.wait_until",
        "tests/helpers.py:20 sleeps a fixed time: wait on the condition itself with tests.waiting.wait_until",
        "tests/unit/test_made_up.py:30 sleeps a fixed time: wait on the condition itself with tests.waiting.wait_until",
    ]
    assert fixed_sleeps({"tests/waiting.py": ast.parse("import time as clock\nclock.sleep(1)\n")}) == []
