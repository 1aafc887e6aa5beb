"""The segmentation branch's losses: balanced cross-entropy on reliable pixels, and the dense energy.

The dense energy (Tang et al., "On Regularized Losses for Weakly-supervised CNN Segmentation",
ECCV 2018, as gated in RRM) is a dense CRF's pairwise term, ``-sum_i g_i sum_k S_ik (W S)_ik``
with the bilateral kernel

    W_ij = exp(-|p_i - p_j|^2 / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2))

over all pairs of pixels (i = j included, unnormalised), p the (row, col) position and I the RGB
colour. With features ``f = [p / sigma_xy, I / sigma_rgb]``, ``W_ij = exp(-|f_i - f_j|^2 / 2)``.
Three filters compute ``W @ values``:

- exact, blockwise (CPU): rows of W a block at a time, O(pixels x block) memory, O(pixels^2)
  time;
- exact, fused attention (GPU): ``scaled_dot_product_attention`` computes
  ``sum_j exp(q_i . k_j) v_j`` normalised by its row sum in O(pixels) memory; see
  :func:`bilateral_filter_sdpa` for how the kernel and its row sum are recovered;
- permutohedral lattice (:mod:`pipeline.method.lattice`), O(pixels), for large images on a CPU:
  an approximation of the exact sum, calibrated to its mean (docs/method-notes.md, "Measurements behind the
  design", has its accuracy and the costs of the three).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.io import IGNORE
from pipeline.core.params import check_choice, check_range
from pipeline.method.lattice import permutohedral_filter
from pipeline.models.nets import REFERENCE_CROP

Filter = Callable[[Tensor, Tensor], Tensor]
Method = Literal["auto", "exact", "lattice"]
METHODS: tuple[str, ...] = get_args(Method)

DENSE_ENERGY_WEIGHT = 5e-8
"""The paper's weight (1e-7) times the fraction of the exact Gaussian sum that its lattice filter
returned (0.45-0.65, energy ratio about 0.5): the same regularisation strength with an exact
kernel (or with :mod:`pipeline.method.lattice`, calibrated to the exact sum)."""

LATTICE_MIN_PIXELS = 1024
"""Pixels per image from which ``method="auto"`` uses the lattice on a CPU, where it becomes the
faster (one core, 4 synthetic images, 21 channels, 32 x 32: exact 13 ms, lattice 10 ms; 48 x 48:
63 and 13 ms)."""

LOG_WEIGHT_FLOOR = -80.0
"""Log-weights below this (W_ij < 2e-35, nothing beside W_ii = 1 in float32) are raised to it by
the blockwise filter: exp is some ten times slower on arguments whose results underflow."""

EXACT_BLOCK = 64
"""Rows of W computed at once by the blockwise exact filter: 4 x block x pixels bytes per image
(6.6 MB at 160 x 160)."""


def pixel_features(images: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """``[row / sigma_xy, col / sigma_xy, rgb / sigma_rgb]`` per pixel: (N, H*W, 5), centred.

    Centring each image's features keeps ``|f|^2`` small, so that computing ``log W_ij =
    -|f_i - f_j|^2 / 2`` as ``f_i . f_j - |f_i|^2 / 2 - |f_j|^2 / 2`` loses little precision.
    """
    n, _, h, w = images.shape
    rows = torch.arange(h, device=images.device, dtype=images.dtype)
    cols = torch.arange(w, device=images.device, dtype=images.dtype)
    position = torch.stack(torch.meshgrid(rows, cols, indexing="ij")) / sigma_xy
    features = torch.cat([position.expand(n, 2, h, w), images / sigma_rgb], dim=1)
    features = features.flatten(2).transpose(1, 2)
    return features - features.mean(dim=1, keepdim=True)


def _channels_last(values: Tensor) -> Tensor:
    """(N, K, H, W) -> (N, H*W, K)."""
    return values.flatten(2).transpose(1, 2)


def _channels_first(values: Tensor, shape: torch.Size) -> Tensor:
    """(N, H*W, K) -> (N, K, H, W) of ``shape``."""
    return values.transpose(1, 2).reshape(shape)


class _SymmetricFilter(torch.autograd.Function):
    """``W @ values`` with the gradient ``W @ grad`` (W is symmetric); none for the images.

    The lattice's blur, axis by axis over a truncated lattice, is symmetric only to about 2e-4
    (its transpose blurs the axes in the other order): its gradient is that of the symmetric W it
    approximates.
    """

    @staticmethod
    def forward(ctx: Any, images: Tensor, values: Tensor, bilateral: Filter) -> Tensor:
        ctx.save_for_backward(images)
        ctx.bilateral = bilateral
        return bilateral(images, values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        (images,) = ctx.saved_tensors
        return None, ctx.bilateral(images, grad), None


def _filter(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Make a filter run in at least float32 with autocast off (its exponents need the
    precision), and differentiable in ``values`` without keeping W."""

    @functools.wraps(function)
    def wrapper(images: Tensor, values: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        def bilateral(images: Tensor, values: Tensor) -> Tensor:
            return function(images, values, *args, **kwargs)

        dtype = torch.promote_types(values.dtype, torch.float32)
        with torch.autocast(images.device.type, enabled=False):
            result = _SymmetricFilter.apply(images.to(dtype), values.to(dtype), bilateral)
        return result.to(values.dtype)

    return wrapper


def _log_kernel_factors(features: Tensor) -> tuple[Tensor, Tensor]:
    """Queries ``[f, -|f|^2/2, 1]`` and keys ``[f, 1, -|f|^2/2]``: ``q_i . k_j = log W_ij``."""
    half_norm = features.square().sum(-1, keepdim=True) / 2
    ones = torch.ones_like(half_norm)
    return torch.cat([features, -half_norm, ones], dim=-1), torch.cat([features, ones, -half_norm], dim=-1)


@_filter
def bilateral_filter_blockwise(
    images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float, block: int = EXACT_BLOCK
) -> Tensor:
    """The exact ``W @ values``, ``block`` rows of W at a time (any device).

    The rows are computed into one reused buffer: a fresh allocation per block costs page faults.
    """
    query, key = _log_kernel_factors(pixel_features(images, sigma_rgb, sigma_xy))
    n, pixels, _ = query.shape
    key = key.transpose(1, 2)
    flat = _channels_last(values)
    result = torch.empty_like(flat)
    block = min(block, pixels)
    buffer = query.new_empty(n, block, pixels)
    for start in range(0, pixels, block):
        rows = query[:, start : start + block]
        log_weights = torch.bmm(rows, key, out=buffer if rows.shape[1] == block else None)
        log_weights.clamp_(LOG_WEIGHT_FLOOR, 0.0)  # <= 0 but for rounding
        result[:, start : start + block] = torch.bmm(log_weights.exp_(), flat)
    return _channels_first(result, values.shape)


def _pad_last(tensor: Tensor, multiple: int = 8) -> Tensor:
    """Zero-pad the last dimension to a multiple of ``multiple`` (fused attention kernels' alignment)."""
    return F.pad(tensor, (0, -tensor.shape[-1] % multiple))


@_filter
def bilateral_filter_sdpa(images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """The exact ``W @ values`` through ``scaled_dot_product_attention`` (fused on a GPU).

    Attention returns ``sum_j exp(q_i . k_j) v_j / sum_j exp(q_i . k_j)``; with ``q_i . k_j =
    log W_ij`` that is ``W @ values`` over the row sum of W. An extra key of zeros (log-weight 0,
    i.e. weight 1 for every query) with the value 1 in a channel of its own recovers the row sum:
    that channel holds ``1 / (1 + sum_j W_ij)`` and the others ``sum_j W_ij v_j / (1 + sum_j
    W_ij)``, whose quotient is ``W @ values``. The largest log-weight is 0 (``W_ii = 1``), so the
    kernel's running row maximum keeps every exponential in range.
    """
    query, key = _log_kernel_factors(pixel_features(images, sigma_rgb, sigma_xy))
    flat = _channels_last(values)
    n, k = flat.shape[0], flat.shape[-1]
    anchor = flat.new_zeros(n, 1, k + 1)
    anchor[..., k] = 1
    key = torch.cat([key, key.new_zeros(n, 1, key.shape[-1])], dim=1)
    value = torch.cat([F.pad(flat, (0, 1)), anchor], dim=1)
    attended = F.scaled_dot_product_attention(
        _pad_last(query)[:, None], _pad_last(key)[:, None], _pad_last(value)[:, None], scale=1.0
    )[:, 0]
    return _channels_first(attended[..., :k] / attended[..., k : k + 1], values.shape)


@_filter
def bilateral_filter_lattice(images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """``W @ values`` approximated on the permutohedral lattice, in O(pixels) (see :mod:`pipeline.method.lattice`)."""
    features = pixel_features(images, sigma_rgb, sigma_xy)
    return _channels_first(permutohedral_filter(features, _channels_last(values)), values.shape)


def bilateral_filter(images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """The exact ``W @ values``: (N, 3, H, W) images in 0..255, (N, K, H, W) values.

    Fused attention on a GPU, the blockwise filter elsewhere; O(pixels x block) memory at most.
    Differentiable in ``values`` (the gradient is the filtered gradient, W being symmetric), not
    in ``images``.
    """
    if images.is_cuda:
        return bilateral_filter_sdpa(images, values, sigma_rgb, sigma_xy)
    return bilateral_filter_blockwise(images, values, sigma_rgb, sigma_xy)


def check_method(method: str) -> None:
    """Raise ValueError unless ``method`` names a filter (one of :data:`METHODS`)."""
    check_choice("method", method, METHODS)


def bilateral_filter_auto(
    images: Tensor,
    values: Tensor,
    sigma_rgb: float,
    sigma_xy: float,
    method: Method = "auto",
    lattice_min_pixels: int = LATTICE_MIN_PIXELS,
) -> Tensor:
    """``W @ values`` by ``method``: "exact", "lattice", or "auto" (the lattice for images of at
    least ``lattice_min_pixels`` pixels on a CPU, the exact filter otherwise)."""
    check_method(method)
    if method == "auto":
        large = images.shape[-2] * images.shape[-1] >= lattice_min_pixels
        method = "lattice" if large and not images.is_cuda else "exact"
    if method == "lattice":
        return bilateral_filter_lattice(images, values, sigma_rgb, sigma_xy)
    return bilateral_filter(images, values, sigma_rgb, sigma_xy)


class _GatedEnergy(torch.autograd.Function):
    """``-(1/N) sum_i g_i sum_k S_ik (W S)_ik`` with the reference's gradient ``-(2/N) g (W S)``.

    That gradient is exact when the gate is constant (W is symmetric); the reference uses it as
    is, treating the gate, computed from S, as a constant.
    """

    @staticmethod
    def forward(ctx: Any, probs: Tensor, gate: Tensor, images: Tensor, bilateral: Filter) -> Tensor:
        gated = gate[:, None] * bilateral(images, probs)
        ctx.save_for_backward(gated)
        return -(probs * gated).sum() / probs.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (gated,) = ctx.saved_tensors
        return -2 * grad * gated / gated.shape[0], None, None, None


def energy_gate(probs: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
    """RRM's per-pixel gate ``max(0, R - max_k S_k)``, 1 where the label is unknown (255).

    Confident pixels with a reliable label add little energy; unknown pixels add all of it.
    """
    gate = valid - probs.amax(dim=1)
    return gate.masked_fill(labels == IGNORE, 1.0).clamp(min=0)


def _resize(
    images: Tensor, probs: Tensor, valid: Tensor, labels: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images and probabilities bilinearly, the valid mask and labels by nearest neighbour."""
    size = (int(images.shape[-2] * scale), int(images.shape[-1] * scale))

    def smooth(tensor: Tensor) -> Tensor:
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)

    def nearest(tensor: Tensor) -> Tensor:
        return F.interpolate(tensor[:, None].float(), size=size, mode="nearest")[:, 0].to(tensor.dtype)

    return smooth(images), smooth(probs), nearest(valid), nearest(labels)


def dense_energy(
    images: Tensor,
    probs: Tensor,
    valid: Tensor,
    labels: Tensor,
    sigma_rgb: float,
    sigma_xy: float,
    scale: float,
    method: Method = "auto",
) -> Tensor:
    """The unweighted gated dense energy of RRM, at ``scale`` times the resolution.

    ``images`` (N, 3, H, W) RGB in 0..255; ``probs`` (N, K, H, W) softmax output; ``valid``
    (N, H, W) 1 inside the image, 0 on crop padding; ``labels`` (N, H, W) reliable labels, 255
    unknown. ``sigma_xy`` is in full-resolution pixels. The gradient reaching ``probs`` is
    ``-(2/N) g (W S) R`` at the reduced resolution, carried back through the resizing.
    """
    images, probs, valid, labels = _resize(images, probs, valid.to(probs.dtype), labels, scale)
    masked = probs * valid[:, None]
    gate = energy_gate(masked.detach(), valid, labels)
    bilateral = functools.partial(
        bilateral_filter_auto, sigma_rgb=sigma_rgb, sigma_xy=sigma_xy * scale, method=method
    )
    return _GatedEnergy.apply(masked, gate, images.detach(), bilateral)


def kernel_mass(length: int, sigma: float) -> float:
    """The spatial kernel's mass per pixel along one axis: the mean over the ``length`` pixels of a
    row of ``sum_j exp(-(i - j)^2 / (2 sigma^2))``. About ``length`` when ``sigma`` is far larger,
    ``sqrt(2 pi) sigma`` when it is far smaller."""
    offsets = np.arange(length, dtype=np.float64)
    return float(np.exp(-np.subtract.outer(offsets, offsets) ** 2 / (2 * sigma**2)).sum() / length)


def energy_size(crop_size: int, scale: float, sigma_xy: float) -> float:
    """``N * M`` of a square crop at the energy's resolution: its pixels N times the spatial kernel's
    mass per pixel M. The energy of a one-coloured crop labelled with one class is ``-N * M`` (no
    gate), and the energy's gradient at a pixel, ``-2 g (W S)``, grows with M while the
    cross-entropy's, an average, shrinks with N: their ratio grows with ``N * M``."""
    side = max(1, int(crop_size * scale))
    return side * side * kernel_mass(side, sigma_xy * scale) ** 2


def crop_reach(sigma_xy: float, crop_size: int) -> float:
    """The energy kernel's spatial sigma for ``crop_size`` crops that spans the same share of the
    crop as ``sigma_xy`` does of RRM's 321-pixel crops (:data:`~pipeline.models.nets.REFERENCE_CROP`).

    The kernel's reach, with :func:`crop_weight` the loss settings' one scaling rule. Left at the
    paper's 100 pixels, the kernel spans the whole of a small crop, and the energy rewards every
    pixel for agreeing with the crop's dominant colour-alike label, most often the background:
    objects whose colours come near the background's are then learnt as background beyond their
    reliable cores (docs/results/textures.md).
    """
    return sigma_xy * crop_size / REFERENCE_CROP


def crop_weight(weight: float, crop_size: int, scale: float, sigma_xy: float) -> float:
    """The dense energy's weight for ``crop_size`` crops that acts as ``weight`` does on RRM's
    321-pixel crops (:data:`~pipeline.models.nets.REFERENCE_CROP`), both with the kernel of
    ``sigma_xy``: scaled by ``energy_size(reference) / energy_size(crop)``, which keeps the energy's
    pull on a pixel in the same ratio to the cross-entropy's at any crop size.

    The scaling rule of the loss weights, applied with the kernel's reach of :func:`crop_reach`: a
    preset sets the crop, never the weight or the sigmas. On 96-pixel crops (sigma_xy 29.9), the
    paper's weight becomes 16.8 times larger, on 224-pixel ones (69.8) 2.5 times.
    """
    reference = energy_size(REFERENCE_CROP, scale, sigma_xy)
    return weight * reference / energy_size(crop_size, scale, sigma_xy)


class DenseEnergyLoss(nn.Module):
    """``weight`` times :func:`dense_energy`; the defaults are the paper's (sigma_rgb 15, sigma_xy
    100, half resolution) with the weight of :data:`DENSE_ENERGY_WEIGHT`, 5e-8 for the paper's
    nominal 1e-7 (whose lattice filter summed about half of the exact kernel)."""

    def __init__(
        self,
        weight: float = DENSE_ENERGY_WEIGHT,
        sigma_rgb: float = 15.0,
        sigma_xy: float = 100.0,
        scale: float = 0.5,
        method: Method = "auto",
    ) -> None:
        super().__init__()
        check_range("weight", weight, low=0.0)
        check_range("sigma_rgb", sigma_rgb, low=1e-6)
        check_range("sigma_xy", sigma_xy, low=1e-6)
        check_range("scale", scale, low=1e-6, high=1.0)
        check_method(method)
        self.weight, self.sigma_rgb, self.sigma_xy = weight, sigma_rgb, sigma_xy
        self.scale, self.method = scale, method

    def forward(self, images: Tensor, probs: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        energy = dense_energy(images, probs, valid, labels, self.sigma_rgb, self.sigma_xy, self.scale, self.method)
        return self.weight * energy


def _groups(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Masks of the reliable background (label 0) and foreground (1..C-1) pixels."""
    return labels == 0, (labels > 0) & (labels != IGNORE)


def reliable_counts(labels: Tensor) -> Tensor:
    """float (2,): the numbers of reliable background and foreground pixels of ``labels``."""
    return torch.stack([group.sum() for group in _groups(labels)]).float()


def segmentation_ce(logits: Tensor, labels: Tensor, counts: Tensor | None = None) -> Tensor:
    """Cross-entropy on reliable pixels: the mean over background pixels (label 0) plus the mean
    over foreground pixels (1..C-1), each 0 when there are none; 255 pixels are ignored.

    ``logits`` (N, C, H, W), ``labels`` (N, H, W) at the same resolution. ``counts`` are the
    (background, foreground) pixel numbers to divide by, :func:`reliable_counts` of ``labels``
    by default. Under data parallel training each process gives the mean of all processes'
    counts, so that the average of their losses, whose gradient DDP takes, is the loss of the
    whole batch (with each process's own counts it would weigh the processes' pixels unequally).
    """
    labels = labels.long()
    counts = reliable_counts(labels) if counts is None else counts
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    background, foreground = _groups(labels)
    return ((losses * background).sum() / counts[0].clamp(min=1)
            + (losses * foreground).sum() / counts[1].clamp(min=1))
