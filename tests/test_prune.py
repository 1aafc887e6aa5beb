"""Reliable-region pruning: known regions on drawn images, and the rule against a plain re-implementation."""

import math

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.core.params import build_params
from pipeline.method.prune import (
    PruneParams,
    background_score,
    label_reliable,
    prune_image,
    prune_images,
    reliable_regions,
)
from tests.conftest import synthetic_cams


def noisy(image: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image.astype(int) + rng.integers(-5, 6, image.shape), 0, 255).astype(np.uint8)


def bump(height: int, width: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """A max-normalised CAM: 1 at ``centre``, falling linearly to 0 at ``radius``."""
    yy, xx = np.mgrid[:height, :width]
    cam = np.clip(1.0 - np.hypot(yy - centre[0], xx - centre[1]) / radius, 0.0, 1.0)
    return (cam / cam.max()).astype(np.float32)


def test_an_object_keeps_the_top_of_its_cam_and_far_background():
    image = np.full((48, 48, 3), 30, dtype=np.uint8)
    image[12:36, 12:36] = (200, 60, 40)
    cam = bump(48, 48, (23.5, 23.5), 18.0)
    labels = reliable_regions(noisy(image), cam[None], np.array([6]))

    assert labels[21:27, 21:27].tolist() == np.full((6, 6), 7).tolist()  # the CAM's peak: class 6 + 1
    assert labels[12, 12] == 255 and labels[23, 8] == 255  # the CAM's fringe: unreliable
    assert labels[:5].tolist() == np.zeros((5, 48)).tolist()  # far from the object: background
    kept, above_floor = (labels == 7).sum(), (cam > 0.1).sum()
    assert 0 < kept <= math.ceil(0.4 * above_floor)
    assert cam[labels == 7].min() > np.sort(cam[cam > 0.1])[math.floor(0.6 * above_floor)]


def four_objects() -> tuple[np.ndarray, np.ndarray]:
    """A 64x64 image with four coloured squares in its quadrants, each under its own CAM bump."""
    image = np.full((64, 64, 3), 25, dtype=np.uint8)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    centres = [(16, 16), (16, 48), (48, 16), (48, 48)]
    cams = []
    for (y, x), colour in zip(centres, colours):
        image[y - 8 : y + 8, x - 8 : x + 8] = colour
        cams.append(bump(64, 64, (y - 0.5, x - 0.5), 11.0))
    return noisy(image), np.stack(cams)


def test_many_classes_each_keep_their_own_object():
    image, cams = four_objects()
    classes = np.array([0, 3, 11, 19])
    labels = reliable_regions(image, cams, classes)

    for (y, x), value in zip([(16, 16), (16, 48), (48, 16), (48, 48)], classes + 1):
        assert labels[y - 2 : y + 2, x - 2 : x + 2].tolist() == np.full((4, 4), value).tolist()
    assert labels[31:33, 31:33].tolist() == [[0, 0], [0, 0]]  # the gap between the objects
    assert set(np.unique(labels)) == {0, 255, *(classes + 1)}


def test_a_class_whose_cam_never_passes_the_floor_gets_no_pixels():
    image, cams = four_objects()
    silent = np.full((1, 64, 64), 0.05, dtype=np.float32)
    with_silent = reliable_regions(image, np.concatenate([cams, silent]), np.array([0, 3, 11, 19, 7]))

    assert not (with_silent == 8).any()
    assert {1, 4, 12, 20} <= set(np.unique(with_silent))


def test_cams_near_zero_leave_background_only_where_the_ha_score_is_sure():
    rng = np.random.default_rng(0)
    image = rng.integers(90, 110, (24, 32, 3)).astype(np.uint8)
    cams = np.tile(np.linspace(0.0, 0.05, 32, dtype=np.float32), (24, 1))[None]
    labels = reliable_regions(image, cams, np.array([2]))

    assert set(np.unique(labels)) == {0, 255}
    np.testing.assert_array_equal(labels == 0, background_score(cams, 32.0) > 0.8)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_tiny_images(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
    cams = rng.random((2, *shape)).astype(np.float32)
    cams /= cams.max(axis=(1, 2), keepdims=True)
    labels = reliable_regions(image, cams, np.array([4, 9]))

    assert labels.shape == shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 5, 10, 255}


def random_case(seed: int, k: int, height: int = 11, width: int = 13) -> tuple:
    """Random CAMs and CRF marginals; stacked label 2 is made too weak to win in ``la``."""
    rng = np.random.default_rng(seed)
    cams = rng.random((k, height, width)).astype(np.float32) ** 2
    cams /= cams.max(axis=(1, 2), keepdims=True)
    la_probs = rng.dirichlet(np.full(k + 1, 0.2), (height, width)).transpose(2, 0, 1).astype(np.float32)
    if k >= 2:
        la_probs[2] *= 0.01
    ha_probs = rng.dirichlet(np.full(k + 1, 0.3), (height, width)).transpose(2, 0, 1).astype(np.float32)
    classes = rng.choice(20, size=k, replace=False)
    return cams, classes, la_probs, ha_probs


def plain_rule(cams, classes, la_probs, ha_probs, p: PruneParams) -> np.ndarray:
    """SPEC section 3 after the CRF, written pixel by pixel."""
    k, height, width = cams.shape
    pixels = [(y, x) for y in range(height) for x in range(width)]

    def argmax(values):
        best = 0
        for i, v in enumerate(values):
            if v > values[best]:
                best = i
        return best

    def bg(y, x):
        return (1.0 - max(cams[c, y, x] for c in range(k))) ** p.ha_alpha

    la_label = {q: argmax(la_probs[:, q[0], q[1]]) for q in pixels}
    ha_label = {q: argmax(ha_probs[:, q[0], q[1]]) for q in pixels}
    cam_label = {q: argmax([bg(*q)] + [cams[c, q[0], q[1]] for c in range(k)]) for q in pixels}

    sure = set()
    for label in set(la_label.values()):
        region = [q for q in pixels if cam_label[q] == label]
        if label == 0:
            sure |= {q for q in region if bg(*q) > p.bg_threshold}
            continue
        values = sorted(cams[label - 1, y, x] for y, x in region if cams[label - 1, y, x] > p.cam_floor)
        if values:
            threshold = values[math.floor(p.cam_quantile * len(values))]
            sure |= {(y, x) for y, x in region if cams[label - 1, y, x] > threshold}

    out = np.full((height, width), 255, dtype=np.uint8)
    for y, x in pixels:
        crf_sure = max([ha_probs[0, y, x]] + [la_probs[i, y, x] for i in range(1, k + 1)]) >= p.crf_confidence
        if (y, x) not in sure or not crf_sure:
            continue
        if ha_label[(y, x)] == 0:
            out[y, x] = 0
        elif la_label[(y, x)] != 0:
            out[y, x] = classes[la_label[(y, x)] - 1] + 1
    return out


@pytest.mark.parametrize(
    ("seed", "k", "params"),
    [
        (0, 1, PruneParams()),
        (1, 3, PruneParams()),
        (2, 5, PruneParams()),
        (3, 4, PruneParams(cam_floor=0.3, cam_quantile=0.25, bg_threshold=0.5, crf_confidence=0.4, ha_alpha=8)),
        (4, 6, PruneParams(cam_floor=0.0, cam_quantile=0.9, bg_threshold=0.1, crf_confidence=0.3, ha_alpha=2)),
    ],
)
def test_the_rule_matches_a_plain_re_implementation(seed, k, params):
    cams, classes, la_probs, ha_probs = random_case(seed, k)
    expected = plain_rule(cams, classes, la_probs, ha_probs, params)
    labels = label_reliable(cams, classes, la_probs, ha_probs, params)

    np.testing.assert_array_equal(labels, expected)
    assert (expected != 255).any()


def test_a_class_absent_from_la_label_adds_no_sure_pixels():
    cams, classes, la_probs, ha_probs = random_case(5, 3)
    ha_probs[0] = 0.0
    ha_probs[2] = 1.0  # ha puts class 2 everywhere; la never does
    la_probs[1] = 1.0  # la puts class 1 everywhere, with full confidence
    labels = label_reliable(cams, classes, la_probs, ha_probs, PruneParams())

    cam_label = np.concatenate([background_score(cams, 32.0)[None], cams]).argmax(axis=0)
    assert set(np.unique(labels[cam_label == 2])) == {255}
    assert (labels[cam_label == 1] == classes[0] + 1).any()


def test_a_quantile_of_one_keeps_no_foreground():
    cams, classes, la_probs, ha_probs = random_case(6, 3)
    labels = label_reliable(cams, classes, la_probs, ha_probs, PruneParams(cam_quantile=1.0))
    assert set(np.unique(labels)) <= {0, 255}


def test_the_result_is_deterministic_and_prune_image_takes_the_typed_params():
    image, cams = four_objects()
    classes = np.array([1, 2, 5, 8])
    first = reliable_regions(image, cams, classes, la_alpha=3.0)
    np.testing.assert_array_equal(first, reliable_regions(image, cams, classes, la_alpha=3.0))
    np.testing.assert_array_equal(first, prune_image(image, cams, classes, PruneParams(la_alpha=3.0)))


def test_parameters_default_to_the_paper_and_are_range_checked():
    assert PruneParams() == PruneParams(
        la_alpha=4, ha_alpha=32, cam_floor=0.1, cam_quantile=0.6, bg_threshold=0.8, crf_confidence=0.8,
        crf_iterations=10, crf_gaussian_sxy=3, crf_gaussian_compat=3,
        crf_bilateral_sxy=80, crf_bilateral_srgb=13, crf_bilateral_compat=10, crf_backend="pydensecrf",
    )  # fmt: skip
    with pytest.raises(ValueError, match="cam_quantile"):
        PruneParams(cam_quantile=1.5)
    with pytest.raises(ValueError, match="ha_alpha"):
        PruneParams(ha_alpha=-1.0)
    with pytest.raises(ValueError, match="crf_bilateral_sxy"):
        PruneParams(crf_bilateral_sxy=0.0)
    with pytest.raises(ValueError, match="crf_backend='gpu' is not one of pydensecrf, torch"):
        PruneParams(crf_backend="gpu")
    with pytest.raises(InputError, match=r"params.yaml \[prune\]: parameter crf_iterations"):
        build_params(PruneParams, {"crf_iterations": 0}, "params.yaml [prune]")


def test_an_unknown_parameter_is_a_type_error():
    image, cams = four_objects()
    with pytest.raises(TypeError, match="alpha_la"):
        reliable_regions(image, cams, np.arange(4), alpha_la=4.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda image, cams, classes: (image, cams[:, :-1], classes), "cams must be"),
        (lambda image, cams, classes: (image, cams, classes[:3]), "one class index per CAM"),
        (lambda image, cams, classes: (image, cams[:0], classes[:0]), "at least one class"),
        (lambda image, cams, classes: (image.astype(np.float32), cams, classes), "image must be uint8"),
        (lambda image, cams, classes: (image, cams * 2.0, classes), "max-normalised"),
        (lambda image, cams, classes: (image, cams, classes.astype(float)), "integer"),
        (lambda image, cams, classes: (image, cams, np.array([0, 1, 1, 2])), "distinct"),
    ],
    ids=["size", "count", "empty", "image-dtype", "not-normalised", "float-classes", "repeated"],
)
def test_bad_inputs_are_value_errors(change, message):
    image, cams = four_objects()
    with pytest.raises(ValueError, match=message):
        reliable_regions(*change(image, cams, np.arange(4)))


def test_the_torch_backend_finds_the_regions_pydensecrf_finds():
    cases = [synthetic_cams(index) for index in range(8)]
    expected = [reliable_regions(*case) for case in cases]
    found = [reliable_regions(*case, crf_backend="torch") for case in cases]

    agree = sum((mask == own).sum() for mask, own in zip(found, expected)) / sum(mask.size for mask in expected)
    assert agree >= 0.99
    assert sum((mask != 255).sum() for mask in expected) > 0.2 * sum(mask.size for mask in expected)


def test_prune_images_batches_images_of_one_size_as_they_come_alone():
    cases = [synthetic_cams(index) for index in range(4)]
    cases[1] = (cases[1][0][:80], cases[1][1][:, :80], cases[1][2])  # a size of its own
    params = PruneParams(crf_backend="torch")

    masks = prune_images(*zip(*cases), params)

    for mask, case in zip(masks, cases, strict=True):
        np.testing.assert_array_equal(mask, prune_image(*case, params))
