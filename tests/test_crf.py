"""The dense CRF: marginals of pydensecrf with the un-renormalised ``-log`` unary, and the torch
backend computing the same model in batches."""

from dataclasses import replace

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch

from pipeline.method.crf import BACKENDS, INFERENCE_CRF, PRUNE_CRF, CRFParams
from pipeline.method.crf_runner import dense_crf
from pipeline.method.meanfield import batch_crf
from pipeline.method.prune import stack_scores
from tests.conftest import synthetic_cams


def two_region_image(height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    image[:, width // 2 :] = (210, 80, 30)
    return np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


def random_scores(labels: int, height: int = 24, width: int = 32) -> np.ndarray:
    """Scores in [0, 1] that do not sum to one per pixel, some exactly zero."""
    rng = np.random.default_rng(1)
    scores = rng.random((labels, height, width)).astype(np.float32)
    scores[scores < 0.1] = 0.0
    return scores


SMOOTHNESS = dict(iterations=10, gaussian_sxy=3, gaussian_compat=3)
"""The settings both of the spec's CRFs share."""


def direct_marginals(image: np.ndarray, scores: np.ndarray, settings: dict) -> np.ndarray:
    """pydensecrf called by hand, the unary written out as -log(max(score, 1e-5))."""
    labels, height, width = scores.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    unary = -np.log(np.maximum(scores, 1e-5)).reshape(labels, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=settings["gaussian_sxy"], compat=settings["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=settings["bilateral_sxy"],
        srgb=settings["bilateral_srgb"],
        rgbim=image,
        compat=settings["bilateral_compat"],
    )
    return np.asarray(crf.inference(settings["iterations"])).reshape(labels, height, width)


def test_marginals_sum_to_one_per_pixel():
    marginals = dense_crf(two_region_image(), random_scores(3), PRUNE_CRF)
    assert marginals.dtype == np.float32
    assert marginals.shape == (3, 24, 32)
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-5)
    assert marginals.min() >= 0.0


@pytest.mark.parametrize(
    ("params", "settings"),
    [
        (PRUNE_CRF, SMOOTHNESS | dict(bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10)),
        (INFERENCE_CRF, SMOOTHNESS | dict(bilateral_sxy=83, bilateral_srgb=5, bilateral_compat=4)),
    ],
    ids=["prune", "inference"],
)
def test_matches_a_direct_pydensecrf_call_with_the_spec_settings(params, settings):
    image, scores = two_region_image(), random_scores(4)
    expected = direct_marginals(image, scores, settings)
    np.testing.assert_allclose(dense_crf(image, scores, params), expected, atol=1e-6)


def test_scores_are_not_renormalised():
    image, scores = two_region_image(), random_scores(3)
    renormalised = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-5)
    marginals = dense_crf(image, scores, PRUNE_CRF)
    assert not np.allclose(marginals, dense_crf(image, renormalised, PRUNE_CRF), atol=1e-3)


def test_a_non_contiguous_image_gives_the_same_marginals():
    image, scores = two_region_image(), random_scores(2)
    flipped = image[:, ::-1]
    expected = dense_crf(np.ascontiguousarray(flipped), scores, PRUNE_CRF)
    np.testing.assert_array_equal(dense_crf(flipped, scores, PRUNE_CRF), expected)


def test_the_pairwise_terms_follow_colour_edges():
    """A weak, noisy preference inside each half is smoothed to that half's majority label."""
    image = two_region_image()
    rng = np.random.default_rng(2)
    left = np.zeros((24, 32), dtype=bool)
    left[:, :16] = True
    scores = np.where(left, 0.6, 0.4)[None].repeat(2, axis=0).astype(np.float32)
    scores[1] = 1.0 - scores[0]
    flipped = rng.random((24, 32)) < 0.2
    scores[:, flipped] = scores[::-1][:, flipped]
    labels = dense_crf(image, scores, PRUNE_CRF).argmax(axis=0)
    np.testing.assert_array_equal(labels, np.where(left, 0, 1))


def test_bad_settings_and_shapes_are_errors():
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(0, 3.0, 3.0, 80.0, 13.0, 10.0)
    with pytest.raises(ValueError, match="bilateral_srgb"):
        CRFParams(10, 3.0, 3.0, 80.0, 0.0, 10.0)
    with pytest.raises(ValueError, match="scores"):
        dense_crf(two_region_image(), random_scores(2, 24, 30), PRUNE_CRF)
    with pytest.raises(ValueError, match="image"):
        dense_crf(two_region_image().astype(np.float32), random_scores(2), PRUNE_CRF)


def synthetic_case(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A default `rrm synth` training image and the scores pruning feeds its CRFs: background
    (alpha 4) and the CAM-like maps of :func:`synthetic_cams` (they do not sum to one)."""
    image, cams, _ = synthetic_cams(index)
    return image, stack_scores(cams, 4.0)


@pytest.mark.parametrize("params", [PRUNE_CRF, INFERENCE_CRF], ids=["prune", "inference"])
@pytest.mark.parametrize("case", ["two regions", "synthetic"])
def test_the_torch_backend_computes_pydensecrf_s_model(params, case):
    image, scores = (two_region_image(), random_scores(3)) if case == "two regions" else synthetic_case(3)
    expected = dense_crf(image, scores, params)
    marginals = dense_crf(image, scores, replace(params, backend="torch"))

    assert marginals.dtype == np.float32 and marginals.shape == expected.shape
    assert np.abs(marginals - expected).mean() < 1e-5
    assert (marginals.argmax(axis=0) == expected.argmax(axis=0)).mean() >= 0.999


def test_a_batch_holds_each_image_s_crfs_as_if_run_alone():
    cases = [synthetic_case(index) for index in range(3)]
    assert len({scores.shape[0] for _, scores in cases}) > 1, "padding is tested"
    labels = max(scores.shape[0] for _, scores in cases)
    images = torch.from_numpy(np.stack([image for image, _ in cases]))
    scores = torch.zeros(3, 2, labels, *images.shape[1:3])
    valid = torch.zeros(3, labels, dtype=torch.bool)
    for row, (_, own) in enumerate(cases):
        scores[row, 0, : len(own)] = torch.from_numpy(own)
        scores[row, 1, : len(own)] = torch.from_numpy(own[::-1].copy())
        valid[row, : len(own)] = True

    batched = batch_crf(images, scores, PRUNE_CRF, valid)

    for row, (_, own) in enumerate(cases):
        alone = batch_crf(images[row : row + 1], scores[row : row + 1, :, : len(own)], PRUNE_CRF)[0]
        torch.testing.assert_close(batched[row, :, : len(own)], alone, atol=1e-6, rtol=0)
        assert not batched[row, :, len(own) :].any()


def test_backends_are_named_and_checked():
    assert BACKENDS == ("pydensecrf", "torch")
    with pytest.raises(ValueError, match="backend='cuda' is not one of pydensecrf, torch"):
        replace(PRUNE_CRF, backend="cuda")
