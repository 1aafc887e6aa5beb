"""No module of the project imports itself back through others: the import graph of ``pipeline/``
and ``stages/`` (every import statement, those inside functions too, but for the ones only a
type checker reads) has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.core.dvcfile import ROOT, module_file


def _runtime_imports(tree: ast.AST) -> set[str]:
    """The dotted names imported at run time: ``if TYPE_CHECKING:`` blocks left out."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        names |= _runtime_imports(node)
    return names


def import_graph(root: Path = ROOT) -> dict[Path, set[Path]]:
    """Each project file -> the project files it imports (a name's own module where it is one,
    else the package it comes from)."""
    files = [*root.joinpath("pipeline").rglob("*.py"), *root.joinpath("stages").rglob("*.py")]
    graph = {}
    for path in files:
        targets = set()
        for name in _runtime_imports(ast.parse(path.read_text())):
            found = module_file(name, root)
            if found is None and "." in name:  # `from package import name`: the name is no module
                continue
            if found is not None and found != path:
                targets.add(found)
        graph[path] = targets
    return graph


def cycles(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """The strongly connected groups of more than one file (Tarjan's algorithm, iterative)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_module_imports_itself_back():
    found = [" -> ".join(str(path.relative_to(ROOT)) for path in group) for group in cycles(import_graph())]
    assert not found, f"import cycles: {'; '.join(found)}"


def test_a_cycle_is_found_where_there_is_one(tmp_path):
    for name, text in (("pipeline/__init__.py", ""), ("pipeline/a.py", "def f():\n    from pipeline import b\n"),
                       ("pipeline/b.py", "import pipeline.a\n"), ("pipeline/c.py", "from typing import TYPE_CHECKING\n"
                                                                  "if TYPE_CHECKING:\n    import pipeline.a\n")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "stages").mkdir()
    assert cycles(import_graph(tmp_path)) == [[tmp_path / "pipeline/a.py", tmp_path / "pipeline/b.py"]]
