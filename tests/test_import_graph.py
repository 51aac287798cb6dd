"""The project's import graph: pages -> backend -> {compression, metrics}, no cycles, pure libraries stay pure.

Run as a script (`python tests/test_import_graph.py`) to print the graph between packages and rooms."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "views", "backend", "compression", "metrics")
ALLOWED = {"app": {"views", "backend"}, "views": {"backend"}, "backend": {"compression", "metrics"},
           "compression": set(), "metrics": set()}
FORBIDDEN_THIRD_PARTY = {"compression": {"streamlit"}, "metrics": {"streamlit"}, "backend": {"streamlit"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "app.py", *[p for pkg in PACKAGES[1:] for p in (ROOT / pkg).rglob("*.py")]]
    return {module_name(p): p for p in files}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module an import statement names, relative imports resolved."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    edges = {}
    for name, path in modules.items():
        found = {m for m in imports_of(path, name) if m in modules and m != name}
        # `from backend import api` names the package only as the container of the module it imports
        edges[name] = {m for m in found if not any(o.startswith(m + ".") for o in found)}
    return edges


def third_party(name: str, path: Path) -> set[str]:
    return {m.split(".")[0] for m in imports_of(path, name)} - set(PACKAGES)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def room(name: str) -> str:
    """A top-level package, a backend room (`backend.runs`) or one of backend's top-level modules (`backend.api`)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "backend" and len(parts) > 1 else parts[0]


def test_no_import_cycles_between_modules():
    assert cycles(graph()) == []


def test_dependencies_point_one_way():
    bad = [(a, b) for a, targets in graph().items() for b in targets
           if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert bad == []


def test_pure_libraries_import_no_ui():
    modules = project_modules()
    bad = [(name, sorted(third_party(name, path) & FORBIDDEN_THIRD_PARTY[name.split(".")[0]]))
           for name, path in modules.items() if name.split(".")[0] in FORBIDDEN_THIRD_PARTY]
    assert [b for b in bad if b[1]] == []


def test_no_cycles_between_backend_rooms():
    edges = defaultdict(set)
    for a, targets in graph().items():
        for b in targets:
            if room(a) != room(b):
                edges[room(a)].add(room(b))
    assert cycles(dict(edges)) == []


def main() -> None:
    edges = defaultdict(set)
    for a, targets in graph().items():
        for b in targets:
            if room(a) != room(b):
                edges[room(a)].add(room(b))
    for a in sorted(edges):
        print(f"{a:<18} -> {', '.join(sorted(edges[a]))}")
    found = cycles(graph())
    print(f"cycles between modules: {found or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
