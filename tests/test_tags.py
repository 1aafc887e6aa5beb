"""Where an image's tags are known (the training split), only background and its tagged classes may
be predicted: in the pseudo-labels, and in what the dense energy rewards while training. On val,
whose tags are unknown at test time, the classes the classifier predicts stand in for them, or
every class competes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.core.io import IGNORE
from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.method.cams import SCORES
from pipeline.method.crf import INFERENCE_CRF
from pipeline.method.losses import dense_energy
from pipeline.method.tags import choose_threshold, given_tags, predicted_tags, tag_recall, val_restrictions
from pipeline.train.predict import _batch_crf_labels, _crf_labels, infer_split, predict, restrict, tag_values
from pipeline.train.segnet import tag_mask

FAVOURITE = 1
"""The label the stand-in network below likes best everywhere: class 0, which no val image is tagged with."""

ONE = RunParams(workers=1)
"""One CRF process."""


def _favouring(label: int, classes: int):
    """Stand-in network: half the probability on ``label`` at every pixel, the rest spread evenly."""

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        probs = torch.full((n, classes + 1, h, w), 0.5 / classes)
        probs[:, label] = 0.5
        return probs

    return probabilities


TORCH_CRF = replace(INFERENCE_CRF, backend="torch")


@pytest.mark.parametrize("crf", [None, INFERENCE_CRF], ids=["no-crf", "crf"])
def test_a_training_split_prediction_never_holds_an_untagged_class(tiny_manifest, crf):
    probabilities = _favouring(FAVOURITE, tiny_manifest.num_classes)
    tags = given_tags(tiny_manifest, "train")
    predictions = list(predict(probabilities, tiny_manifest, "train", torch.device("cpu"), crf, tags, ONE,
                               progress=False, others={"tagged": tags}))
    assert [p.item.id for p in predictions] == [item.id for item in tiny_manifest.split("train")]
    for prediction in predictions:
        allowed = {0, *(c + 1 for c in prediction.item.labels)}
        for labels in (prediction.plain, prediction.refined, prediction.others["tagged"]):
            assert set(np.unique(labels)) <= allowed


def test_val_predictions_unrestricted_with_the_tagged_argmax_beside(tiny_manifest):
    probabilities = _favouring(FAVOURITE, tiny_manifest.num_classes)
    for prediction in predict(probabilities, tiny_manifest, "val", torch.device("cpu"), INFERENCE_CRF, None, ONE,
                              progress=False, others={"tagged": given_tags(tiny_manifest, "val")}):
        assert (prediction.plain == FAVOURITE).all() and (prediction.refined == FAVOURITE).all()
        assert FAVOURITE not in prediction.others["tagged"]


def test_val_predictions_restricted_to_predicted_tags_hold_only_those(tiny_manifest):
    probabilities = _favouring(FAVOURITE, tiny_manifest.num_classes)
    predicted = {item.id: np.eye(tiny_manifest.num_classes, dtype=np.float32)[2] for item in tiny_manifest.split("val")}
    for prediction in predict(probabilities, tiny_manifest, "val", torch.device("cpu"), INFERENCE_CRF, predicted,
                              ONE, progress=False, others={"all_classes": None}):
        for labels in (prediction.plain, prediction.refined):
            assert set(np.unique(labels)) <= {0, 3}
        assert (prediction.others["all_classes"] == FAVOURITE).all()


def test_restricted_scores_are_the_softmax_over_the_allowed_labels():
    logits = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    values = tag_values(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert values.tolist() == [0, 2, 4] and values.dtype == np.uint8
    expected = logits[values.astype(np.int64)].softmax(0).numpy()
    np.testing.assert_allclose(restrict(logits.softmax(0).numpy(), values), expected, rtol=1e-5)


def test_infer_split_scores_the_tag_restricted_argmax_as_a_diagnostic(tiny_manifest, tmp_path):
    store = ImageStore(tmp_path / "segment.zarr")
    store.reset_unless("test")
    predicted = given_tags(tiny_manifest, "val")
    scores = infer_split(_favouring(FAVOURITE, tiny_manifest.num_classes), tiny_manifest, "val", store,
                         torch.device("cpu"), None, ONE, None, {"predicted_tags": predicted}, progress=False)
    assert scores["miou_no_crf"] == scores["miou"] < scores["miou_tagged_no_crf"]
    assert scores["miou_predicted_tags_no_crf"] == scores["miou_tagged_no_crf"]
    assert store.is_complete()


def test_the_tag_threshold_is_the_highest_that_keeps_the_training_tags():
    tags = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.8], [0.3, 0.6], [0.4, 0.05]])
    assert tag_recall(scores, tags, 0.3) == 1.0  # an extra class (0.4 on the untagged image) costs no recall
    assert tag_recall(scores, tags, 0.35) == pytest.approx(3 / 4)
    assert choose_threshold(scores, tags) == 0.3  # every given tag kept; above it 0.3 is missed
    assert choose_threshold(scores, tags, recall=0.7) == 0.6
    assert choose_threshold(scores, tags, (0.95,)) == 0.95  # none keeps them: the lowest tried


def test_predicted_tags_come_from_the_classifier_scores_beside_the_cams(tiny_manifest, tmp_path):
    store = ImageStore(tmp_path / "cams.zarr")
    store.reset_unless("test")
    for items in tiny_manifest.splits.values():
        for item in items:
            scores = np.full(tiny_manifest.num_classes, 0.1)
            scores[list(item.labels)] = 0.9 if item.id != "im5" else 0.3  # the classifier misses im5's class
            store.write(item.id, np.zeros((1, 20, 24), np.float16), classes=list(item.labels),
                        **{SCORES: scores.tolist()})
    threshold, predicted = predicted_tags(store, tiny_manifest, "train", "val")
    assert 0.1 < threshold <= 0.9
    assert predicted["im4"].tolist() == given_tags(tiny_manifest, "val")["im4"].tolist()
    assert predicted["im5"].sum() == (1 if threshold <= 0.3 else 0)
    tags, others = val_restrictions("predicted", predicted)
    assert tags is predicted and others == {"all_classes": None}
    assert val_restrictions("none", predicted) == (None, {"predicted_tags": predicted})


def test_tag_mask_keeps_background_and_the_tagged_classes():
    tags = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert tag_mask(tags).tolist() == [[1, 0, 1, 0], [1, 1, 0, 1]]


@pytest.mark.parametrize("masked", [False, True])
def test_the_energy_on_tagged_labels_pushes_an_untagged_guess_down(masked):
    """One-coloured crop, nothing reliable, a network leaning to untagged class 2 everywhere: over all
    labels the energy rewards the whole crop for agreeing on it; over the tagged ones, it pushes it down."""
    logits = torch.zeros(1, 4, 8, 8)
    logits[:, 3] = 2.0
    logits.requires_grad_(True)
    probs = logits.softmax(1)
    if masked:
        probs = probs * tag_mask(torch.tensor([[1.0, 0.0, 0.0]]))[:, :, None, None]
    images = torch.full((1, 3, 8, 8), 120.0)
    energy = dense_energy(images, probs, torch.ones(1, 8, 8), torch.full((1, 8, 8), IGNORE), 15.0, 100.0, 1.0, "exact")
    energy.backward()
    untagged = logits.grad[:, 3].mean().item()
    assert (untagged > 0) if masked else (untagged < 0)  # descent lowers the untagged logit only when masked


@pytest.mark.parametrize("restricted", [False, True], ids=["every-class", "tagged"])
def test_crfs_batched_on_the_network_s_device_label_as_the_pool_does(tiny_manifest, restricted):
    items = tiny_manifest.split("train")[:3]
    rgb = torch.from_numpy(np.stack([tiny_manifest.read_image(item.id) for item in items]))
    labels = torch.zeros(len(items), tiny_manifest.num_classes)
    for row, item in enumerate(items):
        labels[row, list(item.labels)] = 1
    seeded = torch.Generator().manual_seed(0)
    probs = torch.rand(len(items), tiny_manifest.num_classes + 1, *rgb.shape[1:3], generator=seeded).softmax(1)

    batched = _batch_crf_labels(rgb, probs, TORCH_CRF, labels if restricted else None)

    every = np.arange(tiny_manifest.num_classes + 1, dtype=np.uint8)
    for row in range(len(items)):
        values = tag_values(labels[row]) if restricted else every
        scores = restrict(probs[row].numpy(), values) if restricted else probs[row].numpy()
        np.testing.assert_array_equal(batched[row], _crf_labels(rgb[row].numpy(), scores, TORCH_CRF, values))
