"""Your own data, safely: tagged photos without masks go through every stage, and results made
from other data or other settings are never taken for the current ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from distributed import LocalCluster

from pipeline.cli import main as rrm
from pipeline.errors import InputError
from pipeline.manifest import load_manifest
from pipeline.store import ImageStore
from stages import cams, classifier, data, deeplab, prune, segment, supervised
from tests.test_stages import TINY

PARAMS = {
    **TINY,
    "dataset": {"manifest": "manifests/tagged.json"},
    "prune": {"workers": 1},
    "segment": {**TINY["segment"], "crf": False},
    "deeplab": {"enabled": True, "backbone": "small", "crop_size": 48, "batch_size": 4, "steps": 2,
                "num_workers": 0, "scales": [1.0], "flip": False, "crf": False},
    "supervised": {"enabled": True},
}
"""The tiny project on ``manifests/tagged.json``: the synthetic images with their tags only."""


def without_masks(source: Path, target: Path) -> None:
    """Write ``source``'s manifest as a user's tagged photos would have it: no ground-truth masks."""
    manifest = json.loads(source.read_text())
    manifest["masks"] = None
    for items in manifest["splits"].values():
        for item in items:
            item["mask"] = False
    target.write_text(json.dumps(manifest))


def run_prune(params: Path) -> None:
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        prune.main(params, scheduler=cluster.scheduler_address)


@pytest.fixture(scope="module")
def tagged_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose dataset has no mask, after every stage (the supervised one refused)."""
    root = tmp_path_factory.mktemp("tagged")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        data.main(params)
        without_masks(Path("manifests/synth.json"), Path("manifests/tagged.json"))
        classifier.main(params)
        cams.main(params)
        run_prune(params)
        segment.main(params)
        deeplab.main(params)
    return root


def test_a_dataset_without_masks_runs_every_stage_and_says_what_was_not_scored(tagged_project, monkeypatch):
    monkeypatch.chdir(tagged_project)
    metrics = {name: json.loads(Path(f"metrics/{name}.json").read_text())
               for name in ("classifier", "cams", "prune", "segment", "deeplab")}
    assert 0 <= metrics["classifier"]["map"] <= 1  # the tags are all it needs
    assert metrics["cams"]["miou"] is None and metrics["cams"]["scored_images"] == 0
    assert metrics["prune"]["precision"] is None and metrics["prune"]["scored_images"] == 0
    assert metrics["segment"]["miou"] is None and metrics["segment"]["pseudo"]["scored_images"] == 0
    assert metrics["deeplab"]["miou"] is None and metrics["deeplab"]["scored_images"] == 0
    for store, count in (("cams", 22), ("masks", 16), ("pseudo", 16), ("segment", 6), ("deeplab", 6)):
        assert ImageStore(f"artifacts/{store}.zarr").is_complete()
        assert len(ImageStore(f"artifacts/{store}.zarr").complete_ids()) == count

    with pytest.raises(InputError, match="ground-truth mask"):  # the supervised reference needs them
        supervised.main(Path("params.yaml"))


def test_report_stats_and_gallery_say_there_is_no_ground_truth(tagged_project, monkeypatch):
    monkeypatch.chdir(tagged_project)
    report = CliRunner().invoke(rrm, ["report", "--json"])
    assert report.exit_code == 0, report.output
    status = {row["label"]: row["status"] for row in json.loads(report.output)}
    assert status["CAM mIoU (val)"] == status["Reliable-region precision (train)"] == "no ground truth"
    assert status["One-step mIoU (val)"] == status["Two-step mIoU, DeepLab (val)"] == "no ground truth"
    assert status["Classifier mAP (val)"] == "ok"

    stats = CliRunner().invoke(rrm, ["stats"])
    assert stats.exit_code == 0 and "(16 images, 0 with ground truth)" in stats.output

    gallery = CliRunner().invoke(rrm, ["gallery", "--out", "gallery.html"])
    assert gallery.exit_code == 0, gallery.output
    assert "No image of this split has a ground-truth mask" in Path("gallery.html").read_text()
    assert len(load_manifest("manifests/tagged.json").split("train")) == 16
