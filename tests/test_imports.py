"""No import cycle in meterproxy/ (issue #12): the module graph, read from the source with `ast`.

Every import that runs counts, at the top of a module or inside a function: an import moved into
a function to break a cycle still ties the two modules together (and hides the cycle until that
function runs), so it is a cycle here too. Only imports under `if TYPE_CHECKING:` are left out:
they never run, and annotations may name a type of the module that imports them.
An edge goes to the module named (`from meterproxy.ledger import sql` → meterproxy.ledger.sql,
`from meterproxy.ledger import Ledger` → the package meterproxy.ledger); the parent packages that
Python runs first are not edges, as a package importing its own submodules is no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "meterproxy"


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement except those under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """module → the meterproxy modules it imports (itself left out)."""
    mods = module_names(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import sub` imports the submodule; `from pkg import name`, pkg itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            deps |= {r for t in targets if (r := resolve(t)) is not None}
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, deps = work[-1]
            for dep in deps:
                if dep not in index:
                    index[dep] = low[dep] = len(index)
                    stack.append(dep)
                    on_stack.add(dep)
                    work.append((dep, iter(sorted(graph.get(dep, ())))))
                    break
                if dep in on_stack:
                    low[node] = min(low[node], index[dep])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return "cycle: " + "; ".join(edges)


def test_no_import_cycle_in_meterproxy() -> None:
    graph = import_graph()
    assert "meterproxy.transport.connection" in graph and "meterproxy.ledger.sql" in graph
    found = cycles(graph)
    assert not found, "\n".join(describe(graph, c) for c in found)


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The check itself: a cycle through a function-level import, a relative import or a
    `from pkg import submodule` is found; one through a TYPE_CHECKING import is not."""
    pkg = tmp_path / "meterproxy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from meterproxy import b\n",
        "b.py": "def f():\n    from meterproxy.a import x\n",          # a ↔ b, lazily
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from meterproxy.d import T\n",
        "d.py": "import meterproxy.c\n",                                # c → d only for types
        "sub/__init__.py": "from meterproxy.sub.e import E\n",
        "sub/e.py": "from . import f\n",
        "sub/f.py": "from ..sub.e import E\n",                          # e ↔ f, relative
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["meterproxy.c"] == set() and graph["meterproxy.d"] == {"meterproxy.c"}
    assert cycles(graph) == [["meterproxy.a", "meterproxy.b"], ["meterproxy.sub.e", "meterproxy.sub.f"]]
