"""Tags for images whose tags are unknown (val at test time): the classes the classifier predicts.

The cams stage keeps, beside each image's CAMs, the classifier's probability of every class for
the whole image (:data:`~pipeline.method.cams.SCORES`). An image's predicted tags are the
classes whose probability reaches a threshold, and the threshold is chosen on the training
split, whose tags are known, never on a ground truth: the highest that still keeps
:data:`TAG_RECALL` of the given tags. The two ways of being wrong cost differently: a tag the
classifier misses takes its whole object from the prediction (it can only be called another
class or background), while a class it adds only competes with the others, as every class does
without the restriction. So the threshold is set for recall, not for the best F1 of the tags.
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

TAG_RECALL = 0.99
"""The share of the training split's given tags the chosen threshold keeps."""

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


def tag_recall(scores: np.ndarray, tags: np.ndarray, threshold: float) -> float:
    """The share of the given ``tags`` (N, C) whose ``scores`` (N, C) reach ``threshold``; 1 where
    no image is tagged."""
    given = tags > 0
    return float((given & (scores >= threshold)).sum() / given.sum()) if given.any() else 1.0


def choose_threshold(scores: np.ndarray, tags: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
                     recall: float = TAG_RECALL) -> float:
    """The highest of ``thresholds`` at which the :func:`tag_recall` of ``scores`` against ``tags``
    reaches ``recall``; the lowest threshold where none does."""
    kept = [threshold for threshold in thresholds if tag_recall(scores, tags, threshold) >= recall]
    return float(max(kept, default=min(thresholds)))


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
