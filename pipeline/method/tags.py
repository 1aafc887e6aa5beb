"""Tags for images whose tags are unknown (val at test time): the classes the classifier predicts.

The cams stage keeps, beside each image's CAMs, the classifier's probability of every class for
the whole image (:data:`~pipeline.method.cams.SCORES`). An image's predicted tags are the
classes whose probability reaches a threshold, and the threshold is chosen on the training
split, whose tags are known, never on a ground truth: the one that gives the best mean per-image
F1 between predicted and given tags (an image with neither counts as right), the middle one of
a run of equally good thresholds. A network trained on the training images is surer of them than
of new ones, so many thresholds tie there; the middle keeps away from both ends of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Manifest
from pipeline.method.cams import SCORES

THRESHOLDS = tuple(round(0.05 * step, 2) for step in range(1, 20))
"""The thresholds tried: 0.05 to 0.95."""

TEST_TAGS = ("predicted", "none")
"""How val predictions are restricted: to background and the classes the classifier predicts for
the image, or not at all (every class competes)."""


def image_scores(store: ImageStore, ids: Sequence[str]) -> np.ndarray:
    """(N, C) class probabilities of the images ``ids``, read from the CAM store's attributes."""
    rows = []
    for image_id in ids:
        _, attrs = store.read(image_id)
        if SCORES not in attrs:
            raise InputError(store.path, f"image {image_id!r} has no class scores (rerun the cams stage)")
        rows.append(attrs[SCORES])
    return np.asarray(rows, dtype=np.float64)


def mean_f1(scores: np.ndarray, tags: np.ndarray, threshold: float) -> float:
    """Mean over images of the F1 of the classes scored at least ``threshold`` against ``tags``
    (both (N, C)); an image with no tag and no predicted class scores 1."""
    predicted, given = scores >= threshold, tags > 0
    hits = (predicted & given).sum(axis=1)
    total = predicted.sum(axis=1) + given.sum(axis=1)
    return float(np.mean(np.where(total > 0, 2 * hits / np.maximum(total, 1), 1.0)))


def choose_threshold(scores: np.ndarray, tags: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """The threshold of ``thresholds`` (ascending) with the best :func:`mean_f1`; of a run of equal
    ones, the middle (the lower of two)."""
    f1 = np.array([mean_f1(scores, tags, threshold) for threshold in thresholds])
    best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
    return float(thresholds[best[(len(best) - 1) // 2]])


def predicted_tags(store: ImageStore, manifest: Manifest, train_split: str,
                   split: str) -> tuple[float, dict[str, np.ndarray]]:
    """The threshold chosen on ``train_split`` and the predicted multi-hot tags (C,) float32 of
    every image of ``split``, both from the CAM store's class scores."""
    train = manifest.split(train_split)
    threshold = choose_threshold(image_scores(store, [item.id for item in train]),
                                 np.stack([manifest.label_vector(item) for item in train]))
    ids = [item.id for item in manifest.split(split)]
    found = image_scores(store, ids) >= threshold
    return threshold, dict(zip(ids, found.astype(np.float32)))


def val_restrictions(test_tags: str, predicted: Mapping[str, np.ndarray]
                     ) -> tuple[Mapping[str, np.ndarray] | None, dict[str, Mapping[str, np.ndarray] | None]]:
    """How val is restricted under the setting ``test_tags`` (the ``predicted`` tags, or None:
    every class), and the other way, named, to score beside it as a diagnostic."""
    if test_tags == "predicted":
        return predicted, {"all_classes": None}
    return None, {"predicted_tags": predicted}


def given_tags(manifest: Manifest, split: str) -> dict[str, np.ndarray]:
    """The multi-hot tags (C,) float32 the manifest gives each image of ``split``."""
    return {item.id: manifest.label_vector(item) for item in manifest.split(split)}


def tag_scores(predicted: Mapping[str, np.ndarray], manifest: Manifest, split: str) -> dict[str, float]:
    """How well ``predicted`` tags match the manifest's for ``split``: mean per-image F1 and the
    share of images whose tags are predicted exactly."""
    given_by_id = given_tags(manifest, split)
    found = np.stack([predicted[image_id] for image_id in given_by_id])
    given = np.stack(list(given_by_id.values()))
    return {"f1": mean_f1(found, given, 0.5), "exact": float(np.mean(((found > 0) == (given > 0)).all(axis=1)))}
