"""A Gaussian filter in O(points) on the permutohedral lattice, in plain PyTorch.

After Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice"
(Eurographics 2010). Each point of a d-dimensional feature space is lifted onto the hyperplane
``x . 1 = 0`` of R^(d+1), which the lattice tiles with simplices; its value is *splatted* onto the
d+1 vertices of its simplex with barycentric weights, the lattice is *blurred* with a [1/4, 1/2,
1/4] kernel along each of its d+1 axes, and every point *slices* its result back from the same
vertices. Features are scaled so that the variance of this kernel is that of ``exp(-|x|^2 / 2)``
(``_inv_std``; the filter's impulse response has variance 1.01 per axis).

The lattice holds the vertices of the points' simplices and their neighbours: blurring over the
occupied vertices alone (as Adams et al. do) loses the mass that passes through empty ones, 2-15%
of the sum for image features, which fill little of the 5-D space (the more, the smoother the
image), and makes the result depend on the image's noise.

Normalisation. Splatting, blurring and slicing each preserve mass, so the lattice kernel
integrates to the volume of feature space per lattice point, whereas ``exp(-|x|^2 / 2)``
integrates to ``(2 pi)^(d/2)``; ``_integral_scale`` fixes that ratio. The two kernels then have the
same mass and spread but not the same shape: the lattice kernel is flatter (0.78 rather than 1 at
zero distance). Image features lie near a 2-D surface of the 5-D space (position, and a colour
nearly constant within regions), where the flatter kernel sums to less: 0.86 of the exact sum on
synthetic images. ``CALIBRATION`` removes that mean; what remains is a spread per image and per
pixel around the exact sum (docs/method-notes.md, "Measurements behind the design"). The reference
implementation's lattice, without such a normalisation, returned about half the exact sum. The
cost grows with the vertices the features occupy: little for images of flat regions, most for
noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CALIBRATION = 1.16
"""1 / 0.86, the mean ratio of the integral-matched filter to the exact sum on the 80 x 80
synthetic images described above."""


def _inv_std(d: int) -> float:
    """Feature scale at which the blur's variance matches a unit Gaussian (Adams et al. 2010)."""
    return math.sqrt(2.0 / 3.0) * (d + 1)


def _integral_scale(d: int) -> float:
    """``(2 pi)^(d/2)`` over the volume of unscaled feature space per lattice point.

    The lattice is d+1 cosets of ``(d+1) A_d``, whose cell has volume ``(d+1)^d sqrt(d+1)``, and
    the lift onto it is ``_inv_std(d)`` times an isometry.
    """
    cell = (d + 1) ** (d - 0.5) / _inv_std(d) ** d
    return (2 * math.pi) ** (d / 2) / cell


def _elevate(features: Tensor) -> Tensor:
    """Lift (P, d) features onto the hyperplane ``x . 1 = 0`` of R^(d+1), scaled by ``_inv_std``.

    Column c of the lift is ``(1, ..., 1, -(c+1), 0, ..., 0)`` (c+1 ones): orthogonal columns of
    norm ``sqrt((c+1)(c+2))``, which the per-axis scale divides out.
    """
    d = features.shape[-1]
    axis = torch.arange(d, device=features.device, dtype=features.dtype)
    scale = _inv_std(d) / torch.sqrt((axis + 1) * (axis + 2))
    row = torch.arange(d + 1, device=features.device)[:, None]
    col = torch.arange(d, device=features.device)[None, :]
    lift = (row <= col).to(features.dtype) - (col + 1) * (row == col + 1).to(features.dtype)
    return (features * scale) @ lift.T


def _simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The simplex enclosing each lifted point.

    Returns its remainder-0 vertex (P, d+1) as integers, the rank of each of the point's
    coordinates (P, d+1) (0 for the largest offset from that vertex, ties by position), which
    places the other vertices, and the point's barycentric weights on vertices 0..d (P, d+1).
    """
    points, d1 = elevated.shape
    d = d1 - 1
    origin = torch.round(elevated / d1) * d1
    order = (elevated - origin).argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(d1, device=elevated.device).expand(points, d1)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    # the nearest remainder-0 point may sit off the simplex: move it by d+1 where the rank wraps
    rank = rank + (origin.sum(-1) / d1).round().long()[:, None]
    wrap = (rank < 0).long() - (rank > d).long()
    rank = rank + d1 * wrap
    origin = origin + d1 * wrap
    share = (elevated - origin) / d1
    weights = torch.zeros(points, d1 + 1, device=elevated.device, dtype=elevated.dtype)
    weights.scatter_add_(1, d - rank, share)
    weights.scatter_add_(1, d1 - rank, -share)
    weights[:, 0] += 1 + weights[:, d1]
    return origin.long(), rank, weights[:, :d1]


def _vertex_codes(origin: Tensor, rank: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """One int64 code for each of the d+1 vertices of each simplex (P, d+1), and the codes' steps
    along the d+1 lattice axes (d+1,).

    A code is a mixed-radix number over the point's group and its first d coordinates (the last
    follows from the zero sum). Vertex k is the origin plus k in every coordinate, less d+1 in the
    k highest-ranked ones. A coordinate's radix leaves a margin of 3 (d+1) around the origins,
    room for the vertices, their neighbours and the neighbours' neighbours, so that a step along
    an axis is the same constant for every code.
    """
    d = origin.shape[-1] - 1
    coordinates = origin[:, :d]
    margin = 3 * (d + 1)
    low = coordinates.amin(dim=0) - margin
    span = coordinates.amax(dim=0) + margin - low + 1
    sizes = [int(group.max()) + 1, *span.tolist()]
    if math.prod(sizes) >= 2**62:
        raise ValueError("features span too many lattice cells for int64 keys; use the exact filter")
    strides = torch.tensor([math.prod(sizes[i + 1 :]) for i in range(d + 1)], device=origin.device)
    base = ((coordinates - low) * strides[1:]).sum(-1) + group * strides[0]
    rank_strides = torch.zeros_like(rank).scatter_(1, rank, F.pad(strides[1:], (0, 1)).expand_as(rank))
    top_strides = F.pad(rank_strides.flip(1).cumsum(1)[:, :d], (1, 0))
    vertex = torch.arange(d + 1, device=origin.device)
    codes = base[:, None] + vertex * strides[1:].sum() - (d + 1) * top_strides
    # along axis a < d a step adds d to coordinate a and -1 to the others; along axis d, -1 to all
    steps = (d + 1) * torch.eye(d + 1, d, dtype=torch.long, device=origin.device) - 1
    return codes, steps @ strides[1:]


def _neighbours(lattice: Tensor, steps: Tensor) -> Tensor:
    """(d+1, 2, M): per axis, the index in the sorted ``lattice`` of each vertex's neighbour one
    step ahead and one step behind; ``M`` (a row of zeros) where that is not in it."""
    targets = lattice + torch.stack([steps, -steps], dim=1)[..., None]
    index = torch.searchsorted(lattice, targets).clamp_max(len(lattice) - 1)
    return torch.where(lattice[index] == targets, index, len(lattice))


@dataclass(frozen=True)
class Lattice:
    """The lattice of a batch of feature sets, built once and applied to any number of value sets.

    ``extended`` (the default) holds the vertices of the points' simplices and their neighbours
    (see the module's note); without it the lattice holds the occupied vertices alone, as
    Krähenbühl's dense CRF (pydensecrf) builds it, so that a filter through it is that CRF's. Its
    :meth:`filter` scales the result for ``exp(-|x|^2 / 2)``'s mass (``_integral_scale`` and
    :data:`CALIBRATION`): a normalised filter does not depend on that constant.
    """

    splat_points: Tensor
    """The point (over the whole batch) of each point-vertex pair, in the order of their vertices."""
    splat_offsets: Tensor
    """Where each lattice vertex's pairs start in ``splat_points`` (an empty run: no point on it)."""
    splat_weights: Tensor
    """The barycentric weight of each pair, in the same order."""
    vertices: Tensor
    """(batch x points, d+1): the lattice index of each point's vertices."""
    weights: Tensor
    """(batch x points, d+1): the point's barycentric weights on them."""
    neighbours: Tensor
    """(d+1, 2, M): see :func:`_neighbours`."""

    @classmethod
    def build(cls, features: Tensor, extended: bool = True) -> Lattice:
        """The lattice of ``features`` (N, P, d), already divided by the kernel's standard
        deviations. Batch elements share no lattice vertices."""
        n, p, d = features.shape
        origin, rank, weights = _simplex(_elevate(features.reshape(n * p, d)))
        group = torch.arange(n, device=features.device).repeat_interleave(p)
        codes, steps = _vertex_codes(origin, rank, group)
        splat_codes, order = codes.reshape(-1).sort()
        occupied, occupant = splat_codes.unique_consecutive(return_inverse=True)
        lattice = occupied
        if extended:
            lattice = torch.cat([occupied, (occupied + torch.cat([steps, -steps])[:, None]).reshape(-1)]).unique()
        vertices = torch.empty_like(order)
        vertices[order] = torch.searchsorted(lattice, occupied)[occupant]
        return cls(order // (d + 1), torch.searchsorted(splat_codes, lattice), weights.reshape(-1)[order],
                   vertices.reshape(n * p, d + 1), weights, _neighbours(lattice, steps))

    def filter(self, values: Tensor) -> Tensor:
        """Approximately ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` for each batch element: ``values``
        (N, P, K) to (N, P, K). Not differentiable (:mod:`pipeline.method.losses` gives its filters
        a gradient)."""
        n, p, k = values.shape
        d = self.weights.shape[-1] - 1
        # splat: a vertex sums the values of the points on it, weighted; vertex M is a zero row
        blurred = F.embedding_bag(self.splat_points, values.reshape(n * p, k), offsets=self.splat_offsets,
                                  per_sample_weights=self.splat_weights, mode="sum")
        blurred = torch.cat([blurred, blurred.new_zeros(1, k)])
        for ahead, behind in self.neighbours:
            blurred[:-1] = 0.5 * blurred[:-1] + 0.25 * (blurred[ahead] + blurred[behind])
        # slice: each point takes the blurred values of its vertices with the same weights
        sliced = F.embedding_bag(self.vertices, blurred, per_sample_weights=self.weights, mode="sum")
        return (sliced * (_integral_scale(d) * CALIBRATION)).reshape(n, p, k)


def permutohedral_filter(features: Tensor, values: Tensor) -> Tensor:
    """Approximately ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` for each batch element, in O(points):
    :meth:`Lattice.filter` of the extended lattice of ``features`` (N, P, d); ``values`` (N, P, K)."""
    return Lattice.build(features).filter(values)
