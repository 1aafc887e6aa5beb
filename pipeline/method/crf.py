"""The fully connected CRF (Krähenbühl and Koltun), shared by pruning and inference, with two
backends that compute one model:

- ``pydensecrf``: Krähenbühl's C++ code, one image at a time on one CPU core.
- ``torch``: the same mean field in PyTorch over batches of images of one size, on the CPU or a
  GPU (:mod:`pipeline.method.meanfield`). It follows pydensecrf step by step: the unary below; a
  Gaussian kernel on position ``(x / sxy, y / sxy)`` and a bilateral one on ``(x / sxy, y / sxy,
  r / srgb, g / srgb, b / srgb)``, each filtered on the permutohedral lattice of the occupied
  vertices (as pydensecrf builds it, :class:`~pipeline.method.lattice.Lattice` with
  ``extended=False``) and normalised symmetrically (``n_i = 1 / sqrt(K 1)_i``, the message ``n *
  K(n * Q)``); Potts compatibility (the message, times the kernel's weight, added to the
  negative unary); each iteration computes both messages from the same Q, then ``Q = softmax``.
  The lattice's vertices are found in float arithmetic of another order than pydensecrf's, so a
  pixel on the border of a lattice cell may fall on the other side: the marginals agree closely,
  not bit for bit (docs/scaling.md, "Dense CRF").

Which backend runs, and where (CPU processes, a dask cluster, batched on a GPU):
:mod:`pipeline.method.crf_runner`.

The unary is the negative log of the given scores, clipped to [``UNARY_CLIP``, 1] and *not*
renormalised: pruning feeds a background score and CAMs that do not sum to one, and RRM's
reference relies on exactly that unary (pydensecrf's ``unary_from_softmax`` with no scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from pipeline.core.params import check_choice, check_range

BACKENDS = ("pydensecrf", "torch")
"""The CRF's implementations (see the module's note); ``pydensecrf`` is the default."""

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
    ``backend`` (:data:`BACKENDS`) computes the model, it does not change it.
    """

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    backend: str = "pydensecrf"

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
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


def inference_crf(enabled: bool, backend: str) -> CRFParams | None:
    """The inference CRF computed by ``backend``, or None when it is off."""
    return replace(INFERENCE_CRF, backend=backend) if enabled else None


def check_inputs(image: np.ndarray, scores: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2] or scores.shape[0] < 1:
        raise ValueError(f"scores must be (K, {image.shape[0]}, {image.shape[1]}), K >= 1, got {scores.shape}")


def pydensecrf_marginals(image: np.ndarray, scores: np.ndarray, params: CRFParams) -> np.ndarray:
    """The marginals of :func:`pipeline.method.crf_runner.dense_crf` by pydensecrf, whatever ``params.backend`` says."""
    check_inputs(image, scores)
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


def same_size(images: Sequence[np.ndarray]) -> list[list[int]]:
    """The indices of ``images`` grouped by size (the torch backend's batches), in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape, []).append(index)
    return list(groups.values())
