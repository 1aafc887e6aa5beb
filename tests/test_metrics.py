import json
import math

import numpy as np
import pytest

from pipeline.core.io import IGNORE
from pipeline.method.metrics import (
    PartialLabelScore,
    SegmentationScore,
    average_precision,
    classification_scores,
    confusion_matrix,
    per_image_iou,
    write_metrics,
)

X = IGNORE
NAMES = ("background", "cat", "dog")

# Ground truth and prediction over labels 0..2; X pixels of the ground truth are not scored.
GT = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [0, X, X, 2],
    ],
    dtype=np.uint8,
)
PRED = np.array(
    [
        [0, 0, 1, 0],
        [0, 1, 1, 1],
        [0, 2, 2, 2],
    ],
    dtype=np.uint8,
)


def test_confusion_matrix_counts_gt_rows_and_skips_ignored_pixels():
    # gt 0 (5 px): 4 predicted 0, 1 predicted 1; gt 1 (4 px): 1 predicted 0, 3 predicted 1;
    # gt 2 (1 px): predicted 2; the two X pixels (predicted 2) are not counted.
    expected = np.array([[4, 1, 0], [1, 3, 0], [0, 0, 1]])
    confusion = confusion_matrix(GT, PRED, 3)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, expected)


def test_segmentation_score_iou_miou_and_accuracy():
    score = SegmentationScore(3)
    score.update(GT, PRED)
    # IoU = TP / (row + column - TP): background 4/(5+5-4) = 2/3, cat 3/(4+4-3) = 3/5, dog 1/(1+1-1) = 1
    np.testing.assert_allclose(score.iou(), [2 / 3, 3 / 5, 1.0])
    assert score.miou() == pytest.approx((2 / 3 + 3 / 5 + 1) / 3)
    # correct 4 + 3 + 1 = 8 of 10 counted pixels
    assert score.pixel_accuracy() == pytest.approx(0.8)


def test_label_absent_from_gt_and_prediction_is_nan_and_left_out_of_the_mean():
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    score = SegmentationScore(3)
    score.update(gt, pred)
    # background 1/(2+1-1) = 1/2, cat 2/(2+3-2) = 2/3, dog never seen
    iou = score.iou()
    assert math.isnan(iou[2])
    assert score.miou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert score.as_dict(NAMES) == {
        "miou": pytest.approx(7 / 12),
        "pixel_accuracy": pytest.approx(3 / 4),
        "iou": {"background": 0.5, "cat": pytest.approx(2 / 3), "dog": None},
    }
    json.dumps(score.as_dict(NAMES), allow_nan=False)


def test_label_only_predicted_counts_as_zero_iou():
    gt = np.zeros((2, 2), dtype=np.uint8)
    pred = np.array([[0, 0], [0, 2]])
    # background 3/(4+3-3) = 3/4, dog 0/(0+1-0) = 0, cat absent
    assert per_image_iou(gt, pred, 3) == pytest.approx((3 / 4 + 0) / 2)


def test_accumulating_two_images_equals_scoring_them_as_one():
    rng = np.random.default_rng(0)
    first_gt, second_gt = rng.integers(0, 4, (2, 6, 5)).astype(np.uint8)
    first_gt[0, :3] = IGNORE
    first_pred, second_pred = rng.integers(0, 4, (2, 6, 5))
    separate = SegmentationScore(4)
    separate.update(first_gt, first_pred)
    separate.update(second_gt, second_pred)
    joined = SegmentationScore(4)
    joined.update(np.hstack([first_gt, second_gt]), np.hstack([first_pred, second_pred]))
    np.testing.assert_array_equal(separate.confusion, joined.confusion)
    assert separate.miou() == joined.miou()
    # The data set mIoU weighs pixels, not images: it is not the mean of per-image mIoUs.
    per_image = [per_image_iou(first_gt, first_pred, 4), per_image_iou(second_gt, second_pred, 4)]
    assert separate.miou() != pytest.approx(np.mean(per_image))


def test_empty_score_is_nan_and_serialises_as_none():
    score = SegmentationScore(3)
    assert math.isnan(score.miou()) and math.isnan(score.pixel_accuracy())
    assert score.as_dict(NAMES)["miou"] is None


@pytest.mark.parametrize(
    ("gt", "pred", "message"),
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), "differ in shape"),
        (np.zeros((2, 2), int), np.full((2, 2), 3), r"prediction has values \[3\] outside 0..2$"),
        (np.zeros((2, 2), int), np.full((2, 2), IGNORE), r"prediction has values \[255\]"),
        (np.full((2, 2), 7), np.zeros((2, 2), int), r"ground truth has values \[7\] outside 0..2 and 255"),
        (np.zeros((2, 2), int), np.full((2, 2), -1), r"prediction has values \[-1\]"),
        (np.zeros((2, 2), int), np.zeros((2, 2)), "prediction must hold integer labels, not float64"),
    ],
)
def test_confusion_matrix_rejects_bad_inputs(gt, pred, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(gt, pred, 3)


def test_as_dict_needs_one_name_per_label():
    with pytest.raises(ValueError, match="2 label names given for 3 labels"):
        SegmentationScore(3).as_dict(NAMES[:2])


def test_partial_label_score_definitions():
    gt = np.array(
        [
            [0, 0, 0, 1],
            [1, 1, 1, 2],
            [2, X, X, 0],
        ],
        dtype=np.uint8,
    )
    pred = np.array(
        [
            [0, 0, X, 0],
            [1, 1, X, X],
            [1, 1, 0, X],
        ],
        dtype=np.uint8,
    )
    score = PartialLabelScore(3)
    score.update(gt, pred)
    # 10 valid pixels (gt != X); labelled among them: row 0: 3, row 1: 2, row 2: first pixel only -> 6.
    # correct: (0,0) (0,1) (1,0) (1,1) -> 4.
    assert score.precision() == pytest.approx(4 / 6)
    assert score.coverage() == pytest.approx(6 / 10)
    # labelled 0: (0,0) (0,1) correct, (0,3) wrong -> 2/3; labelled 1: (1,0) (1,1) correct,
    # (2,0) gt 2 -> 2/3; nothing labelled 2 -> NaN.
    np.testing.assert_allclose(score.class_precision(), [2 / 3, 2 / 3, np.nan])
    # gt 0: (0,0) (0,1) (0,2) (2,3) -> 2 labelled of 4; gt 1: (0,3) (1,0) (1,1) (1,2) -> 3 of 4;
    # gt 2: (1,3) (2,0) -> 1 of 2.
    np.testing.assert_allclose(score.class_coverage(), [2 / 4, 3 / 4, 1 / 2])
    # labelled with their own class: gt 0: 2 of 4; gt 1: 2 of 4; gt 2: 0 of 2.
    np.testing.assert_allclose(score.class_correct_coverage(), [2 / 4, 2 / 4, 0])
    assert score.as_dict(NAMES) == {
        "precision": pytest.approx(4 / 6),
        "coverage": pytest.approx(0.6),
        "per_class": {
            "background": {"precision": pytest.approx(2 / 3), "coverage": 0.5, "correct_coverage": 0.5},
            "cat": {"precision": pytest.approx(2 / 3), "coverage": 0.75, "correct_coverage": 0.5},
            "dog": {"precision": None, "coverage": 0.5, "correct_coverage": 0.0},
        },
    }


def test_partial_label_score_accumulates_and_rejects_out_of_range_predictions():
    score = PartialLabelScore(2)
    score.update(np.array([[0, 1]]), np.array([[0, X]]))
    score.update(np.array([[1, 1]]), np.array([[0, 1]]))
    # labelled 3 of 4, correct 2 of those 3
    assert score.coverage() == pytest.approx(3 / 4)
    assert score.precision() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"prediction has values \[2\] outside 0..1 and 255"):
        score.update(np.array([[0]]), np.array([[2]]))


def test_write_metrics_rounds_floats_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "metrics" / "cams.json"
    data = {"miou": np.float32(0.123456789), "count": np.int64(3), "iou": {"a": math.nan}, "xs": (1 / 3,)}
    write_metrics(path, data)
    assert json.loads(path.read_text()) == {
        "miou": 0.123457,
        "count": 3,
        "iou": {"a": None},
        "xs": [0.333333],
    }


def test_average_precision_by_hand():
    # ranked: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): precisions at the hits 1/1 and 2/3
    ap = average_precision(np.array([0.1, 0.9, 0.7, 0.8]), np.array([0, 1, 1, 0]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.5, 0.2]), np.array([0, 0])))


def test_classification_scores_skip_classes_without_positives():
    scores = np.array([[0.9, 0.2], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 0]])
    result = classification_scores(scores, targets, ["a", "b"])
    assert result == {"map": 1.0, "ap": {"a": 1.0, "b": None}}
