"""The optional two-step stage, DeepLabV3 on the pseudo labels, and the supervised reference (the same
network on the ground truth), on a tiny synthetic project."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, write_mask
from pipeline.core.params import build_params, load_params
from pipeline.core.provenance import settings
from pipeline.core.registry import CAMS, DEEPLAB, PSEUDO, STAGES, SUPERVISED
from pipeline.core.store import StorageParams
from pipeline.data.manifest import load_manifest
from pipeline.train.deeplab import DeepLabParams, build_deeplab, deeplab_probabilities, pseudo_label_loss
from pipeline.train.predict import predictions_made_from
from pipeline.train.segment import SegmentParams
from stages import data, deeplab, supervised
from tests.conftest import state_key, tiny_params

PARAMS = tiny_params(data={"train_images": 8, "val_images": 4},
                     deeplab={"enabled": True, "steps": 3, "scales": [1.0, 0.5], "flip": True},
                     supervised={"enabled": True})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after the data stage, with pseudo labels standing in for the segment stage's:
    the ground truth with its left quarter unlabelled, recorded as made by a stand-in network;
    and a CAM store whose class scores (the val images' predicted tags) are the true tags."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        data.main(Path("params.yaml"))
        manifest = load_manifest("manifests/synth.json")
        pseudo = StorageParams().store(PSEUDO)
        segment_weights = Path("checkpoints/segment.pth")
        segment_weights.parent.mkdir(parents=True, exist_ok=True)
        segment_weights.write_bytes(b"a stand-in for the segment stage's network")
        segment = load_params(SegmentParams, "segment", Path("params.yaml"))
        made = predictions_made_from("segment", manifest, "train", settings("segment", segment), segment_weights)
        pseudo.reset_unless(made.fingerprint, made.as_json())
        for item in manifest.split("train"):
            label = manifest.read_mask(item).copy()
            label[:, : label.shape[1] // 4] = IGNORE
            pseudo.write(item.id, label)
        pseudo.mark_complete(item.id for item in manifest.split("train"))
        cams, every_item = StorageParams().store(CAMS), manifest.split("train") + manifest.split("val")
        for item in every_item:
            cams.write(item.id, np.zeros((0, 48, 48), dtype=np.float16), classes=[],
                       scores=manifest.label_vector(item).tolist())
        cams.mark_complete(item.id for item in every_item)
    return root


def test_stage_trains_predicts_every_val_image_and_scores(project, monkeypatch):
    monkeypatch.chdir(project)
    note = STAGES["deeplab"].weights.parent / deeplab.DISABLED_NOTE  # a disabled run's, not cleared by DVC
    note.parent.mkdir(parents=True)
    note.write_text("off")
    deeplab.main(Path("params.yaml"))
    assert STAGES["deeplab"].weights.is_file() and not note.exists()
    scores = json.loads(STAGES["deeplab"].scores_file.read_text())
    assert scores["enabled"] is True and scores["backbone"] == "small"
    assert 0 <= scores["miou"] <= 1 and 0 <= scores["miou_no_crf"] <= 1
    assert set(scores["iou"]) == {"background", "ant", "bee", "cat"}
    val_ids = [item["id"] for item in json.loads(Path("manifests/synth.json").read_text())["splits"]["val"]]
    predictions = StorageParams().store(DEEPLAB)
    assert predictions.is_complete() and sorted(predictions.complete_ids()) == sorted(val_ids)
    label, _ = predictions.read(val_ids[0])
    assert label.dtype == np.uint8 and label.shape == (48, 48) and label.max() <= 3


def test_disabled_stage_writes_only_its_marker_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data, no pseudo labels: nothing is read
    Path("params.yaml").write_text(yaml.safe_dump({"deeplab": {"enabled": False}}))
    deeplab.main(Path("params.yaml"))
    assert json.loads(STAGES["deeplab"].metrics_file.read_text()) == {"enabled": False}
    store = StorageParams().store(DEEPLAB)
    assert store.is_complete() and store.complete_ids() == []
    folder = STAGES["deeplab"].weights.parent
    assert [path.name for path in folder.iterdir()] == [deeplab.DISABLED_NOTE]  # DVC warns of an empty output folder
    assert "deeplab.enabled: false" in (folder / deeplab.DISABLED_NOTE).read_text()


def test_supervised_reference_trains_the_deeplab_recipe_on_the_ground_truth(project, monkeypatch):
    monkeypatch.chdir(project)
    supervised.main(Path("params.yaml"))
    scores = json.loads(STAGES["supervised"].scores_file.read_text())
    assert scores["enabled"] is True and scores["backbone"] == "small" and 0 <= scores["miou"] <= 1
    predictions = StorageParams().store(SUPERVISED)
    assert predictions.is_complete() and len(predictions.complete_ids()) == PARAMS["data"]["val_images"]
    state = torch.load(STAGES["supervised"].state, weights_only=False)
    assert state["step"] == PARAMS["deeplab"]["steps"]  # the deeplab section's schedule


def test_the_supervised_reference_trains_anew_after_a_training_mask_is_redrawn(project, monkeypatch):
    monkeypatch.chdir(project)
    supervised.main(Path("params.yaml"))
    state = state_key("supervised")
    manifest = load_manifest("manifests/synth.json")
    item = manifest.split("train")[0]
    path = manifest.mask_path(item.id)
    drawn = path.read_bytes()
    try:
        write_mask(path, np.zeros_like(manifest.read_mask(item)), manifest.palette)  # its object erased
        supervised.main(Path("params.yaml"))  # the same manifest file, settings and images
        assert state_key("supervised") != state
    finally:
        path.write_bytes(drawn)


def test_supervised_reference_is_off_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"deeplab": {"enabled": True}}))
    supervised.main(Path("params.yaml"))
    assert json.loads(STAGES["supervised"].metrics_file.read_text()) == {"enabled": False}
    assert StorageParams().store(SUPERVISED).is_complete()


def test_supervised_reference_needs_every_training_mask(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = json.loads((project / "manifests" / "synth.json").read_text())
    manifest["splits"]["train"][2]["mask"] = False
    manifest["images"]["dir"] = str(project / "data" / "synth" / "JPEGImages")
    manifest["masks"]["dir"] = str(project / "data" / "synth" / "SegmentationClass")
    Path("manifests").mkdir()
    Path("manifests/synth.json").write_text(json.dumps(manifest))
    (tmp_path / "params.yaml").symlink_to(project / "params.yaml")
    first = manifest["splits"]["train"][2]["id"]
    with pytest.raises(InputError, match=rf"synth\.json: 1 image\(s\) of split 'train' have no ground-truth mask .*"
                                         rf"e\.g\. '{first}'"):
        supervised.main(Path("params.yaml"))


def test_training_needs_the_segment_stage_pseudo_labels(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("params.yaml", "manifests", "data"):
        (tmp_path / name).symlink_to(project / name)
    with pytest.raises(InputError, match=r"pseudo\.zarr: incomplete store \(rerun the segment stage\)"):
        deeplab.main(Path("params.yaml"))


def test_multiscale_flip_inference_averages_probabilities_and_is_mirror_symmetric():
    torch.manual_seed(0)
    net = build_deeplab(DeepLabParams(backbone="small"), num_classes=3)
    probabilities = deeplab_probabilities(net, scales=(1.0, 0.75), flip=True)
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        probs, mirrored = probabilities(images), probabilities(images.flip(-1))
    assert probs.shape == (2, 4, 40, 56)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 40, 56))
    torch.testing.assert_close(mirrored, probs.flip(-1))


def test_pseudo_label_loss_averages_background_and_objects_apart_over_labelled_pixels_only():
    logits = torch.randn(1, 3, 2, 3)
    labels = torch.tensor([[[0, 0, 0], [2, 1, IGNORE]]])
    losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")[0]
    expected = (losses[0].mean() + losses[1, :2].mean()) / 2  # three background pixels weigh as much as two object ones
    torch.testing.assert_close(pseudo_label_loss(logits, labels), expected)
    background_only = torch.tensor([[[0, 0, 0], [IGNORE, IGNORE, IGNORE]]])
    torch.testing.assert_close(pseudo_label_loss(logits, background_only), losses[0].mean() / 2)
    assert pseudo_label_loss(logits, torch.full_like(labels, IGNORE)) == 0


def test_aspp_keeps_its_field_of_view_at_output_stride_16_and_needs_batches_of_two():
    net = build_deeplab(DeepLabParams(backbone="resnet50", output_stride=16), num_classes=20)
    assert [branch[0].dilation for branch in list(net.head[0].convs)[1:4]] == [(6, 6), (12, 12), (18, 18)]
    with pytest.raises(InputError, match=r"deeplab\]: parameter batch_size must be at least 2"):
        build_params(DeepLabParams, {"batch_size": 1}, "params.yaml [deeplab]")


def test_the_recipe_leaves_the_labels_to_the_targets_fingerprint():
    """Which labels the two-step learns is recorded as their store's fingerprint: the supervised
    reference, trained by the same recipe on the ground truth, keeps its network when they change."""
    refined = DeepLabParams(labels="refined")
    assert refined.recipe() == DeepLabParams(labels="pseudo").recipe()
    assert "deeplab.labels" not in refined.recipe() and refined.recipe()["deeplab.steps"] == refined.steps
