"""The map in docs/architecture.md holds: layers one way, no import cycle, small modules, a public API."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import switchrl

PACKAGE = Path(switchrl.__file__).parent
MAX_LINES = 400


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_layers_contract_is_kept():
    """pyproject.toml's import-linter contract, as ``lint-imports`` checks it."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_no_import_cycle():
    assert _cycles(grimp.build_graph("switchrl")) == []


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_the_public_api_resolves_and_hides_internals():
    assert sorted(switchrl.__all__) == sorted(["__version__", *switchrl._EXPORTS])
    for name in switchrl.__all__:
        assert getattr(switchrl, name) is not None, name
    with pytest.raises(AttributeError):
        switchrl.not_a_name  # noqa: B018
    internals = {"DEFAULT_CHARSET", "RECORD_ID_KEY", "item_id"}
    for package in ("backends", "envs", "executors", "policies", "rewards", "tasks", "testbed", "trainers"):
        exported = set(getattr(importlib.import_module(f"switchrl.{package}"), "__all__", []))
        assert not exported & internals, (package, exported & internals)
