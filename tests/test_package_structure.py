"""The package's shape: no import cycles between attnedit modules, and no module too long to read.

Imports are read from the source (``ast``), every ``import`` statement counted, also those inside functions and
under ``TYPE_CHECKING``: a lazy import hides a cycle from Python but not from a reader.
"""

from __future__ import annotations

import ast
import itertools
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


# -- no module outside attnedit/families branches on a family's name (issue 27) ---------------------------------
def _family_names() -> frozenset[str]:
    from attnedit.families import FAMILIES

    return frozenset(n for f in FAMILIES.values() for n in (f.name, *f.aliases))


def _about_family(node: ast.AST) -> bool:
    """An expression naming a family: a name or attribute containing "famil" (``family``, ``handle.family.name``,
    ``FAMILIES``)."""
    return any(("famil" in n.id.lower() if isinstance(n, ast.Name) else "famil" in n.attr.lower())
               for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute)))


def _names_in(node: ast.AST, names: frozenset[str]) -> set[str]:
    """Family names among a string constant or a tuple / list / set of them."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}


def _family_table(node: ast.AST, names: frozenset[str]) -> bool:
    """A dict literal keyed by family names only (two or more)."""
    keys = [k.value for k in node.keys if isinstance(k, ast.Constant)] if isinstance(node, ast.Dict) else []
    return len(keys) >= 2 and len(keys) == len(node.keys) and set(keys) <= names


def _family_lists(tree: ast.AST, names: frozenset[str]) -> set[str]:
    """Names bound to a tuple / list / set of two or more family names (``SUPPORTED = ("sd3", "flux")``)."""
    return {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
            and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)) and len(node.value.elts) >= 2
            and len(_names_in(node.value, names)) == len(node.value.elts) for t in node.targets if isinstance(t, ast.Name)}


def family_name_branches(source: str, names: frozenset[str], lists: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, why) for each place ``source`` compares a family's name or looks a family's name up in a table;
    ``lists``: names bound to tuples of family names elsewhere (imported ones)."""
    tree = ast.parse(source)
    lists = lists | _family_lists(tree, names)
    lists |= {a.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)  # `import SUPPORTED as X`
              for a in node.names if a.asname and a.name in lists}
    tables = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
              and _family_table(node.value, names)
              for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for a, b in itertools.pairwise(sides):
                for this, other in ((a, b), (b, a)):
                    named = _names_in(other, names)
                    if named and (_about_family(this) or (isinstance(this, ast.Attribute) and this.attr == "name")):
                        found.append((node.lineno, f"compares a family to {sorted(named)}"))
            for op, right in zip(node.ops, node.comparators):
                bound = right.id if isinstance(right, ast.Name) else right.attr if isinstance(right, ast.Attribute) else ""
                if isinstance(op, (ast.In, ast.NotIn)) and bound in lists and _about_family(node.left):
                    found.append((node.lineno, f"looks a family up in {bound}, a tuple of family names"))
        elif isinstance(node, ast.Subscript) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                                  and node.func.attr == "get" and node.args):
            table, key = (node.value, node.slice) if isinstance(node, ast.Subscript) else (node.func.value, node.args[0])
            if _family_table(table, names) or (isinstance(table, ast.Name) and table.id in tables):
                if _about_family(key):
                    found.append((node.lineno, "looks a family up in a table keyed by family names"))
            elif _names_in(key, names) and _about_family(table):  # FAMILIES["flux"]
                found.append((node.lineno, f"takes family {sorted(_names_in(key, names))} by name"))
    return sorted(set(found))


def test_the_family_name_checker_finds_planted_branches():
    names = frozenset({"unet", "flux", "wan", "hunyuan_video", "sd15"})
    planted = """
if family == "flux": pass
if handle.family.name in ("wan", "hunyuan_video"): pass
if self.model.family != "hunyuan_video": pass
if f.name == "unet": pass
x = {"unet": 1, "flux": 2}[family]
TABLE = {"unet": (7.5, 0.0), "flux": (1.0, 1.0)}
y = TABLE[self.family]
z = TABLE.get(family.name)
w = FAMILIES["flux"].model_class
SUPPORTED = ("unet", "flux")
if family not in SUPPORTED: pass
if family in IMPORTED_FAMILIES: pass
"""
    found = family_name_branches(planted, names, frozenset({"IMPORTED_FAMILIES"}))
    assert [line for line, _ in found] == [2, 3, 4, 5, 6, 8, 9, 10, 12, 13]
    unrelated = """
unet = getattr(pipe, "unet", None)
parts = {"vae": vae, "unet": unet}
if part == "unet": pass
presets = {"wan": 1, "wan22": 2}[name]
if model[5:] in ("wan", "wan22"): pass
"""
    assert family_name_branches(unrelated, names) == []


def test_no_module_outside_families_branches_on_a_family_name():
    """Family knowledge lives in the family's declaration (attnedit/families/); the rest asks it, never its name."""
    names = _family_names()
    paths = [p for p in sorted(PACKAGE.rglob("*.py")) if not module_name(p).startswith("attnedit.families")]
    lists = frozenset().union(*(_family_lists(ast.parse(p.read_text()), names) for p in paths))
    found = [f"{module_name(p)}:{line}: {why}" for p in paths for line, why in family_name_branches(p.read_text(), names, lists)]
    assert found == [], "\n".join(found)
