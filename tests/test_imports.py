"""Every module imports, and the import graph has no circles: the library below the front-ends,
no front-end importing another (STYLE 13; the review found workbench.demo <-> workbench.report and
workbench <-> apps)."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inspo_core", "workbench", "apps")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports, anywhere in the file (function-level imports too)."""
    mods = modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


@pytest.mark.parametrize("name", sorted(m for m in modules() if m != "workbench.__main__"))
def test_module_imports(name):
    importlib.import_module(name)


def test_no_import_circles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers():
    """inspo_core imports no front-end; apps and workbench do not import each other (the CLI names
    the app's entry points as strings, imported only for `app`)."""
    graph = import_graph()
    for m, deps in graph.items():
        top = m.split(".")[0]
        for d in deps:
            other = d.split(".")[0]
            if top == "inspo_core":
                assert other == "inspo_core", f"{m} imports the front-end {d}"
            elif top != other:
                assert other == "inspo_core", f"{m} imports {d}"
