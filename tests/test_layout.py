"""The project's layout rules, checked on its source: layers only point down.

* no import cycle among the modules of ``extract/``, ``measure/`` and ``pipeline.py`` (imports inside
  functions included; a package ``__init__`` counts as a module, so a module importing its own
  package's ``__init__`` back closes a cycle);
* ``measure/functional/`` holds pure kernels: it imports nothing of the project but other kernels and
  the leaf helpers ``measure.errors`` and ``measure.validation``;
* ``extract`` never imports ``measure``; ``extract/hooks.py`` never imports zarr;
* no module is named like a standard-library module;
* ``pipeline.py`` only wires the subcommands of ``extract/cli.py`` and ``measure/cli.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "measure")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {"pipeline": ROOT / "pipeline.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Every module (project or not) that ``name`` names in an import statement, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


GRAPH = {name: {t for t in _imports(name) if t in MODULES and t != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_layout_is_found():
    assert {"pipeline", "extract", "measure", "measure.functional", "measure.registry"} <= set(MODULES)
    assert len(MODULES) > 30


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("measure.functional")))
def test_functional_kernels_import_only_kernels_and_leaf_helpers(name):
    allowed = ("measure.functional", "measure.errors", "measure.validation")
    above = sorted(t for t in GRAPH[name] if not t.startswith(allowed))
    assert above == [], f"{name} imports {above}"


def test_extract_never_imports_measure():
    offenders = {m: sorted(t for t in GRAPH[m] if t.split(".")[0] == "measure")
                 for m in MODULES if m.split(".")[0] == "extract"}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_hooks_never_import_zarr():
    assert not {t for t in _imports("extract.hooks") if t.split(".")[0] == "zarr"}


def test_no_module_is_named_like_the_standard_library():
    clashes = sorted(m for m in MODULES if m.rpartition(".")[2] in sys.stdlib_module_names)
    assert clashes == []


def test_pipeline_only_wires_the_commands():
    source = MODULES["pipeline"].read_text()
    assert len(source.splitlines()) <= 150
    project = {t.split(".")[0] for t in _imports("pipeline")} & set(PACKAGES)
    assert GRAPH["pipeline"] <= {"extract.cli", "measure.cli"}, GRAPH["pipeline"]
    assert project <= set(PACKAGES)
