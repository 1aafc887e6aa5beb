"""Several processes: the stages under ``torchrun`` (2 gloo processes on the CPU) and the dask steps
on a 2-worker cluster given by address, each against the single-process run of the same project.

Every run is a real process: ``python -m torch.distributed.run --standalone --nproc-per-node 2``
starting :data:`DRIVER`, which runs ``stages.<name>`` as ``python -m`` would, recording in
``writes/<rank>.txt`` each file the process writes and each store it marks complete. The
single-process reference runs through the same driver.

All of them run with ``OMP_NUM_THREADS=1``, the setting torchrun gives each process it starts: a
CPU convolution's sums depend on how many threads share them, and with the reference on 2
threads 13 CAM values of the tiny project's 22 images came out one float16 step apart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from distributed import Client, get_task_stream

from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.data.manifest import load_manifest
from pipeline.method.crf import INFERENCE_CRF
from pipeline.method.crf_runner import environ_restored, local_cluster
from pipeline.method.mining import mine_split
from pipeline.method.prune import PruneParams
from pipeline.train.predict import infer_split
from stages import crf, data, prune
from tests.test_faults import PARAMS as FAULTS_PARAMS
from tests.test_faults import outputs, store_digest

REPO = Path(__file__).resolve().parents[1]
PARAMS = {**FAULTS_PARAMS, "classifier": {**FAULTS_PARAMS["classifier"], "freeze_bn": True}}
"""The tiny project of the fault tests, with the classifier's batch norm frozen (batch 8, 6 steps)."""
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

DRIVER = '''
import os, runpy, sys
from contextlib import contextmanager
from pathlib import Path

import pipeline.core.io

def record(line):
    Path("writes").mkdir(exist_ok=True)
    with open(f"writes/{os.environ.get('RANK', '0')}.txt", "a") as log:
        log.write(line + "\\n")

atomic_open = pipeline.core.io.atomic_open

@contextmanager
def recorded_open(path, mode="w"):
    record(str(path))
    with atomic_open(path, mode) as handle:
        yield handle

pipeline.core.io.atomic_open = recorded_open

from pipeline.models import nets
from pipeline.core.store import ImageStore

mark_complete = ImageStore.mark_complete

def recorded_mark(self, expected):
    record(f"complete {self.path.name}")
    mark_complete(self, expected)

ImageStore.mark_complete = recorded_mark
stage, dropout = sys.argv[1], float(sys.argv[2])
nets._Classifier.__init__.__kwdefaults__["dropout"] = dropout
sys.argv = [stage, "params.yaml"]
runpy.run_module(f"stages.{stage}", run_name="__main__")
'''
"""``driver.py STAGE DROPOUT``: run ``stages.STAGE`` with the classifier's dropout set to DROPOUT,
recording what this process writes."""


def launch(project: Path, stage: str, processes: int, dropout: float = 0.5) -> None:
    """Run ``stage`` in ``project`` in ``processes`` processes (torchrun for more than one), each rank
    logging to ``logs/<run>/attempt_0/<rank>/stderr.log``."""
    driver = project / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, str(driver), stage, str(dropout)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                        "--log-dir=logs", "--redirects=3"]
    result = subprocess.run(command, cwd=project, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:] + "".join(
        path.read_text()[-2000:] for path in project.glob("logs/*/attempt_0/*/stderr.log"))


def writes(project: Path, rank: int) -> list[str]:
    """What rank ``rank`` recorded writing, in order (nothing if it wrote nothing)."""
    path = project / "writes" / f"{rank}.txt"
    return path.read_text().splitlines() if path.is_file() else []


def rank_log(project: Path, rank: int) -> str:
    (log,) = project.glob(f"logs/*/attempt_0/{rank}/stderr.log")
    return log.read_text()


def fresh(snapshot: Path, into: Path, **sections: dict) -> Path:
    """A copy of the project folder ``snapshot`` with its records cleared and ``sections`` merged into its params."""
    shutil.copytree(snapshot, into, ignore=shutil.ignore_patterns("writes", "logs"))
    params = yaml.safe_load((into / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    (into / "params.yaml").write_text(yaml.safe_dump(params))
    return into


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process project after each stage: ``reference / <stage>``; the classifier without dropout."""
    snapshots = tmp_path_factory.mktemp("reference")
    project = tmp_path_factory.mktemp("project")
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        data.main(Path("params.yaml"))
    shutil.copytree(project, snapshots / "data")
    for stage in ("classifier", "cams"):
        launch(project, stage, processes=1, dropout=0.0)
        shutil.copytree(project, snapshots / stage)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        crf.main(Path("params.yaml"))
        shutil.copytree(project, snapshots / "crf")
        prune.main(Path("params.yaml"))
    shutil.copytree(project, snapshots / "prune")
    return snapshots


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a running scheduler with 2 single-threaded worker processes (dask's one-thread
    settings kept out of the environment of the processes later tests start)."""
    with environ_restored(), local_cluster(2) as local:
        yield local.scheduler_address


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_processes_with_half_batches_and_frozen_batch_norm_learn_the_single_process_weights(
        reference, tmp_path):
    project = fresh(reference / "data", tmp_path / "project", classifier={"batch_size": 4})
    launch(project, "classifier", processes=2, dropout=0.0)

    one, two = weights(reference / "classifier/checkpoints/classifier.pth"), weights(
        project / "checkpoints/classifier.pth")
    assert one.keys() == two.keys()
    for name in one:  # the 2 gradients' mean adds in another order than one batch's sum: float32 rounding
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    state = torch.load(project / "checkpoints/state/classifier.pt", map_location="cpu", weights_only=False)
    assert state["step"] == PARAMS["classifier"]["steps"]


def test_only_rank_0_writes_files_and_shows_progress(reference, tmp_path):
    project = fresh(reference / "data", tmp_path / "project", classifier={"batch_size": 4, "freeze_bn": False},
                    run={"checkpoint_every": 100})  # the training state written once, at the end
    launch(project, "classifier", processes=2)  # trained batch norm and dropout: runs, but equality is not expected

    assert writes(project, 0) == ["checkpoints/state/classifier.pt", "checkpoints/classifier.pth",
                                  "checkpoints/classifier.json", "scores/classifier.json",
                                  "metrics/classifier.json"]
    assert writes(project, 1) == []
    assert "classifier: 100%" in rank_log(project, 0)
    assert "classifier" not in rank_log(project, 1)


def test_cams_of_two_processes_equal_the_single_process_store(reference, tmp_path):
    project = fresh(reference / "classifier", tmp_path / "project")
    launch(project, "cams", processes=2)

    assert store_digest(project / "artifacts/cams.zarr") == store_digest(reference / "cams/artifacts/cams.zarr")
    assert writes(project, 0) == ["complete cams.zarr", "scores/cams.json", "metrics/cams.json",
                                  "plots/cams_threshold.json"]
    assert writes(project, 1) == []
    assert "cams train [1/2]" in rank_log(project, 0) and "cams" not in rank_log(project, 1)


def test_segment_of_two_processes_learns_the_single_process_weights_and_rank_0_alone_writes(reference, tmp_path):
    single = fresh(reference / "prune", tmp_path / "single")
    launch(single, "segment", processes=1)
    project = fresh(reference / "prune", tmp_path / "project", segment={"batch_size": 1})
    launch(project, "segment", processes=2)

    one, two = weights(single / "checkpoints/segment.pth"), weights(project / "checkpoints/segment.pth")
    for name in one:  # the cross-entropy divides by both processes' pixel counts, as one batch's would
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert writes(project, 0) == ["checkpoints/state/segment.pt", "checkpoints/state/segment.pt",  # steps 2 and 4
                                  "checkpoints/segment.pth", "checkpoints/segment.json", "complete segment.zarr",
                                  "complete pseudo.zarr", "scores/segment.json", "metrics/segment.json"]
    assert writes(project, 1) == []


def test_crfs_of_two_processes_with_the_torch_backend_equal_one_process_and_rank_0_alone_scores(reference, tmp_path):
    project = fresh(reference / "cams", tmp_path / "project", prune={"crf_backend": "torch"})
    launch(project, "crf", processes=2)  # each gloo process runs the CRFs of its share in its own process
    single = fresh(reference / "cams", tmp_path / "single")
    manifest = load_manifest(single / "manifests/synth.json")
    crf = ImageStore(single / "artifacts/crf.zarr", "crf")
    maps = ImageStore(single / "artifacts/crfmaps.zarr", "crf")
    expected = mine_split(manifest, "train", ImageStore(single / "artifacts/cams.zarr"), crf, maps,
                          PruneParams(crf_backend="torch"), RunParams(), progress=False,
                          device=torch.device("cpu"))  # one process, no cluster

    assert store_digest(project / "artifacts/crf.zarr") == store_digest(crf.path)
    shared = ImageStore(project / "artifacts/crfmaps.zarr")
    for image_id in maps.ids():  # the torch mean field of another batch rounds the confidence's last digit otherwise
        np.testing.assert_allclose(shared.read(image_id)[0], maps.read(image_id)[0], atol=1e-6)
    metrics, scores = json.loads((project / "scores/crf.json").read_text()), expected.as_dict(manifest.label_names)
    assert [metrics["crf"]["precision"], metrics["crf"]["coverage"]] == pytest.approx(
        [scores["crf"]["precision"], scores["crf"]["coverage"]], abs=1e-6)  # the file's are rounded
    assert writes(project, 0) == ["complete crf.zarr", "complete crfmaps.zarr", "scores/crf.json", "metrics/crf.json"]
    assert writes(project, 1) == []
    assert "crf train" in rank_log(project, 0) and "crf" not in rank_log(project, 1)


def test_crfs_on_a_two_worker_cluster_given_by_address_write_the_single_process_stores(
        reference, cluster, tmp_path):
    project = fresh(reference / "cams", tmp_path / "project")
    with Client(cluster) as client, get_task_stream(client) as stream:
        result = subprocess.run([sys.executable, "-m", "stages.crf", "params.yaml", "--scheduler", cluster],
                                cwd=project, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    assert outputs(project) == outputs(reference / "crf")
    workers = {task["worker"] for task in stream.data if task["key"].startswith("mine_chunk")}
    assert len(workers) == 2  # both workers of the cluster ran CRFs


def test_crf_inference_on_a_cluster_given_by_address_equals_local_processes(tiny_manifest, cluster, tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, tiny_manifest.num_classes + 1, 1)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return layer(images).mul(3).softmax(1)

    local, remote = ImageStore(tmp_path / "local.zarr"), ImageStore(tmp_path / "remote.zarr")
    expected = infer_split(probabilities, tiny_manifest, "train", local, torch.device("cpu"), INFERENCE_CRF,
                           RunParams(workers=1), progress=False)
    with Client(cluster) as client, get_task_stream(client) as stream:
        scores = infer_split(probabilities, tiny_manifest, "train", remote, torch.device("cpu"), INFERENCE_CRF,
                             RunParams(scheduler=cluster), progress=False)

    assert scores == expected
    assert store_digest(remote.path) == store_digest(local.path)
    assert sorted(task["key"].split("-")[0] for task in stream.data) == ["_crf_labels"] * 4
