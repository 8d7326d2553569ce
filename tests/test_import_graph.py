"""The import graph of ``unifilter_core`` and ``unifilter_dagster``: no import cycles, and core never imports
Dagster's side.

Every module is ast-parsed (imports inside functions count too) and each ``import unifilter_core.x`` /
``from unifilter_core.x import y`` / relative import becomes an edge to the module it names: ``unifilter_core.x.y``
when ``y`` is a submodule, else ``unifilter_core.x``. Cycles are the strongly connected components with more
than one module (or a module importing itself). Run this file directly to print them all.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "unifilter_core"
PACKAGES = (PACKAGE, "unifilter_dagster")

# no exception: every cycle fails (the tuple is here for a cycle being taken apart in a separate change)
EXCLUDED_PREFIXES: tuple[str, ...] = ()

# Areas that must take no part in any cycle (with each other, with fileio or with anything else).
CHECKED_PREFIXES = (
    f"{PACKAGE}.fileio",
    f"{PACKAGE}.synth",
    f"{PACKAGE}.data",
    f"{PACKAGE}.scoring",
    f"{PACKAGE}.catalog",
)


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``packages`` (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(p for package in packages for p in (root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            sub = [f"{stem}.{alias.name}" for alias in node.names if f"{stem}.{alias.name}" in modules]
            names = sub if len(sub) == len(node.names) else [stem, *sub]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                target = _resolve(name, modules)
                if target is not None and target not in PACKAGES:
                    targets.add(target)
    return targets


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` inside the package."""
    modules = module_files(root)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components that are cycles (Tarjan, iterative), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


def _only_excluded(component: list[str]) -> bool:
    return bool(EXCLUDED_PREFIXES) and all(m.startswith(EXCLUDED_PREFIXES) for m in component)


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.fileio" in graph[f"{PACKAGE}.synth.tars"]
    assert graph[f"{PACKAGE}.fileio"] == set()  # fileio imports nothing of ours
    assert f"{PACKAGE}.data.writer" in graph[f"{PACKAGE}.scoring.original_format"]  # a function-level import


def test_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == [["a", "b", "c"], ["e"]]


def test_no_cycles_through_fileio_synth_data_scoring_catalog() -> None:
    bad = [
        c
        for c in cycles(import_graph())
        if not _only_excluded(c) and any(_in(m, p) for m in c for p in CHECKED_PREFIXES)
    ]
    assert bad == [], f"import cycles: {bad}"


def test_no_cycles_anywhere_in_either_package() -> None:
    bad = [c for c in cycles(import_graph()) if not _only_excluded(c)]
    assert bad == [], f"import cycles: {bad}"


def test_core_never_imports_the_dagster_package() -> None:
    graph = import_graph()
    bad = {
        m: sorted(t for t in ts if _in(t, "unifilter_dagster")) for m, ts in graph.items() if _in(m, PACKAGE)
    }
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_no_cycle_among_synth_modules() -> None:
    graph = import_graph()
    synth = {
        m: {t for t in ts if _in(t, f"{PACKAGE}.synth")}
        for m, ts in graph.items()
        if _in(m, f"{PACKAGE}.synth")
    }
    assert cycles(synth) == []


if __name__ == "__main__":  # print every cycle of the package
    for component in cycles(import_graph()):
        note = "  (excluded: handled elsewhere)" if _only_excluded(component) else ""
        print(" <-> ".join(component) + note)
    sys.exit(0)


MAX_MODULE_LINES = 500


def test_no_module_over_500_lines() -> None:
    """Long modules hide more than one responsibility: split them (docs/architecture.md)."""
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"
