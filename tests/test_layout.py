"""The package's shape: every module imports, imports point only downwards the pipeline, and there is no cycle.

Imports inside functions and under `TYPE_CHECKING` count too: a lazy import (kept lazy so that
`memtune --help` does not load torch) is still an arrow in the graph.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "memtune"

LAYERS: list[tuple[str, ...]] = [
    ("memtune.errors", "memtune.config"),
    ("memtune.sources", "memtune.options"),
    ("memtune.recipe",),
    ("memtune.measure",),
    ("memtune.predict",),
    ("memtune.search",),
    ("memtune.run.stepdown", "memtune.run.agreement", "memtune.run.resets", "memtune.run.guard", "memtune.run.launch",
     "memtune.run.data", "memtune.run.data_plan", "memtune.run.model"),
    ("memtune.plan",),
    ("memtune.fit",),
    ("memtune.run.runner", "memtune.run.trl_run"),
    ("memtune.report",),
    ("memtune.cli", "memtune.__main__", "memtune"),
]
"""Lowest first. A module may import from its own layer or below, never above: the pipeline
(source -> recipe -> measure -> predict -> search -> guard -> plan -> fit -> run -> report -> cli) read bottom-up."""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "data" in parts[1:-1]:
            continue  # memtune/data/ holds package data and a generator script, not library code
        names.append(".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts))
    return names


def path_of(module: str) -> Path:
    base = PACKAGE.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(module: str, known: set[str]) -> set[str]:
    """memtune modules that `module` imports anywhere in its body (resolved to the deepest known module)."""
    found = set()
    for node in ast.walk(ast.parse(path_of(module).read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from memtune.run import data` imports the module memtune.run.data;
            # `from memtune.config import GIB`, memtune.config
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                       for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("memtune") and target != module:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def graph() -> dict[str, set[str]]:
    names = module_names()
    known = set(names)
    return {name: imports_of(name, known) - {"memtune"} for name in names}


@pytest.mark.parametrize("module", module_names())
def test_every_module_imports_and_says_what_it_is_for(module):
    if module == "memtune.__main__":
        return  # running it is the CLI test below
    imported = importlib.import_module(module)
    if not module.endswith("__init__") and path_of(module).name != "__init__.py":
        assert (imported.__doc__ or "").strip(), f"{module} has no opening docstring saying what the room is for"


def test_imports_point_only_downwards():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_python_dash_m_memtune_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "memtune", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("fit", "plan", "run", "probe", "models"):
        assert command in done.stdout
