"""dvc.yaml tells the truth about code: it is what ``rrm dvc-yaml`` generates from the stage
declarations, and every stage depends on every file of the project it runs, and on no other.

A stage's code is the import closure of its script inside ``pipeline/`` and ``stages/`` (every
import statement, those inside functions too) with the record functions of the inputs it checks
(:func:`pipeline.core.dvcfile.stage_code`). Each file of it must be a dependency of the stage,
itself or through a folder above it; otherwise editing that file leaves stale outputs that
``dvc repro`` calls up to date. A code dependency the stage never runs (a folder counts as each
of its files) would rerun it for nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.dvcfile import DVC_FILE, PACKAGES, ROOT, closure, code_deps, render, runs_code, stage_code
from pipeline.core.registry import STAGES


def stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_FILE.read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


def test_the_committed_dvc_yaml_is_the_generated_one():
    assert DVC_FILE.read_text() == render(), "dvc.yaml differs from the declarations: run `rrm dvc-yaml`"


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_depends_on_every_project_file_it_runs(name):
    deps = [str(dep) for dep in stages()[name]["deps"]]
    missing = sorted(str(path.relative_to(ROOT)) for path in stage_code(STAGES[name])
                     if runs_code(path) and not covered(path, deps))
    assert not missing, f"dvc.yaml stage {name!r} runs but does not depend on: {', '.join(missing)}"


def code_under(dep: str) -> set[Path]:
    """The project files a code dependency names: the file itself, or every file of the folder that
    runs code."""
    path = ROOT / dep
    return {path} if path.is_file() else {p for p in path.rglob("*.py") if runs_code(p)}


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_depends_on_no_project_file_it_does_not_run(name):
    runs = stage_code(STAGES[name])
    code = [str(dep) for dep in stages()[name]["deps"] if str(dep).split("/", 1)[0] in PACKAGES]
    idle = [f"{dep} ({', '.join(sorted(str(p.relative_to(ROOT)) for p in code_under(dep) - runs))})"
            for dep in code if code_under(dep) - runs]
    assert not idle, f"dvc.yaml stage {name!r} depends on code it never runs: {'; '.join(idle)}"


def code_of(name: str) -> set[str]:
    """The project files stage ``name`` runs, relative to the repository."""
    return {str(path.relative_to(ROOT)) for path in stage_code(STAGES[name])}


def test_a_stage_that_checks_an_input_runs_its_producer_s_record_function():
    assert {"pipeline/method/mining.py", "pipeline/train/refine.py"} <= code_of("segment")  # labels: masks | refined


@pytest.mark.parametrize("name", ["segment", "deeplab"])
def test_a_stage_that_may_learn_from_the_refined_labels_does_not_run_the_walk(name):
    found = code_of(name)
    assert "pipeline/train/refine.py" in found  # the refined labels' record
    assert not {"pipeline/train/affinity.py", "pipeline/models/affinity.py"} & found


def test_the_closure_follows_imports_and_packages():
    found = {str(path.relative_to(ROOT)) for path in closure([ROOT / "stages" / "classifier.py"])}
    assert {"stages/classifier.py", "pipeline/train/classifier.py", "pipeline/models/__init__.py",
            "pipeline/models/nets.py", "pipeline/core/io.py"} <= found


def test_a_folder_stands_for_its_files_only_where_the_stage_runs_them_all(tmp_path):
    for name, text in (("pkg/__init__.py", '"""Docstring only."""\n'), ("pkg/a.py", "A = 1\n"),
                       ("pkg/b.py", "B = 2\n"), ("other/c.py", "C = 3\n")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    both = {tmp_path / "pkg/a.py", tmp_path / "pkg/b.py", tmp_path / "other/c.py"}
    assert code_deps(both, tmp_path) == ["other", "pkg"]
    assert code_deps({tmp_path / "pkg/a.py"}, tmp_path) == ["pkg/a.py"]
