"""Editing a prune threshold reruns `prune` and what follows it, nothing before it.

The project (dvc.yaml, params.yaml and the code its stages run) is copied into a fresh git +
DVC repository and run at a tiny size: 12 + 4 synthetic 48x48 images, a classifier of 2 steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("dvc.yaml", "params.yaml", "pipeline", "stages")
TINY = {
    "data": {"image_size": 48, "num_classes": 3, "train_images": 12, "val_images": 4},
    "classifier": {"crop_size": 48, "batch_size": 4, "steps": 2, "num_workers": 0},
    "cams": {"scales": [1.0], "flip": False, "num_workers": 0},
    "prune": {"workers": 1},
    "segment": {"crop_size": 48, "batch_size": 4, "steps": 2, "num_workers": 0, "crf_workers": 1},
}
UPSTREAM = ("data", "classifier", "cams")


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
    """Run ``command`` in ``project`` with this interpreter's environment first on PATH; its output."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(project: Path, *args: str) -> str:
    return shell(project, sys.executable, "-m", "dvc", *args)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    copy_project(tmp_path)
    shell(tmp_path, "git", "init", "--quiet")
    dvc(tmp_path, "init", "--quiet")
    return tmp_path


def test_a_prune_threshold_reruns_prune_and_nothing_before_it(project):
    first = dvc(project, "repro")
    assert all(f"Running stage '{stage}'" in first for stage in (*UPSTREAM, "prune", "segment"))
    assert json.loads((project / "metrics" / "prune.json").read_text())["images"] == 12

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prune"]["cam_quantile"] = 0.7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(dvc(project, "status", "--json"))

    assert {"prune", "segment"} <= set(changed)  # segment mines with the prune settings too
    assert not set(UPSTREAM) & set(changed)
    ran = set(re.findall(r"Running stage '(\w+)'", dvc(project, "repro")))
    assert {"prune", "segment"} <= ran
    assert not set(UPSTREAM) & ran
