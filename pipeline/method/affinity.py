"""Inter-pixel affinities learnt from the reliable regions, and the random walk that propagates
CAMs over them (PSA's AffinityNet, Ahn and Kwak, CVPR 2018; its walk as IRN, Ahn, Cho and Kwak,
CVPR 2019, runs it).

Everything here works on a grid: the image at a stride ``s`` (``ceil(H / s) x ceil(W / s)``
cells). Two cells are neighbours when their offset ``(dy, dx)`` lies strictly inside a circle
of ``radius`` cells, PSA's neighbourhood (:func:`offsets`).

Learning: a pair of neighbours whose reliable labels are both known is a positive (same label:
affinity 1; background pairs and foreground pairs counted apart) or a negative (different
labels: affinity 0); a pair touching an unlabelled cell (255) teaches nothing
(:func:`pair_labels`). The affinity of two cells is ``exp(-mean |f_i - f_j|)`` of their feature
vectors (:func:`pair_affinities`), trained with PSA's loss (:func:`affinity_loss`).

Propagation: the transition matrix is the affinities raised to ``beta``, a cell's affinity to
itself 1, each row divided by its sum; ``2 ** log_steps`` steps of the walk move every map to
the weighted average of its neighbours that many times over (:func:`random_walk`), which is
PSA's ``cam @ T ** (2 ** logt)`` without ever forming the dense ``(HW, HW)`` matrix: the
transition weights are kept as one ``(P, h, w)`` map per offset (``P`` neighbours), so memory is
linear in the pixels. :func:`dense_transition` builds the dense matrix, for the benchmark and
the tests that hold the two to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.io import IGNORE

Offset = tuple[int, int]

EPSILON = 1e-5
"""PSA's guard inside the logarithms of the loss."""


@cache
def offsets(radius: int) -> tuple[Offset, ...]:
    """PSA's half neighbourhood: the offsets ``(dy, dx)`` with ``dy**2 + dx**2 < radius**2`` that
    point right on the same row or down, so that each unordered pair of cells comes once."""
    if radius < 2:
        raise ValueError(f"radius={radius} must be at least 2 (a neighbourhood of one cell has no pairs)")
    row = [(0, dx) for dx in range(1, radius)]
    below = [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius**2]
    return tuple(row + below)


@cache
def walk_offsets(radius: int) -> tuple[Offset, ...]:
    """The whole neighbourhood a walk step averages over: the cell itself first, then
    :func:`offsets` and their opposites."""
    half = offsets(radius)
    return ((0, 0), *half, *((-dy, -dx) for dy, dx in half))


def _spans(length: int, shift: int) -> tuple[slice, slice]:
    """The slices of one axis of length ``length`` holding the first cells of the pairs at
    ``shift`` and their partners."""
    if shift >= 0:
        return slice(0, length - shift), slice(shift, length)
    return slice(-shift, length), slice(0, length + shift)


def pair_slices(size: tuple[int, int], offset: Offset) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(rows, cols)`` slices of a grid of ``size`` that hold the first cells of every pair at
    ``offset`` and, in the same order, their partners."""
    (rows, partner_rows), (cols, partner_cols) = _spans(size[0], offset[0]), _spans(size[1], offset[1])
    return (rows, cols), (partner_rows, partner_cols)


def feature_affinities(features: Tensor, offset: Offset) -> Tensor:
    """PSA's affinity ``exp(-mean_d |f_i - f_j|)`` of every pair of cells at ``offset`` of
    (N, D, h, w) features: (N, h - |dy|, w - |dx|), indexed by the pair's first cell."""
    first, second = pair_slices(tuple(features.shape[-2:]), offset)
    return torch.exp(-(features[..., first[0], first[1]] - features[..., second[0], second[1]]).abs().mean(dim=1))


@cache
def path(offset: Offset) -> tuple[Offset, ...]:
    """The cells on the straight line from a cell to its neighbour at ``offset``, both included,
    as offsets from the first: IRN's path, along which the strongest boundary separates the two."""
    count = max(abs(offset[0]), abs(offset[1]))
    return tuple(dict.fromkeys((round(step * offset[0] / count), round(step * offset[1] / count))
                               for step in range(count + 1)))


def boundary_affinities(logits: Tensor, offset: Offset) -> Tensor:
    """IRN's affinity of every pair of cells at ``offset`` of (N, 1, h, w) class-boundary logits:
    one less the strongest boundary (their sigmoid) on the line between the two cells,
    (N, h - |dy|, w - |dx|), indexed by the pair's first cell."""
    boundary = torch.sigmoid(logits[:, 0])
    height, width = boundary.shape[-2:]
    first, _ = pair_slices((height, width), offset)
    rows, cols = first
    strongest = None
    for dy, dx in path(offset):
        cells = boundary[..., rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
        strongest = cells if strongest is None else torch.maximum(strongest, cells)
    return 1 - strongest


def pair_labels(labels: Tensor, offset: Offset) -> tuple[Tensor, Tensor, Tensor]:
    """Masks of the pairs at ``offset`` of an (N, h, w) label grid (0 background, classes above,
    255 unknown): background pairs (both 0), foreground pairs (both the same class) and pairs of
    different labels; a pair touching an unknown cell is in none."""
    first, second = pair_slices(tuple(labels.shape[-2:]), offset)
    a, b = labels[..., first[0], first[1]], labels[..., second[0], second[1]]
    known = (a != IGNORE) & (b != IGNORE)
    same = known & (a == b)
    return same & (a == 0), same & (a != 0), known & (a != b)


PairFn = Callable[[Tensor, Offset], Tensor]
"""The network's output maps (N, D, h, w) and an offset -> the affinities of the pairs at it."""

AFFINITIES: dict[str, tuple[int, PairFn]] = {"feature": (64, feature_affinities), "boundary": (1, boundary_affinities)}
"""The kinds of affinity by name: the channels of the network's output and how pairs are scored."""


def affinity_loss(maps: Tensor, labels: Tensor, radius: int, pairs: PairFn) -> dict[str, Tensor]:
    """PSA's loss over every pair of cells within ``radius``: the mean of ``-log(a)`` over the
    background pairs and over the foreground pairs, the mean of ``-log(1 - a)`` over the pairs of
    different labels, weighed 1/4, 1/4 and 1/2 (a group without pairs adds 0), the affinities
    ``a`` scored by ``pairs`` on ``maps``. ``maps`` (N, D, h, w) and the label grid ``labels``
    (N, h, w) must have the same grid."""
    sums = {name: maps.new_zeros(()) for name in ("background", "foreground", "different")}
    counts = dict.fromkeys(sums, 0)
    for offset in offsets(radius):
        affinity = pairs(maps, offset)
        for (name, mask), target in zip(zip(sums, pair_labels(labels, offset)), (True, True, False)):
            chosen = affinity[mask]
            sums[name] = sums[name] - torch.log((chosen if target else 1 - chosen) + EPSILON).sum()
            counts[name] += int(mask.sum())
    means = {name: sums[name] / max(counts[name], 1) for name in sums}
    return {"loss": means["background"] / 4 + means["foreground"] / 4 + means["different"] / 2, **means}


def grid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The grid of an image of ``size`` at ``stride``: ``ceil`` of each side."""
    return -(-size[0] // stride), -(-size[1] // stride)


def label_grid(labels: Tensor, stride: int) -> Tensor:
    """(N, H, W) labels sampled at the centre of each grid cell (nearest neighbour, as PSA and
    IRN reduce their label maps), (N, h, w) on :func:`grid_size`'s grid."""
    height, width = labels.shape[-2:]
    rows = torch.clamp(torch.arange(grid_size((height, width), stride)[0]) * stride + stride // 2, max=height - 1)
    cols = torch.clamp(torch.arange(grid_size((height, width), stride)[1]) * stride + stride // 2, max=width - 1)
    return labels[..., rows.to(labels.device)[:, None], cols.to(labels.device)[None, :]]


def transition_weights(maps: Tensor, radius: int, beta: float, pairs: PairFn) -> Tensor:
    """(N, P, h, w) weights of one walk step: for each cell and each of the ``P`` offsets of
    :func:`walk_offsets`, its affinity to that neighbour (scored by ``pairs`` on ``maps``) raised
    to ``beta`` (1 for itself, 0 for a neighbour outside the grid), divided by their sum over
    the offsets."""
    height, width = maps.shape[-2:]
    half = offsets(radius)
    weights = maps.new_zeros((maps.shape[0], 1 + 2 * len(half), height, width))
    weights[:, 0] = 1
    for index, offset in enumerate(half, start=1):
        first, second = pair_slices((height, width), offset)
        affinity = pairs(maps, offset) ** beta
        weights[:, index, first[0], first[1]] = affinity
        weights[:, index + len(half), second[0], second[1]] = affinity
    return weights / weights.sum(dim=1, keepdim=True)


def random_walk(maps: Tensor, weights: Tensor, radius: int, steps: int) -> Tensor:
    """``steps`` steps of the walk of :func:`transition_weights` ``weights`` (N, P, h, w) applied
    to ``maps`` (N, K, h, w): each step replaces every cell's values by the weighted mean of its
    neighbourhood's. Memory: the maps once, padded, and the weights; never an (hw, hw) matrix."""
    height, width = maps.shape[-2:]
    shifts = walk_offsets(radius)
    columns = [weights[:, index : index + 1] for index in range(len(shifts))]
    for _ in range(steps):
        padded = F.pad(maps, (radius, radius, radius, radius))
        total = maps * columns[0]
        for (dy, dx), column in zip(shifts[1:], columns[1:]):
            total = total.addcmul_(column, padded[..., radius + dy : radius + dy + height,
                                                   radius + dx : radius + dx + width])
        maps = total
    return maps


def boundary_affinity(maps: Tensor, scores: Tensor, thresholds: Tensor, radius: int, pairs: PairFn) -> Tensor:
    """(N, T, 2): for each image and each of the ``thresholds`` (T,), the summed affinity (scored
    by ``pairs`` on ``maps``) of the neighbouring cells whose labels differ, and how many such
    pairs there are; a cell's label is background where its largest of ``scores`` (N, K, h, w) is
    at most the threshold, else the index of that largest. Affinities are low across the edges of
    objects and high inside the background, so the threshold whose labels part cells where the
    affinities are weakest is the one whose edges follow the objects'."""
    peak, best = scores.max(dim=1)
    labels = torch.where(peak[:, None] > thresholds.to(scores)[None, :, None, None], best[:, None] + 1, 0)
    totals = scores.new_zeros((scores.shape[0], len(thresholds), 2))
    for offset in offsets(radius):
        affinity = pairs(maps, offset)[:, None]
        first, second = pair_slices(tuple(labels.shape[-2:]), offset)
        differ = labels[..., first[0], first[1]] != labels[..., second[0], second[1]]
        totals[..., 0] += (differ * affinity).flatten(2).sum(dim=2)
        totals[..., 1] += differ.flatten(2).sum(dim=2)
    return totals


def dense_transition(weights: Tensor, radius: int) -> Tensor:
    """The (hw, hw) transition matrix ``T`` of one image's walk ``weights`` (P, h, w), the row of
    a cell holding its weights: ``maps @ T.T`` is one step of :func:`random_walk` on (K, hw) maps.
    Quadratic in the pixels: for the benchmark and the tests."""
    _, height, width = weights.shape
    index = torch.arange(height * width, device=weights.device).view(height, width)
    matrix = weights.new_zeros((height * width, height * width))
    for (dy, dx), plane in zip(walk_offsets(radius), weights):
        rows, cols = slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))
        source = index[rows, cols]
        target = index[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
        matrix[source.reshape(-1), target.reshape(-1)] = plane[rows, cols].reshape(-1)
    return matrix
