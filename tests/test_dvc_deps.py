"""dvc.yaml tells the truth about code: every stage depends on every file of the project it
runs, and on no other.

A stage's code is the import closure of its script inside ``pipeline/`` and ``stages/``, read
from the sources (every import statement, those inside functions too). Each file of it must be
a dependency of the stage, itself or through a folder above it; otherwise editing that file
leaves stale outputs that ``dvc repro`` calls up to date. A code dependency the stage never runs (a
folder counts as each of its files) would rerun it for nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's ``__init__.py``), None outside the project."""
    if name.split(".", 1)[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The dotted names a source file imports, a ``from package import name`` giving both."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def runs_code(path: Path) -> bool:
    """False for a file of a docstring alone (a package's ``__init__.py`` often is): editing it
    changes no output."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def closure(script: Path) -> set[Path]:
    """Every project file ``script`` runs: itself, what it imports, and so on, with the
    ``__init__.py`` of each package on the way."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:depth]))
                if found is not None:
                    todo.append(found)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("name", list(stages()))
def test_a_stage_depends_on_every_project_file_it_runs(name):
    stage = stages()[name]
    module = stage["cmd"].removeprefix("python -m ")
    script = module_file(module)
    assert script is not None, f"{name}: cmd {stage['cmd']!r} runs no stages/ module"
    deps = [str(dep) for dep in stage["deps"]]
    missing = sorted(str(path.relative_to(ROOT)) for path in closure(script)
                     if runs_code(path) and not covered(path, deps))
    assert not missing, f"dvc.yaml stage {name!r} runs but does not depend on: {', '.join(missing)}"


def code_under(dep: str) -> set[Path]:
    """The project files a code dependency names: the file itself, or every file of the folder that
    runs code."""
    path = ROOT / dep
    return {path} if path.is_file() else {p for p in path.rglob("*.py") if runs_code(p)}


@pytest.mark.parametrize("name", list(stages()))
def test_a_stage_depends_on_no_project_file_it_does_not_run(name):
    stage = stages()[name]
    runs = closure(module_file(stage["cmd"].removeprefix("python -m ")))
    code = [str(dep) for dep in stage["deps"] if str(dep).split("/", 1)[0] in PACKAGES]
    idle = [f"{dep} ({', '.join(sorted(str(p.relative_to(ROOT)) for p in code_under(dep) - runs))})"
            for dep in code if code_under(dep) - runs]
    assert not idle, f"dvc.yaml stage {name!r} depends on code it never runs: {'; '.join(idle)}"


def test_the_closure_follows_imports_and_packages():
    found = {str(path.relative_to(ROOT)) for path in closure(ROOT / "stages" / "classifier.py")}
    assert {"stages/classifier.py", "pipeline/train/classifier.py", "pipeline/models/__init__.py",
            "pipeline/models/nets.py", "pipeline/core/io.py"} <= found
