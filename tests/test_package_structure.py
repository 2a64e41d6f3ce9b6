"""The package's shape: no import cycles between attnedit modules, and no module too long to read.

Imports are read from the source (``ast``), every ``import`` statement counted, also those inside functions and
under ``TYPE_CHECKING``: a lazy import hides a cycle from Python but not from a reader.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "attnedit"
MAX_LINES = 400


def module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the attnedit modules it imports anywhere in its source}."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                for alias in node.names:  # `from . import zoo` names a module; `from .zoo import f` names a member
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_planted_cycle(tmp_path):
    package = tmp_path / "attnedit"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attnedit.a import x\n")
    (package / "d.py").write_text("from . import a\n")  # imports into the cycle, not part of it
    assert cycles(import_graph(package)) == [["attnedit.a", "attnedit.c", "attnedit.sub.b"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "attnedit.core.install" in graph and "attnedit.processors.edit_processor" in graph["attnedit.core.install"]
    assert cycles(graph) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_is_short_enough_to_read(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines; split it by what its parts do"


FOLDERS = {"core", "families", "methods", "models", "pipelines", "processors", "shapes", "surfaces"}


def test_the_folders_are_the_architecture():
    """Only the package's entry files sit at the top; every other module lives in the folder of its part."""
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "compat.py"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == FOLDERS
    for folder in FOLDERS:
        assert (PACKAGE / folder / "__init__.py").read_text().startswith('"""'), f"{folder}/ says what it holds"


def test_the_core_imports_no_method_or_surface():
    """Layering: core and processors know nothing of methods, pipelines, shapes or surfaces."""
    graph = import_graph()
    upper = ("attnedit.methods", "attnedit.pipelines", "attnedit.shapes", "attnedit.surfaces")
    for module, targets in graph.items():
        if module.startswith(("attnedit.core", "attnedit.processors")):
            assert not [t for t in targets if t.startswith(upper)], module


def test_old_flat_import_paths_name_the_same_modules():
    import importlib
    import subprocess
    import sys

    from attnedit.compat import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from attnedit.zoo import load_tiny_pipeline

    from attnedit.models.zoo import load_tiny_pipeline as moved

    assert load_tiny_pipeline is moved
    from attnedit.install import Installation  # the old module path, while attnedit.install is the function

    import attnedit

    assert callable(attnedit.install) and Installation is attnedit.Installation
    for command in (["-m", "attnedit.cli", "presets"], ["-m", "attnedit", "presets"]):  # old and new entry points
        result = subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "shapes-t2i" in result.stdout, result.stderr
