"""The fully connected CRF (Krähenbühl and Koltun) through pydensecrf, shared by pruning and inference.

The unary is the negative log of the given scores, clipped at ``UNARY_CLIP`` and *not*
renormalised: pruning feeds a background score and CAMs that do not sum to one, and RRM's
reference relies on exactly that unary (pydensecrf's ``unary_from_softmax`` with no scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from pipeline.core.params import check_range

UNARY_CLIP = 1e-5
"""Scores are clipped to at least this before ``-log``, so a zero score costs ``-log(1e-5)``."""


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be positive")


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and the two pairwise kernels.

    The Gaussian kernel acts on position alone (smoothness), the bilateral one on position and
    colour (appearance); ``sxy`` and ``srgb`` are their widths, ``compat`` their weights.
    """

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float

    def __post_init__(self) -> None:
        check_range("iterations", self.iterations, 1)
        _check_positive("gaussian_sxy", self.gaussian_sxy)
        check_range("gaussian_compat", self.gaussian_compat, 0)
        _check_positive("bilateral_sxy", self.bilateral_sxy)
        _check_positive("bilateral_srgb", self.bilateral_srgb)
        check_range("bilateral_compat", self.bilateral_compat, 0)


PRUNE_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=80.0,
    bilateral_srgb=13.0,
    bilateral_compat=10.0,
)
"""The CRF of reliable-region pruning (SPEC section 3)."""

INFERENCE_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=83.0,
    bilateral_srgb=5.0,
    bilateral_compat=4.0,
)
"""The optional CRF on segmentation predictions at inference (SPEC section 5)."""


def dense_crf(image: np.ndarray, scores: np.ndarray, params: CRFParams) -> np.ndarray:
    """Mean-field marginals Q, float32 (K, H, W), of a dense CRF on ``scores`` (K, H, W) over ``image``.

    ``image`` is uint8 (H, W, 3) RGB; ``scores`` are per-label scores in [0, 1] whose clipped
    negative log is the unary. Each pixel's marginals sum to one.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2] or scores.shape[0] < 1:
        raise ValueError(f"scores must be (K, {image.shape[0]}, {image.shape[1]}), K >= 1, got {scores.shape}")
    labels, height, width = scores.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(unary_from_softmax(scores, scale=None, clip=UNARY_CLIP))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image),
        compat=params.bilateral_compat,
    )
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(labels, height, width)
