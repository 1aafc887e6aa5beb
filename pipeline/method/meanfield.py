"""The ``torch`` backend of :mod:`pipeline.method.crf`: pydensecrf's mean field in PyTorch,
batched over images of one size, on the CPU or a GPU (the model and its steps: that module's note).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.method.crf import UNARY_CLIP, CRFParams, same_size
from pipeline.method.lattice import Lattice


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


def marginals(images: Sequence[np.ndarray], scores: Sequence[np.ndarray], params: CRFParams,
              device: torch.device | str = "cpu") -> list[np.ndarray]:
    """:func:`batch_crf` of numpy inputs: each image uint8 (H, W, 3) with its scores (G, K_i, H, W),
    G CRFs of its own label count; a batch per image size on ``device``, the label counts padded
    to the batch's largest with invalid labels. Returns each image's marginals (G, K_i, H, W)."""
    found: dict[int, np.ndarray] = {}
    for indices in same_size(images):
        height, width, _ = images[indices[0]].shape
        groups = scores[indices[0]].shape[0]
        labels = max(scores[index].shape[1] for index in indices)
        padded = np.zeros((len(indices), groups, labels, height, width), dtype=np.float32)
        valid = np.zeros((len(indices), labels), dtype=bool)
        for row, index in enumerate(indices):
            own = scores[index].shape[1]
            padded[row, :, :own] = scores[index]
            valid[row, :own] = True
        batch = torch.from_numpy(np.stack([images[index] for index in indices])).to(device)
        probs = batch_crf(batch, torch.from_numpy(padded).to(device), params, torch.from_numpy(valid).to(device))
        probs = probs.cpu().numpy()
        for row, index in enumerate(indices):
            found[index] = probs[row, :, : scores[index].shape[1]]
    return [found[index] for index in range(len(images))]
