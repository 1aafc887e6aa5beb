"""Scores of label masks against ground truth: IoU for dense masks, precision/coverage for partial ones.

Label values follow the manifest: 0 background, class index + 1 for a foreground class, and
``IGNORE`` (255) for pixels without a label. Ground-truth pixels equal to ``IGNORE`` (VOC's object
borders) are left out of every count. Scores accumulate confusion counts over images, so a score
over a data set weighs every pixel equally, as the VOC benchmark does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.io import IGNORE, write_json

DIGITS = 6
"""Decimal places kept in metrics files."""


def _check_labels(array: np.ndarray, num_labels: int, name: str, allow_ignore: bool) -> None:
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, not {array.dtype}")
    bad = (array < 0) | (array >= num_labels)
    if allow_ignore:
        bad &= array != IGNORE
    if bad.any():
        extra = f" and {IGNORE}" if allow_ignore else ""
        values = np.unique(array[bad]).tolist()
        raise ValueError(f"{name} has values {values} outside 0..{num_labels - 1}{extra}")


def _check_inputs(gt: np.ndarray, pred: np.ndarray, num_labels: int, pred_may_ignore: bool) -> None:
    if not 1 <= num_labels <= IGNORE:
        raise ValueError(f"num_labels={num_labels} must lie in 1..{IGNORE}")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    _check_labels(gt, num_labels, "ground truth", allow_ignore=True)
    _check_labels(pred, num_labels, "prediction", allow_ignore=pred_may_ignore)


def _count_pairs(gt: np.ndarray, pred: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) int64 counts of the (gt, pred) value pairs, both already in range."""
    flat = gt.astype(np.int64).ravel() * cols + pred.astype(np.int64).ravel()
    return np.bincount(flat, minlength=rows * cols).reshape(rows, cols)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_labels: int) -> np.ndarray:
    """int64 (L, L) pixel counts, row = ground-truth label, column = predicted label.

    Pixels where ``gt`` is ``IGNORE`` are not counted. Every prediction must be a label in
    ``0..L-1``; anything else (``IGNORE`` included) is a ValueError.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    _check_inputs(gt, pred, num_labels, pred_may_ignore=False)
    valid = gt != IGNORE
    return _count_pairs(gt[valid], pred[valid], num_labels, num_labels)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ``numerator / denominator`` as float64, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-label IoU ``TP / (TP + FP + FN)``; NaN for a label absent from both gt and prediction."""
    hits = np.diag(confusion)
    return _ratio(hits, confusion.sum(axis=0) + confusion.sum(axis=1) - hits)


def nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN values; NaN (without a warning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def per_image_iou(gt: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """mIoU of a single image, over the labels that occur in its ground truth or prediction."""
    return nanmean(iou_from_confusion(confusion_matrix(gt, pred, num_labels)))


def _json_float(value: float) -> float | None:
    """``value`` as a plain float, or None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else float(value)


def _check_names(label_names: Sequence[str], num_labels: int) -> None:
    if len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label names given for {num_labels} labels")


class SegmentationScore:
    """Intersection-over-union of dense predictions, accumulated over images::

        score = SegmentationScore(manifest.num_classes + 1)
        for gt, pred in pairs:
            score.update(gt, pred)
        write_metrics("metrics/segment.json", score.as_dict(manifest.label_names))
    """

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.confusion = np.zeros((num_labels, num_labels), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        self.confusion += confusion_matrix(gt, pred, self.num_labels)

    def iou(self) -> np.ndarray:
        """float64 (L,) IoU per label, NaN where the label occurred in neither gt nor prediction."""
        return iou_from_confusion(self.confusion)

    def miou(self) -> float:
        """Mean IoU over the labels that occurred (NaN before any pixel was counted)."""
        return nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly (NaN before any pixel was counted)."""
        return float(_ratio(np.trace(self.confusion), self.confusion.sum()))

    def as_dict(self, label_names: Sequence[str]) -> dict[str, Any]:
        """``{"miou", "pixel_accuracy", "iou": {name: IoU or None}}``, ready for JSON."""
        _check_names(label_names, self.num_labels)
        return {
            "miou": _json_float(self.miou()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "iou": {name: _json_float(v) for name, v in zip(label_names, self.iou(), strict=True)},
        }


class PartialLabelScore:
    """How trustworthy and how complete partial labels are (``IGNORE`` in the prediction = unlabelled).

    Only pixels with a valid ground truth (not ``IGNORE``) are counted. With "labelled" meaning
    the prediction is not ``IGNORE``:

    - ``precision`` = correct labelled pixels / labelled pixels;
    - ``coverage`` = labelled pixels / valid pixels;
    - per label ``c``: ``precision`` = pixels labelled ``c`` that are ``c`` in the ground truth /
      pixels labelled ``c``; ``coverage`` = ground-truth pixels of ``c`` that got any label /
      ground-truth pixels of ``c``; ``correct_coverage`` = ground-truth pixels of ``c`` labelled
      ``c`` / ground-truth pixels of ``c`` (the recall of ``c``, which coverage alone overstates
      when a class's pixels are labelled as another class).

    A ratio with nothing to count is NaN (None in :meth:`as_dict`).
    """

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        # Rows: ground truth; columns: predicted label, the last column counting unlabelled pixels.
        self.counts = np.zeros((num_labels, num_labels + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        gt, pred = np.asarray(gt), np.asarray(pred)
        _check_inputs(gt, pred, self.num_labels, pred_may_ignore=True)
        valid = gt != IGNORE
        columns = np.where(pred[valid] == IGNORE, self.num_labels, pred[valid])
        self.counts += _count_pairs(gt[valid], columns, self.num_labels, self.num_labels + 1)

    @property
    def _labelled(self) -> np.ndarray:
        """(L, L) counts of the labelled pixels: row = ground truth, column = given label."""
        return self.counts[:, : self.num_labels]

    def precision(self) -> float:
        return float(_ratio(np.trace(self._labelled), self._labelled.sum()))

    def coverage(self) -> float:
        return float(_ratio(self._labelled.sum(), self.counts.sum()))

    def class_precision(self) -> np.ndarray:
        return _ratio(np.diag(self._labelled), self._labelled.sum(axis=0))

    def class_coverage(self) -> np.ndarray:
        return _ratio(self._labelled.sum(axis=1), self.counts.sum(axis=1))

    def class_correct_coverage(self) -> np.ndarray:
        return _ratio(np.diag(self._labelled), self.counts.sum(axis=1))

    def as_dict(self, label_names: Sequence[str]) -> dict[str, Any]:
        """``{"precision", "coverage", "per_class": {name: {"precision", "coverage", "correct_coverage"}}}``,
        ready for JSON (None for NaN)."""
        _check_names(label_names, self.num_labels)
        per_class = zip(
            label_names,
            self.class_precision(),
            self.class_coverage(),
            self.class_correct_coverage(),
            strict=True,
        )
        return {
            "precision": _json_float(self.precision()),
            "coverage": _json_float(self.coverage()),
            "per_class": {
                name: {
                    "precision": _json_float(precision),
                    "coverage": _json_float(coverage),
                    "correct_coverage": _json_float(correct),
                }
                for name, precision, coverage, correct in per_class
            },
        }


def _rounded(data: Any) -> Any:
    """``data`` with every float rounded to ``DIGITS`` places, NaN as None, numpy scalars as Python ones."""
    if isinstance(data, Mapping):
        return {str(key): _rounded(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_rounded(value) for value in data]
    if isinstance(data, (bool, np.bool_)):
        return bool(data)
    if isinstance(data, (int, np.integer)):
        return int(data)
    if isinstance(data, (float, np.floating)):
        value = _json_float(float(data))
        return None if value is None else round(value, DIGITS)
    return data


def write_metrics(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a metrics JSON file (for DVC) atomically, floats rounded to ``DIGITS`` places."""
    write_json(path, _rounded(data))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve of one class (non-interpolated, as scikit-learn's).

    ``scores`` (N,) higher means more confident; ``targets`` (N,) 0/1. NaN without positives.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(targets, dtype=bool)[order]
    if not hits.any():
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at[hits].mean())


def classification_scores(scores: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Multi-label scores: ``map`` (mean over classes with positives) and ``ap`` per class."""
    ap = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    return {"map": _json_float(nanmean(ap)), "ap": {n: _json_float(v) for n, v in zip(class_names, ap)}}
