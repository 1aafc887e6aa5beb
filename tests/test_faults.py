"""Stages killed part-way and rerun: the rerun ends with the outputs of an uninterrupted run, and
the killed run never leaves a store that the next stage takes for complete.

Each stage runs as ``python -m stages.<name>`` in its own session and is killed with SIGKILL to
its whole process group (its dask workers and process pools included), as a user's kill or the
OOM killer would end it. The moment is chosen by watching the files the stage writes, or, for
the moment just before a store is marked complete (which no file shows in time), by a driver
that runs the stage with ``ImageStore.mark_complete`` replaced by a kill of the group.

The reference is one uninterrupted tiny project with a copy of its folder after every stage:
a scenario copies the folder its stage starts from, kills the stage, checks what it left, reruns
the stage and compares everything with the copy made after the stage. The same comparison
between two separate runs shows that a run repeats bit for bit on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.errors import InputError
from pipeline.core.store import ImageStore
from stages import cams, classifier, crf, data, deeplab, prune, segment
from tests.conftest import tiny_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = tiny_params(run={"chunk_size": 2, "checkpoint_every": 2},
                     segment={"batch_size": 2, "steps": 4, "crf": False}, deeplab={"enabled": True})
"""The stages' tiny settings, with training states saved every 2 of the segment stage's 4 steps,
the masks mined in tasks of 2 images, and the deeplab stage on (it reads the segment stage's store)."""

MAINS = {"data": data.main, "classifier": classifier.main, "cams": cams.main, "crf": crf.main, "prune": prune.main,
         "segment": segment.main}
"""The stages in pipeline order."""

HANDED_ON = {"cams": ("cams.zarr", crf.main), "crf": ("crfmaps.zarr", prune.main),
             "prune": ("masks.zarr", segment.main),
             "segment": ("pseudo.zarr", deeplab.main)}
"""The store each stage hands on, and the stage that reads it."""

KILL_BEFORE_MARKING = """
import os, runpy, signal, sys
from pipeline.core.store import ImageStore
stage, store = sys.argv[1:]
mark_complete = ImageStore.mark_complete
def kill_instead(self, expected):
    if self.path.name == store:
        os.killpg(0, signal.SIGKILL)
    mark_complete(self, expected)
ImageStore.mark_complete = kill_instead
sys.argv = [stage, "params.yaml"]
runpy.run_module(f"stages.{stage}", run_name="__main__")
"""
"""``python -c KILL_BEFORE_MARKING STAGE STORE``: run a stage, killed when it would mark STORE complete."""


@dataclass(frozen=True)
class Moment:
    """When to kill: as soon as ``reached(project)`` holds, or else just before ``store`` is marked complete."""

    name: str
    reached: Callable[[Path], bool] | None = None
    store: str | None = None


def store_created(name: str) -> Moment:
    return Moment(f"{name} created", reached=lambda project: (project / "artifacts" / name / "zarr.json").is_file())


def arrays_begun(name: str, count: int) -> Moment:
    """``count`` arrays begun in the store (the last ones possibly still being written)."""
    def reached(project: Path) -> bool:
        try:  # the stage may be starting the store anew (removed, then made) between two looks
            return sum(entry.is_dir() for entry in os.scandir(project / "artifacts" / name)) >= count
        except FileNotFoundError:
            return False

    return Moment(f"{count} arrays of {name} begun", reached=reached)


def file_written(path: str) -> Moment:
    return Moment(f"{path} written", reached=lambda project: (project / path).is_file())


def before_marking(name: str) -> Moment:
    return Moment(f"{name} about to be marked complete", store=name)


SCENARIOS = [
    ("cams", store_created("cams.zarr")),
    ("cams", arrays_begun("cams.zarr", 5)),
    ("cams", before_marking("cams.zarr")),
    ("crf", store_created("crf.zarr")),  # the dask cluster is starting
    ("crf", arrays_begun("crf.zarr", 2)),  # the worker is running the CRFs
    ("crf", before_marking("crf.zarr")),
    ("prune", before_marking("masks.zarr")),
    ("segment", file_written("checkpoints/state/segment.pt")),  # the first training state, at step 2 of 4
    ("segment", store_created("segment.zarr")),  # inference has begun
    ("segment", before_marking("pseudo.zarr")),  # the val store is complete, the train split's is not
]


def build(project: Path, snapshots: Path | None = None) -> None:
    """Run every stage in ``project`` (made with PARAMS); copy the folder to ``snapshots/<stage>`` after each."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        for name, main in MAINS.items():
            main(Path("params.yaml"))
            if snapshots is not None:
                shutil.copytree(project, snapshots / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the project after each stage of an uninterrupted run: ``reference / <stage>``."""
    snapshots = tmp_path_factory.mktemp("reference")
    build(tmp_path_factory.mktemp("project"), snapshots)
    return snapshots


def store_digest(path: Path) -> str:
    """SHA-256 of a store: its state and fingerprint, then every array with its attributes, in id order."""
    store = ImageStore(path)
    digest = hashlib.sha256(json.dumps([store.is_complete(), store.fingerprint, store.ids()]).encode())
    for image_id in store.ids():
        array, attrs = store.read(image_id)
        digest.update(json.dumps([image_id, str(array.dtype), array.shape, attrs], sort_keys=True).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """SHA-256 of a state dict's tensors, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(torch.load(path, map_location="cpu", weights_only=True).items()):
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def without_timings(value: Any) -> Any:
    """A metrics value without its wall times (keys ``seconds`` and ``*_seconds``), which no rerun repeats."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items()
                if key != "seconds" and not key.endswith("_seconds")}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def outputs(project: Path) -> dict[str, Any]:
    """Every output of the stages run in ``project``: stores and weights by digest, the JSON files
    (metrics, scores, plots) as read."""
    found: dict[str, Any] = {}
    for path in sorted(project.glob("artifacts/*.zarr")):
        found[str(path.relative_to(project))] = store_digest(path)
    for path in sorted(project.glob("checkpoints/*.pth")):
        found[str(path.relative_to(project))] = weights_digest(path)
    for path in sorted(path for folder in ("metrics", "scores", "plots") for path in project.glob(f"{folder}/*.json")):
        found[str(path.relative_to(project))] = without_timings(json.loads(path.read_text()))
    return found


def what_training_left(project: Path) -> dict[str, Any]:
    """The weights a stage left in ``project`` (by digest) and the step of each training state:
    where a rerun differs, whether the killed run's training or the resumption made the difference."""
    left: dict[str, Any] = {str(path.relative_to(project)): weights_digest(path)
                            for path in sorted(project.glob("checkpoints/*.pth"))}
    for path in sorted(project.glob("checkpoints/state/*.pt")):
        left[str(path.relative_to(project))] = torch.load(path, map_location="cpu", weights_only=False)["step"]
    return left


def survivors(session: int) -> list[psutil.Process]:
    """Live processes of ``session`` (zombies not counted: they run nothing)."""
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except ProcessLookupError:
            continue
    return found


def _as_from_a_shell() -> None:
    """Start the stage with Ctrl-C's default handling, as a shell starts a command: a process
    inherits an ignored SIGINT, and the test process may have come to ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_stage(project: Path, stage: str, moment: Moment, log: Path, sent: int = signal.SIGKILL) -> int:
    """Run ``stage`` in ``project`` in a session of its own and send ``sent`` to the whole session
    at ``moment`` (SIGINT is what a terminal's Ctrl-C sends to its foreground group). Returns the
    stage's exit status, once every process of the session has ended."""
    command = ([sys.executable, "-c", KILL_BEFORE_MARKING, stage, moment.store] if moment.reached is None
               else [sys.executable, "-m", f"stages.{stage}", "params.yaml"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=output, stderr=output,
                                   start_new_session=True, preexec_fn=_as_from_a_shell)
    deadline = time.monotonic() + 120
    while moment.reached is not None and not moment.reached(project):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{stage} ended (status {process.returncode}) before {moment.name}:\n{log.read_text()[-2000:]}")
        time.sleep(0.002)
    if moment.reached is not None:
        os.killpg(process.pid, sent)
    status = process.wait(timeout=120)
    deadline = time.monotonic() + 10
    while survivors(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not survivors(process.pid), "a process of the stopped stage is still running"
    return status


@pytest.mark.parametrize(("stage", "moment"), SCENARIOS, ids=[f"{stage}: {moment.name}" for stage, moment in SCENARIOS])
def test_a_killed_stage_leaves_no_complete_store_and_its_rerun_matches_an_uninterrupted_run(
        reference, tmp_path, monkeypatch, stage, moment):
    names = list(MAINS)
    project = tmp_path / "project"
    shutil.copytree(reference / names[names.index(stage) - 1], project)
    log = tmp_path / "stage.log"
    assert kill_stage(project, stage, moment, log) == -signal.SIGKILL, log.read_text()[-2000:]
    monkeypatch.chdir(project)

    store, next_stage = HANDED_ON[stage]
    assert not ImageStore(Path("artifacts") / store).is_complete()
    with pytest.raises(InputError, match=rf"incomplete store \(rerun the {stage} stage\)"):
        next_stage(Path("params.yaml"))

    left = what_training_left(project)
    MAINS[stage](Path("params.yaml"))
    assert outputs(project) == outputs(reference / stage), f"the killed run left {left}"


def test_ctrl_c_ends_a_stage_in_one_line_and_its_rerun_matches_an_uninterrupted_run(reference, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(reference / "cams", project)
    log = tmp_path / "crf.log"
    status = kill_stage(project, "crf", arrays_begun("crf.zarr", 2), log, sent=signal.SIGINT)

    messages = [line for line in log.read_text().replace("\r", "\n").splitlines() if "img/s" not in line]
    assert status == 130 and "Traceback" not in log.read_text()  # its dask workers leave Ctrl-C to it
    assert messages[-1] == "interrupted: what was finished is kept, and a rerun resumes from it"
    monkeypatch.chdir(project)
    crf.main(Path("params.yaml"))
    assert outputs(project) == outputs(reference / "crf")


def test_two_runs_with_the_same_seed_write_identical_outputs(reference, tmp_path):
    environment = dict(os.environ)
    build(tmp_path)
    assert outputs(tmp_path) == outputs(reference / "segment")
    assert dict(os.environ) == environment  # the dask cluster's one-thread settings do not reach later processes


def test_a_store_kept_by_a_rerun_loses_the_debris_of_the_write_that_was_killed(tmp_path):
    store = ImageStore(tmp_path / "cams.zarr", stage="cams")
    store.reset_unless("settings")
    store.write("a", np.ones((2, 2), dtype=np.uint8))
    (store.path / "b" / "c").mkdir(parents=True)  # the array b, killed before its zarr.json was written
    (store.path / "zarr.0123abcd.partial").write_bytes(b"{")  # the group's metadata, killed mid-write
    assert store.reset_unless("settings")
    assert sorted(entry.name for entry in store.path.iterdir()) == ["a", "zarr.json"]
    assert store.complete_ids() == ["a"] and store.fingerprint == "settings"


def _cut_short(chunk: Path, other: Path) -> None:
    chunk.write_bytes(chunk.read_bytes()[:10])


def _garbled(chunk: Path, other: Path) -> None:
    chunk.write_bytes(bytes(255 - byte for byte in chunk.read_bytes()))


def _wrong_shape(chunk: Path, other: Path) -> None:
    chunk.write_bytes(other.read_bytes())


def _garbled_past_the_header(chunk: Path, other: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0xFF
    chunk.write_bytes(bytes(data))


DAMAGES = {"cut short": _cut_short, "garbled": _garbled, "of the wrong shape": _wrong_shape,
           "garbled past its header": _garbled_past_the_header}
"""Ways a chunk file is damaged (``other``: the same image's chunk in the other store, another shape)."""


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize(("stage", "store", "other"), [("cams", "cams.zarr", "masks.zarr"),
                                                       ("prune", "masks.zarr", "cams.zarr")])
def test_a_damaged_chunk_is_named_by_readers_and_verify_and_written_again_by_its_stage(
        reference, tmp_path, monkeypatch, stage, store, other, damage):
    project = tmp_path / "project"
    shutil.copytree(reference / "prune", project)
    monkeypatch.chdir(project)
    images = ImageStore(Path("artifacts") / store, stage)
    image_id = images.complete_ids()[1]
    chunk = next(path for path in (images.path / image_id / "c").rglob("*") if path.is_file())
    DAMAGES[damage](chunk, next(path for path in (Path("artifacts") / other / image_id / "c").rglob("*")
                                if path.is_file()))

    with pytest.raises(InputError, match=rf"{images.path}: image '{image_id}': its chunk file {chunk} "):
        images.read(image_id)
    found = CliRunner().invoke(main, ["verify", "--store", store])
    assert found.exit_code == 1 and f"  damaged {image_id}: its chunk file {chunk}" in found.stdout
    if damage == "garbled past its header":  # nothing tells but decoding it
        assert image_id in images
        if stage == "cams":  # which the cams stage does not before it scores: verify deletes it
            CliRunner().invoke(main, ["verify", "--store", store, "--repair"])
            assert image_id not in images
    else:
        assert image_id not in images

    MAINS[stage](Path("params.yaml"))
    assert CliRunner().invoke(main, ["verify", "--store", store]).exit_code == 0
    assert outputs(project) == outputs(reference / "prune")
