"""The fully connected CRF (Krähenbühl and Koltun), shared by pruning and inference, with two
backends that compute one model:

- ``pydensecrf``: Krähenbühl's C++ code, one image at a time on one CPU core.
- ``torch``: the same mean field in PyTorch over batches of images of one size, on the CPU or a
  GPU. It follows pydensecrf step by step: the unary below; a Gaussian kernel on position
  ``(x / sxy, y / sxy)`` and a bilateral one on ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)``,
  each filtered on the permutohedral lattice of the occupied vertices (as pydensecrf builds it,
  :class:`~pipeline.method.lattice.Lattice` with ``extended=False``) and normalised
  symmetrically (``n_i = 1 / sqrt(K 1)_i``, the message ``n * K(n * Q)``); Potts compatibility
  (the message, times the kernel's weight, added to the negative unary); each iteration computes
  both messages from the same Q, then ``Q = softmax``. The lattice's vertices are found in float
  arithmetic of another order than pydensecrf's, so a pixel on the border of a lattice cell may
  fall on the other side: the marginals agree closely, not bit for bit (README "Dense CRF").

The unary is the negative log of the given scores, clipped to [``UNARY_CLIP``, 1] and *not*
renormalised: pruning feeds a background score and CAMs that do not sum to one, and RRM's
reference relies on exactly that unary (pydensecrf's ``unary_from_softmax`` with no scale).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax
from torch import Tensor

from pipeline.core.params import check_choice, check_range
from pipeline.method.lattice import Lattice

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


def _check_inputs(image: np.ndarray, scores: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2] or scores.shape[0] < 1:
        raise ValueError(f"scores must be (K, {image.shape[0]}, {image.shape[1]}), K >= 1, got {scores.shape}")


def dense_crf(image: np.ndarray, scores: np.ndarray, params: CRFParams) -> np.ndarray:
    """Mean-field marginals Q, float32 (K, H, W), of a dense CRF on ``scores`` (K, H, W) over ``image``.

    ``image`` is uint8 (H, W, 3) RGB; ``scores`` are per-label scores in [0, 1] whose clipped
    negative log is the unary. Each pixel's marginals sum to one. By ``params.backend``; the
    torch backend on the CPU here (:func:`batch_crf` takes batches and devices).
    """
    _check_inputs(image, scores)
    if params.backend == "torch":
        scores_t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None, None]
        return batch_crf(torch.from_numpy(np.ascontiguousarray(image))[None], scores_t, params)[0, 0].numpy()
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


@dataclass(frozen=True)
class Kernel:
    """One pairwise term over a batch of images: its lattice, symmetric normaliser (N, P, 1) and weight."""

    lattice: Lattice
    norm: Tensor
    weight: float

    @classmethod
    def build(cls, features: Tensor, weight: float) -> Kernel:
        lattice = Lattice.build(features, extended=False)
        ones = features.new_ones(features.shape[:2] + (1,))
        return cls(lattice, (lattice.filter(ones) + 1e-20).rsqrt(), weight)

    def message(self, q: Tensor) -> Tensor:
        """``weight * n * K(n * q)`` for ``q`` (N, P, L)."""
        return self.weight * self.norm * self.lattice.filter(self.norm * q)


def kernels(images: Tensor, params: CRFParams) -> tuple[Kernel, Kernel]:
    """The Gaussian and bilateral kernels of ``images`` (N, H, W, 3), uint8, on their device."""
    n, height, width, _ = images.shape
    rows, cols = torch.meshgrid(torch.arange(height, device=images.device, dtype=torch.float32),
                                torch.arange(width, device=images.device, dtype=torch.float32), indexing="ij")
    position = torch.stack([cols, rows], dim=-1).reshape(1, height * width, 2).expand(n, -1, -1)
    colour = images.reshape(n, height * width, 3).float()
    bilateral = torch.cat([position / params.bilateral_sxy, colour / params.bilateral_srgb], dim=-1)
    return (Kernel.build(position / params.gaussian_sxy, params.gaussian_compat),
            Kernel.build(bilateral, params.bilateral_compat))


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the last axis, written out: over a few labels per pixel this is faster on the
    CPU than ``Tensor.softmax``'s kernel. A label at ``-inf`` gets 0."""
    q = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return q.div_(q.sum(dim=-1, keepdim=True))


def batch_crf(images: Tensor, scores: Tensor, params: CRFParams, valid: Tensor | None = None) -> Tensor:
    """The ``torch`` backend: marginals (N, G, K, H, W) of G CRFs on each of N images of one size.

    ``images`` uint8 (N, H, W, 3) RGB; ``scores`` (N, G, K, H, W) on the same device, G sets of
    per-label scores per image sharing its kernels (pruning's two CRFs); ``valid`` (N, G, K) or
    (N, K) bool, False for a label that is padding (an image with fewer labels than K): its
    marginal is 0 and it takes no part.
    """
    n, groups, labels, height, width = scores.shape
    if images.shape != (n, height, width, 3) or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 ({n}, {height}, {width}, 3), got {images.dtype} {tuple(images.shape)}")
    terms = kernels(images, params)
    logits = scores.float().clamp(UNARY_CLIP, 1.0).log().reshape(n, groups, labels, -1).permute(0, 3, 1, 2).contiguous()
    if valid is not None:
        mask = (valid if valid.dim() == 3 else valid[:, None, :].expand(n, groups, labels))[:, None]
        logits = logits.masked_fill(~mask, -torch.inf)
    q = _softmax(logits)
    for _ in range(params.iterations):
        flat = q.reshape(n, height * width, groups * labels)
        messages = sum(term.message(flat) for term in terms).reshape(q.shape)
        q = _softmax(logits + messages)
    return q.permute(0, 2, 3, 1).reshape(n, groups, labels, height, width)
