"""The stages end to end on a tiny synthetic project, as `dvc repro` runs them (without DVC)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.params import load_params
from pipeline.core.store import ImageStore
from pipeline.data.manifest import load_manifest
from pipeline.method.mining import crf_made_from, masks_made_from
from pipeline.method.prune import PruneParams
from pipeline.train.refine import BACKGROUND_CANDIDATES
from stages import cams, classifier, data, deeplab, refine, segment
from tests.conftest import state_key, write_tiny_project
from tests.test_faults import weights_digest


def _metrics(name: str) -> dict:
    return json.loads(Path(f"scores/{name}.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder after the data, classifier and cams stages."""
    root = tmp_path_factory.mktemp("project")
    write_tiny_project(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        data.main(Path("params.yaml"))
        classifier.main(Path("params.yaml"))
        cams.main(Path("params.yaml"))
    return root


def test_classifier_writes_weights_and_validation_map(project, monkeypatch):
    monkeypatch.chdir(project)
    assert Path("checkpoints/classifier.pth").is_file()
    scores = _metrics("classifier")
    assert 0 <= scores["map"] <= 1 and set(scores["ap"]) == {"ant", "bee", "cat"}


def test_cams_store_holds_every_image_with_its_classes(project, monkeypatch):
    monkeypatch.chdir(project)
    store = ImageStore("artifacts/cams.zarr")
    assert store.is_complete() and len(store.complete_ids()) == 22
    manifest = json.loads(Path("manifests/synth.json").read_text())
    first = manifest["splits"]["train"][0]
    maps, attrs = store.read(first["id"])
    assert maps.dtype == np.float16 and maps.shape == (len(first["labels"]), 48, 48)
    assert attrs["classes"] == first["labels"]
    peaks = maps.reshape(len(maps), -1).max(axis=1)  # each map divided by its own maximum (0 stays 0)
    assert all(peak == 0 or abs(peak - 1) < 1e-3 for peak in peaks)
    scores = _metrics("cams")
    assert 0 < scores["miou"] <= 1 and 0 < scores["train"]["miou"] <= 1
    curve = json.loads(Path("plots/cams_threshold.json").read_text())
    assert [row["threshold"] for row in curve] == sorted(row["threshold"] for row in curve)


def test_rerunning_cams_skips_finished_images(project, monkeypatch):
    monkeypatch.chdir(project)
    store = ImageStore("artifacts/cams.zarr")
    before = {image_id: store.read(image_id)[0] for image_id in store.complete_ids()}
    calls = []
    monkeypatch.setattr(cams, "extract_cams", lambda *args, **kwargs: calls.append(args[2]))
    cams.main(Path("params.yaml"))
    assert calls == ["train", "val"]  # asked for both splits; the store already holds them
    assert {image_id: store.read(image_id)[0].tobytes() for image_id in before} == {
        image_id: maps.tobytes() for image_id, maps in before.items()}


@pytest.mark.parametrize("mode", ["staged", "end_to_end"])
def test_segment_trains_predicts_and_scores(project, monkeypatch, capsys, mode):
    monkeypatch.chdir(project)
    _write_masks_from_cams()
    write_tiny_project(Path("."), segment={"mode": mode})
    segment.main(Path("params.yaml"))
    # 48-pixel images at output stride 8: the miner's CAMs, 6 cells across, are too coarse
    warned = "warning: segment.mining_scales: at 1 the median image (48 pixels" in capsys.readouterr().err
    assert warned == (mode == "end_to_end")
    scores = _metrics("segment")
    assert scores["mode"] == mode and 0 <= scores["miou"] <= 1 and 0 <= scores["miou_no_crf"] <= 1
    assert scores["pseudo"]["scored_images"] == 16
    predictions = ImageStore("artifacts/pseudo.zarr")
    assert predictions.is_complete() and len(predictions.complete_ids()) == 16
    label, _ = predictions.read(predictions.complete_ids()[0])
    assert label.dtype == np.uint8 and label.shape == (48, 48) and label.max() <= 3


def test_refine_learns_affinities_walks_every_training_image_and_scores_it(project, monkeypatch):
    monkeypatch.chdir(project)
    _write_masks_from_cams()
    refine.main(Path("params.yaml"))
    store = ImageStore("artifacts/refined.zarr")
    assert store.is_complete() and len(store.complete_ids()) == 16
    manifest = load_manifest("manifests/synth.json")
    for item in manifest.split("train"):
        label, _ = store.read(item.id)
        assert label.dtype == np.uint8 and label.shape == (48, 48)
        assert set(np.unique(label)) <= {0, *(c + 1 for c in item.labels)}
    scores = _metrics("refine")
    assert 0 <= scores["miou"] <= 1 and scores["scored_images"] == 16 and scores["seconds"] > 0
    assert Path("checkpoints/refine.pth").is_file() and Path("checkpoints/refine.json").is_file()
    assert store.made_from["settings"]["refine.steps"] == 2


def test_a_rerun_of_a_finished_refine_stage_reports_its_threshold_without_walking_again(project, monkeypatch):
    monkeypatch.chdir(project)
    _write_masks_from_cams()
    refine.main(Path("params.yaml"))
    chosen = _metrics("refine")["bg_threshold"]
    for written in ("scores/refine.json", "metrics/refine.json"):
        Path(written).unlink()  # killed before its scores were written

    def walk_again(*args, **kwargs):
        raise AssertionError("walked a finished split again")

    monkeypatch.setattr(refine, "walk_split", walk_again)
    refine.main(Path("params.yaml"))
    assert _metrics("refine")["bg_threshold"] == chosen and chosen in BACKGROUND_CANDIDATES


def test_a_change_to_the_walk_s_settings_walks_again_without_training_again(project, monkeypatch):
    monkeypatch.chdir(project)
    _write_masks_from_cams()
    refine.main(Path("params.yaml"))
    trained, state = Path("checkpoints/refine.pth").read_bytes(), state_key("refine")
    try:
        write_tiny_project(Path("."), refine={"bg_threshold": 0.3, "crf": False})
        refine.main(Path("params.yaml"))
        assert state_key("refine") == state and Path("checkpoints/refine.pth").read_bytes() == trained
        assert _metrics("refine")["bg_threshold"] == 0.3
        assert ImageStore("artifacts/refined.zarr").made_from["settings"]["refine.crf"] is False
        write_tiny_project(Path("."), refine={"steps": 3})
        refine.main(Path("params.yaml"))
        assert state_key("refine") != state
    finally:
        write_tiny_project(Path("."))


def test_segment_and_deeplab_learn_from_the_labels_their_setting_names(project, monkeypatch):
    monkeypatch.chdir(project)
    _write_masks_from_cams()
    refine.main(Path("params.yaml"))
    write_tiny_project(Path("."), segment={"labels": "refined", "crf": False})
    segment.main(Path("params.yaml"))
    scores = _metrics("segment")
    assert scores["labels"] == "refined" and scores["test_tags"] == "predicted"
    assert 0 <= scores["miou_all_classes_no_crf"] <= 1 and 0 < scores["tag_threshold"] < 1
    record = json.loads(Path("checkpoints/segment.json").read_text())
    assert record["inputs"]["labels"] == ImageStore("artifacts/refined.zarr").fingerprint


def test_a_new_network_to_start_from_trains_anew_instead_of_resuming(project, monkeypatch):
    monkeypatch.chdir(project)
    _write_masks_from_cams()
    two_step = {"enabled": True, "labels": "masks", "crf": False, "weights": "checkpoints/segment.pth"}
    try:
        write_tiny_project(Path("."), segment={"crf": False}, deeplab=two_step)
        segment.main(Path("params.yaml"))
        deeplab.main(Path("params.yaml"))
        state, trained = state_key("deeplab"), weights_digest(Path("checkpoints/deeplab/model.pth"))
        write_tiny_project(Path("."), segment={"crf": False, "lr": 0.02}, deeplab=two_step)  # a tweak of the one-step
        segment.main(Path("params.yaml"))
        deeplab.main(Path("params.yaml"))  # its settings and labels are as before, its starting network is not
        assert state_key("deeplab") != state and weights_digest(Path("checkpoints/deeplab/model.pth")) != trained
    finally:
        write_tiny_project(Path("."))


def test_a_retagged_image_trains_the_classifier_anew_instead_of_resuming(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_project(tmp_path)
    data.main(Path("params.yaml"))
    classifier.main(Path("params.yaml"))
    state, trained = state_key("classifier"), weights_digest(Path("checkpoints/classifier.pth"))
    manifest = json.loads(Path("manifests/synth.json").read_text())
    first = manifest["splits"]["train"][0]
    first["labels"] = [label for label in range(len(manifest["classes"])) if label not in first["labels"]][:1]
    Path("manifests/synth.json").write_text(json.dumps(manifest))  # the user corrects one image's tags
    classifier.main(Path("params.yaml"))  # as many images, under the same names, with the same settings
    assert state_key("classifier") != state and weights_digest(Path("checkpoints/classifier.pth")) != trained


def _write_masks_from_cams() -> None:
    """Stand-in masks and CRF labels for the staged mode and the refine stage: CAM argmax with a
    background threshold, recorded as made by the prune stage's current settings (which the
    segment and refine stages check)."""
    cams_store, manifest = ImageStore("artifacts/cams.zarr"), load_manifest("manifests/synth.json")
    prune = load_params(PruneParams, "prune", Path("params.yaml"))
    ids = [item.id for item in manifest.split("train")]
    crf, maps, masks = (ImageStore(f"artifacts/{name}.zarr") for name in ("crf", "crfmaps", "masks"))
    for store in (crf, maps):
        made = crf_made_from(manifest, "train", prune, cams_store)
        store.reset_unless(made.fingerprint, made.as_json())
    made = masks_made_from(manifest, "train", prune, maps)
    masks.reset_unless(made.fingerprint, made.as_json())
    for image_id in ids:
        cams, attrs = cams_store.read(image_id)
        stacked = np.concatenate([np.full((1, *cams.shape[1:]), 0.3), cams]).argmax(0)
        labels = np.concatenate([[0], np.array(attrs["classes"]) + 1])[stacked].astype(np.uint8)
        maps.write(image_id, np.stack([labels, *np.ones((3, *labels.shape))]).astype(np.float32),
                   present=np.unique(stacked).tolist())
        crf.write(image_id, labels)
        masks.write(image_id, labels)
    for store in (crf, maps, masks):
        store.mark_complete(ids)
