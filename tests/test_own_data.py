"""Your own data, safely: tagged photos without masks go through every stage, and results made
from other data or other settings are never taken for the current ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main as rrm
from pipeline.core import provenance
from pipeline.core.errors import InputError
from pipeline.core.io import read_image, write_image
from pipeline.core.store import ImageStore
from pipeline.data.manifest import load_manifest
from pipeline.method.crf_runner import local_cluster
from pipeline.train import loop as training
from pipeline.train.segment import SegmentParams
from stages import cams, classifier, crf, data, deeplab, prune, segment, supervised
from tests.conftest import state_key, tiny_params
from tests.test_faults import weights_digest

PARAMS = tiny_params(dataset={"manifest": "manifests/tagged.json"}, segment={"crf": False},
                     deeplab={"enabled": True, "crf": False}, supervised={"enabled": True})
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
    """The crf stage on an in-process cluster, then the prune stage's rule."""
    with local_cluster(1, processes=False) as cluster:
        crf.main(params, scheduler=cluster.scheduler_address)
    prune.main(params)


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
    metrics = {name: json.loads(Path(f"scores/{name}.json").read_text())
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


@pytest.fixture
def project(tagged_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the finished tagged project to change, as the working folder."""
    copy = tmp_path / "project"
    shutil.copytree(tagged_project, copy)
    monkeypatch.chdir(copy)
    return copy


def set_params(section: str, **values: object) -> None:
    """Change ``values`` of a section of the working folder's params.yaml, as a user edits it."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params[section] = {**params.get(section, {}), **values}
    Path("params.yaml").write_text(yaml.safe_dump(params))


def first_train_id() -> str:
    return load_manifest("manifests/tagged.json").split("train")[0].id


def test_stores_made_from_other_images_under_the_same_ids_are_refused(project):
    manifest = load_manifest("manifests/tagged.json")
    image = manifest.image_path(first_train_id())
    write_image(image, 255 - read_image(image))  # another photo under the same id

    expected = ("artifacts/cams.zarr: was made from other images or tags than those of manifests/tagged.json "
                "(rerun the cams stage)")
    with pytest.raises(InputError) as error:
        run_prune(Path("params.yaml"))
    assert str(error.value) == expected
    shown = CliRunner().invoke(rrm, ["show", first_train_id()])
    assert shown.exit_code == 2 and shown.output == f"error: {expected}\n"
    stats = CliRunner().invoke(rrm, ["stats"])
    assert "was made from other images or tags" in stats.output

    with pytest.raises(InputError, match="classifier.pth: was made from other images or tags"):
        cams.main(Path("params.yaml"))  # the classifier learnt from the old photo too
    learnt = weights_digest(Path("checkpoints/classifier.pth"))
    classifier.main(Path("params.yaml"))
    assert weights_digest(Path("checkpoints/classifier.pth")) != learnt  # learnt anew, not resumed
    cams.main(Path("params.yaml"))  # the stage that owns the store redoes it
    run_prune(Path("params.yaml"))
    assert CliRunner().invoke(rrm, ["show", first_train_id()]).exit_code == 0


def test_masks_made_with_other_prune_settings_are_refused_by_the_segment_stage(project):
    set_params("prune", cam_quantile=0.5)
    with pytest.raises(InputError) as error:
        segment.main(Path("params.yaml"))
    stale = "was made with prune.cam_quantile=0.6, the params file has 0.5 (rerun the prune stage)"
    assert str(error.value) == f"artifacts/masks.zarr: {stale}"
    shown = CliRunner().invoke(rrm, ["show", first_train_id()])  # the other stages' panels are still drawn
    assert shown.exit_code == 0 and f"not shown: reliable: artifacts/masks.zarr: {stale}" in shown.output
    assert "reliable" not in shown.output.splitlines()[-1] and "segment" in shown.output.splitlines()[-1]


def test_pseudo_labels_of_another_segmentation_network_are_refused_by_the_deeplab_stage(project):
    set_params("segment", lr=0.002)
    with pytest.raises(InputError) as error:
        deeplab.main(Path("params.yaml"))
    assert str(error.value) == (f"artifacts/pseudo.zarr: was made with segment.lr={SegmentParams().lr!r}, "
                                "the params file has 0.002 (rerun the segment stage)")


def test_a_run_setting_changes_no_record(project):
    fingerprints = {name: ImageStore(f"artifacts/{name}.zarr").fingerprint for name in ("cams", "masks")}
    set_params("run", loader_workers=1, workers=2, chunk_size=3, inference_batch=2, batch_pixels=5000,
               checkpoint_every=1)

    cams.main(Path("params.yaml"))
    run_prune(Path("params.yaml"))
    segment.main(Path("params.yaml"))  # the masks are still those of the current settings
    assert {name: ImageStore(f"artifacts/{name}.zarr").fingerprint for name in fingerprints} == fingerprints


def test_an_edit_to_a_stage_s_code_makes_its_store_anew_and_its_readers_refuse_the_old_one(project, monkeypatch):
    identity = provenance.code_identity
    monkeypatch.setattr(provenance, "code_identity", lambda stage: "edited" if stage == "prune" else identity(stage))
    with pytest.raises(InputError) as error:
        segment.main(Path("params.yaml"))
    assert str(error.value) == ("artifacts/masks.zarr: was made by another version of its stage's code "
                                "(rerun the prune stage)")
    run_prune(Path("params.yaml"))  # what `dvc repro` runs after the edit: the masks are made anew, not kept
    masks = ImageStore("artifacts/masks.zarr")
    assert masks.made_from["code"] == "edited" and masks.is_complete()


def test_an_edit_to_a_stage_s_code_trains_anew_instead_of_resuming_its_state(project, monkeypatch):
    key, trained = state_key("classifier"), weights_digest(Path("checkpoints/classifier.pth"))
    identity = provenance.code_identity

    def edited(stage: str) -> str:
        return "edited" if stage == "classifier" else identity(stage)

    for module in (provenance, training):  # the records, the training state's key
        monkeypatch.setattr(module, "code_identity", edited)
    classifier.main(Path("params.yaml"))
    assert state_key("classifier") != key
    for module in (provenance, training):
        monkeypatch.setattr(module, "code_identity", identity)
    classifier.main(Path("params.yaml"))  # the code as it was: trained anew again, to the same weights
    assert state_key("classifier") == key and weights_digest(Path("checkpoints/classifier.pth")) == trained


def test_a_trial_with_its_own_root_leaves_the_default_run_untouched(project):
    def snapshot() -> dict[str, bytes]:
        return {str(path): path.read_bytes() for folder in ("checkpoints", "metrics", "plots", "artifacts")
                for path in sorted(Path(folder).rglob("*")) if path.is_file()}

    before = snapshot()
    trial = {**PARAMS, "storage": {"root": "trials/a"}, "classifier": {**PARAMS["classifier"], "steps": 2}}
    Path("trial.yaml").write_text(yaml.safe_dump(trial))
    for main in (classifier.main, cams.main):
        main(Path("trial.yaml"))
    run_prune(Path("trial.yaml"))

    assert snapshot() == before
    assert Path("trials/a/checkpoints/classifier.pth").is_file()
    assert ImageStore("trials/a/artifacts/masks.zarr").is_complete()
    report = CliRunner().invoke(rrm, ["report", "--params", "trial.yaml", "--json"])
    times = {row["label"]: row["status"] for row in json.loads(report.output)}
    assert times["Time: prune"] == "ok" and times["Time: segment"] == "not run"


def test_steps_0_evaluates_the_given_checkpoint_and_never_writes_an_untrained_network(project):
    trained = Path("checkpoints/classifier.pth").read_bytes()
    set_params("classifier", steps=0)
    with pytest.raises(InputError, match=r"steps=0 evaluates a trained `checkpoint`, and there is none"):
        classifier.main(Path("params.yaml"))
    assert Path("checkpoints/classifier.pth").read_bytes() == trained

    shutil.copy("checkpoints/classifier.pth", "given.pth")
    set_params("classifier", checkpoint="given.pth")
    classifier.main(Path("params.yaml"))
    assert weights_digest(Path("checkpoints/classifier.pth")) == weights_digest(Path("given.pth"))
    assert 0 <= json.loads(Path("metrics/classifier.json").read_text())["map"] <= 1


def write_flat(source: Path, target: Path) -> None:
    """``source``'s weights in PSA's and RRM's layout: their networks subclass the backbone, so
    its modules sit at the top level beside the heads (``conv1a...``, ``fc8``, ``fc8_seg_conv1``)."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    torch.save({key.removeprefix("backbone."): value for key, value in state.items()}, target)


def test_classifier_steps_0_gives_cams_straight_from_a_classifier_in_psa_s_layout(project):
    trained = weights_digest(Path("checkpoints/classifier.pth"))
    write_flat(Path("checkpoints/classifier.pth"), Path("res38_cls.pth"))
    shutil.rmtree("artifacts/cams.zarr")
    set_params("classifier", checkpoint="res38_cls.pth", steps=0)
    classifier.main(Path("params.yaml"))
    cams.main(Path("params.yaml"))
    assert weights_digest(Path("checkpoints/classifier.pth")) == trained
    assert len(ImageStore("artifacts/cams.zarr").complete_ids()) == 22


def test_segment_steps_0_predicts_and_scores_released_weights_without_the_classifier(project):
    write_flat(Path("checkpoints/segment.pth"), Path("rrm_final.pth"))
    before = weights_digest(Path("checkpoints/segment.pth"))
    for name in ("classifier.pth", "classifier.json"):  # nothing of the classifier stage is needed
        Path("checkpoints", name).unlink()
    set_params("segment", checkpoint="rrm_final.pth", steps=0)
    segment.main(Path("params.yaml"))
    assert weights_digest(Path("checkpoints/segment.pth")) == before
    metrics = json.loads(Path("scores/segment.json").read_text())
    assert metrics["train_seconds"] < 5 and metrics["pseudo"]["scored_images"] == 0
    assert json.loads(Path("checkpoints/segment.json").read_text())["inputs"]["checkpoint"]
    assert ImageStore("artifacts/pseudo.zarr").is_complete()
