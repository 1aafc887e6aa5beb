"""What `dvc repro` reruns: a prune threshold reruns `prune` and what follows it, nothing before
it; a setting of the `run:` section reruns nothing and keeps every finished store.

The project (dvc.yaml, params.yaml and the code its stages run) is copied into a fresh git +
DVC repository and run once at the tiny size of ``tests.conftest.TINY`` (12 + 4 images); the
tests then change params.yaml and ask DVC what it would rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.registry import STAGES, STORES
from tests.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "pipeline", "stages")
"""What a clone of the repository holds that a run needs: its .gitignore keeps the stores out of
git, as in a user's clone (a queued experiment gets them from DVC's cache only), its .dvcignore
Python's byte code out of the code folders' hashes."""
TINY = tiny_params(data={"train_images": 12, "val_images": 4}, classifier={"steps": 2}, cams={"scales": [1.0]},
                   segment={"steps": 2, "crf": False})
UPSTREAM = ("data", "classifier", "cams", "crf")
RUN_CHANGES = {"loader_workers": 1, "workers": 2, "scheduler": "tcp://127.0.0.1:1", "chunk_size": 1,
               "inference_batch": 1, "batch_pixels": 1000, "checkpoint_every": 1}
"""Another value for every setting of the `run:` section."""


def copy_project(target: Path) -> None:
    """The files the pipeline runs from, with params.yaml's sections overridden by ``TINY``."""
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target / name)
    params = yaml.safe_load((target / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section] = {**(params.get(section) or {}), **values}
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def shell(project: Path, *command: str) -> str:
    """Run ``command`` in ``project`` with this interpreter's environment first on PATH, writing
    byte code as Python does by default (beside the code DVC hashes); its output."""
    env = {
        **{name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(project: Path, *args: str) -> str:
    return shell(project, sys.executable, "-m", "dvc", *args)


def status(project: Path) -> dict:
    """What `dvc status --json` prints: the stages that would rerun, with why (asked in this process)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name.rsplit(":", 1)[-1]: why for name, why in repo.status().items()}  # "dvc.yaml:prune" -> "prune"


def set_param(project: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def store_bytes(project: Path) -> dict[str, str]:
    """The digest of every file of every store, by path."""
    return {str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
            for store in STORES for path in sorted((project / "artifacts" / store.name).rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project after a first `dvc repro` of every stage."""
    root = tmp_path_factory.mktemp("dvc")
    copy_project(root)
    shell(root, "git", "init", "--quiet")
    dvc(root, "init", "--quiet")
    first = dvc(root, "repro")
    assert all(f"Running stage '{stage}'" in first for stage in (*UPSTREAM, "prune", "segment"))
    assert json.loads((root / "scores" / "prune.json").read_text())["images"] == 12
    return root


def test_a_run_setting_reruns_no_stage_and_keeps_every_finished_store(project, monkeypatch):
    original = (project / "params.yaml").read_text()
    stores = store_bytes(project)
    metrics = {path: path.read_bytes() for path in [*project.glob("metrics/*.json"), *project.glob("scores/*.json")]}
    for key, value in RUN_CHANGES.items():
        set_param(project, "run", key, value)
        assert status(project) == {}, f"run.{key} changed a stage"
    set_param(project, "run", "scheduler", None)  # none answers there; the rest stays changed
    monkeypatch.chdir(project)
    for stage in ("cams", "crf", "prune"):  # run by hand, as `rrm stage` would: each finds its store done
        import_module(STAGES[stage].module).main(Path("params.yaml"))
    assert store_bytes(project) == stores
    for path, content in metrics.items():  # their figures again, with new seconds: put back as DVC recorded them
        path.write_bytes(content)
    (project / "params.yaml").write_text(original)
    assert status(project) == {}


def test_an_alpha_reruns_the_crfs_and_what_follows_but_not_the_cams(project):
    original = (project / "params.yaml").read_text()
    set_param(project, "prune", "la_alpha", 6)
    changed = set(status(project))
    (project / "params.yaml").write_text(original)

    assert {"crf", "prune", "segment"} <= changed and not {"data", "classifier", "cams"} & changed
    assert status(project) == {}


def test_a_prune_threshold_reruns_prune_and_nothing_before_it(project):
    set_param(project, "prune", "cam_quantile", 0.7)
    changed = status(project)

    assert {"prune", "segment"} <= set(changed)  # segment mines with the prune settings too
    assert not set(UPSTREAM) & set(changed)
    ran = set(re.findall(r"Running stage '(\w+)'", dvc(project, "repro", "prune")))  # and what it needs
    assert ran == {"prune"}
    assert set(status(project)) == set(changed) - {"prune"}


def test_queued_threshold_experiments_compute_no_cams_and_no_crfs(project, monkeypatch):
    """A queued experiment runs in a workspace of its own, which gets the cached stores back: the
    CAMs and the CRFs come from DVC's cache; the rule and what follows it run again. `rrm
    experiments` then shows each with its threshold and headline scores in 120 columns."""
    shell(project, "git", "add", "-A")
    shell(project, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "--quiet", "-m", "run")
    for value in (0.5, 0.8):
        dvc(project, "exp", "run", "--queue", "-S", f"prune.cam_quantile={value}")
    dvc(project, "queue", "start", "--jobs", "1")
    deadline = time.monotonic() + 300
    while re.search(r"\b(Queued|Running)\b", queue := dvc(project, "queue", "status")) and time.monotonic() < deadline:
        time.sleep(2)
    names = re.findall(r"^\w+\s+(\S+)\s.*\bSuccess\b", queue, re.MULTILINE)
    assert len(names) == 2, queue
    for name in names:
        ran = set(re.findall(r"Running stage '(\w+)'", dvc(project, "queue", "logs", name)))
        assert "prune" in ran and not {"data", "classifier", "cams", "crf"} & ran
    monkeypatch.chdir(project)
    shown = CliRunner().invoke(main, ["experiments", "--width", "120"])
    assert shown.exit_code == 0, shown.output
    header, *rows = shown.output.splitlines()
    assert header.split() == ["Experiment", "cam_quantile", "CAM", "prec", "cov", "refined", "pseudo", "one-step",
                              "two-step", "seconds"]
    assert max(map(len, shown.output.splitlines())) <= 120
    quantiles = {row.split()[-9] for row in rows if any(name in row for name in names)}
    assert quantiles == {"0.5", "0.8"}
