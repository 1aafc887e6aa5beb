"""Reliable-region pruning (SPEC section 3): which pixels of an image's CAMs to trust as labels.

For one image with present classes c1..ck and max-normalised CAMs:

- ``bg = (1 - max_c cam_c) ** alpha``; the stack ``[bg, cam_c1, ..., cam_ck]`` goes through a
  dense CRF twice, with a low alpha ("la", more background) and a high alpha ("ha", less).
- Start from ``la_label``; where la says background the label is unknown (255), then where ha
  says background it is background (0).
- CAM-sure: with ``cam_label = argmax([bg(ha alpha), cams])``, for each foreground label in
  ``la_label`` the pixels of its ``cam_label`` region whose CAM is strictly above the value at
  index ``floor(0.6 * n)`` of the region's n CAM values above 0.1, sorted ascending (about the
  top 40%); if background is in ``la_label``, the pixels of the background ``cam_label`` region
  whose ha background score exceeds 0.8.
- CRF-sure: ``max([ha background probability, la foreground probabilities]) >= 0.8``.
- A pixel keeps its start label only if it is both CAM-sure and CRF-sure; otherwise 255.

The CRF step (:func:`run_crfs`) and the rule on its outputs (:func:`apply_rule`) are separate:
the CRFs depend on the alphas and the CRF settings alone, the rule on the thresholds, so the crf
stage keeps what the rule needs of them (:class:`CrfOutputs`) and a threshold reruns the rule
alone; the rule can also be checked on given probabilities (:func:`label_reliable`).
:func:`crf_labels` is the rule's start before the two confidence filters: the labels of the two
CRFs alone, which PSA and IRN learn their affinities from.
``crf_backend`` chooses how the CRFs are computed (:mod:`pipeline.method.crf`): pydensecrf image
by image, or the torch mean field, which runs both CRFs of each image together and images of one
size as one batch, on the CPU or a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.io import IGNORE
from pipeline.core.params import check_range
from pipeline.method.crf import PRUNE_CRF, CRFParams
from pipeline.method.crf_runner import dense_crf

if TYPE_CHECKING:
    import torch

MAX_CLASS_INDEX = IGNORE - 2
"""The largest 0-based class index whose label value (index + 1) stays below IGNORE."""


@dataclass(frozen=True)
class PruneParams:
    """The thresholds, alphas and CRF settings of pruning; the defaults are the paper's."""

    la_alpha: float = 4.0
    ha_alpha: float = 32.0
    cam_floor: float = 0.1
    cam_quantile: float = 0.6
    bg_threshold: float = 0.8
    crf_confidence: float = 0.8
    crf_iterations: int = PRUNE_CRF.iterations
    crf_gaussian_sxy: float = PRUNE_CRF.gaussian_sxy
    crf_gaussian_compat: float = PRUNE_CRF.gaussian_compat
    crf_bilateral_sxy: float = PRUNE_CRF.bilateral_sxy
    crf_bilateral_srgb: float = PRUNE_CRF.bilateral_srgb
    crf_bilateral_compat: float = PRUNE_CRF.bilateral_compat
    crf_backend: str = "pydensecrf"

    def __post_init__(self) -> None:
        check_range("la_alpha", self.la_alpha, 0)
        check_range("ha_alpha", self.ha_alpha, 0)
        check_range("cam_floor", self.cam_floor, 0, 1)
        check_range("cam_quantile", self.cam_quantile, 0, 1)
        check_range("bg_threshold", self.bg_threshold, 0, 1)
        check_range("crf_confidence", self.crf_confidence, 0, 1)
        try:
            _ = self.crf  # CRFParams checks the CRF settings, naming them without the "crf_" prefix
        except ValueError as error:
            raise ValueError(f"crf_{error}") from None

    @property
    def crf(self) -> CRFParams:
        return CRFParams(
            iterations=self.crf_iterations,
            gaussian_sxy=self.crf_gaussian_sxy,
            gaussian_compat=self.crf_gaussian_compat,
            bilateral_sxy=self.crf_bilateral_sxy,
            bilateral_srgb=self.crf_bilateral_srgb,
            bilateral_compat=self.crf_bilateral_compat,
            backend=self.crf_backend,
        )


def background_score(cams: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - max_c cam_c) ** alpha``, (H, W): high where no class is active."""
    return (1.0 - cams.max(axis=0)) ** alpha


def stack_scores(cams: np.ndarray, alpha: float) -> np.ndarray:
    """``[bg, cam_c1, ..., cam_ck]``, (k + 1, H, W): index 0 is background, i > 0 is ``cams[i - 1]``."""
    return np.concatenate([background_score(cams, alpha)[None], cams])


def cam_winners(cams: np.ndarray, ha_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``cam_label = argmax([bg(ha alpha), cams])``, uint8 (H, W) (0 background, i for
    ``cams[i - 1]``), and the winner's score there, float (H, W): within each ``cam_label``
    region the CAM of its class (the high-alpha background score in the background's), all the
    CAM-sure test reads of the CAMs."""
    stacked = np.concatenate([background_score(cams, ha_alpha)[None], cams])
    label = stacked.argmax(axis=0)
    return label.astype(np.uint8), np.take_along_axis(stacked, label[None], axis=0)[0]


def cam_confident(cam_label: np.ndarray, cam_value: np.ndarray, present: Sequence[int],
                  params: PruneParams) -> np.ndarray:
    """The CAM-sure pixels, bool (H, W), for the stacked labels ``present`` in the low-alpha
    CRF's labels (0 background, i for ``cams[i - 1]``), from :func:`cam_winners`.

    A foreground label's quantile threshold is taken over its own ``cam_label`` region; the
    index is capped at the last value so that a quantile of 1 keeps nothing instead of failing.
    """
    sure = np.zeros(cam_label.shape, dtype=bool)
    for label in present:
        region = cam_label == label
        if label == 0:
            sure |= region & (cam_value > params.bg_threshold)
            continue
        values = np.sort(cam_value[region & (cam_value > params.cam_floor)])
        if values.size:
            threshold = values[min(math.floor(params.cam_quantile * values.size), values.size - 1)]
            sure |= region & (cam_value > threshold)
    return sure


def crf_confidence(la_probs: np.ndarray, ha_probs: np.ndarray) -> np.ndarray:
    """The CRFs' confidence, float (H, W): ``max([ha background, la foregrounds])``; a pixel
    is CRF-sure where it reaches ``crf_confidence``."""
    return np.maximum(ha_probs[0], la_probs[1:].max(axis=0))


def stack_values(classes: Sequence[int]) -> np.ndarray:
    """The label value of each entry of the stack ``[bg, cam_c1, ..., cam_ck]``, uint8: 0, then
    each class index + 1 (index a stacked argmax with it)."""
    return np.concatenate([[0], np.asarray(classes, dtype=np.int64) + 1]).astype(np.uint8)


def crf_labels(classes: np.ndarray, la_probs: np.ndarray, ha_probs: np.ndarray) -> np.ndarray:
    """The labels of the two CRFs, uint8 (H, W): ``la_label`` where the low-alpha CRF says
    foreground, background (0) where the high-alpha CRF says background, 255 between (PSA's
    affinity labels). ``la_probs``, ``ha_probs`` as for :func:`label_reliable`."""
    labels = stack_values(classes)[la_probs.argmax(axis=0)]
    labels[labels == 0] = IGNORE
    labels[ha_probs.argmax(axis=0) == 0] = 0
    return labels


@dataclass(frozen=True)
class CrfOutputs:
    """What the rule needs of an image's CAMs and two CRFs, all the thresholds of
    :class:`PruneParams` aside (what the crf stage keeps per image): the CRFs' labels
    (:func:`crf_labels`), the stacked labels present in the low-alpha CRF's labels, the CRFs'
    confidence (:func:`crf_confidence`), and the CAM argmax and its score (:func:`cam_winners`).
    Each depends on the CAMs, the alphas and the CRF settings alone."""

    labels: np.ndarray
    present: tuple[int, ...]
    confidence: np.ndarray
    cam_label: np.ndarray
    cam_value: np.ndarray

    @classmethod
    def of(cls, cams: np.ndarray, classes: np.ndarray, la_probs: np.ndarray, ha_probs: np.ndarray,
           ha_alpha: float) -> CrfOutputs:
        """From the CAMs (k, H, W) and the (k + 1, H, W) marginals of the stack with the low and high alpha."""
        present = tuple(int(label) for label in np.unique(la_probs.argmax(axis=0)))
        return cls(crf_labels(classes, la_probs, ha_probs), present, crf_confidence(la_probs, ha_probs),
                   *cam_winners(cams, ha_alpha))

    @classmethod
    def unknown(cls, size: tuple[int, ...]) -> CrfOutputs:
        """Those of an image without tags: all 255, nothing present (the rule keeps nothing)."""
        zeros = np.zeros(size, dtype=np.float32)
        return cls(np.full(size, IGNORE, dtype=np.uint8), (), zeros, zeros.astype(np.uint8), zeros)

    def planes(self) -> np.ndarray:
        """float32 (4, H, W): the labels, the confidence, the CAM label and its score (the labels
        exact as floats), as one array to read."""
        return np.stack([self.labels, self.confidence, self.cam_label, self.cam_value]).astype(np.float32)

    @classmethod
    def from_planes(cls, planes: np.ndarray, present: Sequence[int]) -> CrfOutputs:
        labels, confidence, cam_label, cam_value = planes
        return cls(labels.astype(np.uint8), tuple(present), confidence, cam_label.astype(np.uint8), cam_value)


def apply_rule(crf: CrfOutputs, params: PruneParams) -> np.ndarray:
    """The rule's thresholds on an image's kept CAM and CRF outputs: uint8 (H, W) labels (0,
    class index + 1) or 255: a pixel keeps its CRF label where it is CAM-sure and CRF-sure."""
    labels = crf.labels.copy()
    sure = (cam_confident(crf.cam_label, crf.cam_value, crf.present, params)
            & (crf.confidence >= params.crf_confidence))
    labels[~sure] = IGNORE
    return labels


def label_reliable(
    cams: np.ndarray,
    classes: np.ndarray,
    la_probs: np.ndarray,
    ha_probs: np.ndarray,
    params: PruneParams,
) -> np.ndarray:
    """The rule on given CRF marginals: uint8 (H, W) labels (0, class index + 1) or 255.

    ``la_probs`` and ``ha_probs`` are the (k + 1, H, W) marginals of the stack with the low and
    high alpha; ``cams`` (k, H, W) and ``classes`` (k,) as for :func:`reliable_regions`.
    """
    return apply_rule(CrfOutputs.of(cams, classes, la_probs, ha_probs, params.ha_alpha), params)


def _check_inputs(image: np.ndarray, cams: np.ndarray, classes: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be uint8 (H, W, 3) with H, W >= 1, got {image.dtype} {image.shape}")
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams must be (k, H, W) with H, W of the image {image.shape[:2]}, got {cams.shape}")
    if not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"cams must be floating point, got {cams.dtype}")
    if cams.shape[0] < 1:
        raise ValueError("cams must hold at least one class (k >= 1)")
    if not (np.all(cams >= 0) and np.all(cams <= 1)):
        raise ValueError("cams must be max-normalised: every value in [0, 1] (no NaN)")
    if classes.ndim != 1 or classes.shape[0] != cams.shape[0]:
        raise ValueError(f"classes must list one class index per CAM ({cams.shape[0]}), got {classes.shape}")
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be integer class indices, got {classes.dtype}")
    if classes.min() < 0 or classes.max() > MAX_CLASS_INDEX or np.unique(classes).size != classes.size:
        raise ValueError(f"classes must be distinct indices in 0..{MAX_CLASS_INDEX}, got {classes.tolist()}")


def prune_image(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, params: PruneParams) -> np.ndarray:
    """The reliable labels of one image, uint8 (H, W): both CRFs, then :func:`label_reliable`."""
    return prune_images([image], [cams], [classes], params)[0]


def prune_images(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], classes: Sequence[np.ndarray],
                 params: PruneParams, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """:func:`prune_image` of each image; with the torch backend, the images of one size go
    through the CRFs as one batch on ``device`` (pydensecrf runs on this CPU core, image by image)."""
    return [apply_rule(crf, params) for crf in run_crfs(images, cams, classes, params, device)]


def run_crfs(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], classes: Sequence[np.ndarray],
             params: PruneParams, device: torch.device | str = "cpu") -> list[CrfOutputs]:
    """The two CRFs of each image, as :class:`CrfOutputs` (see :func:`prune_images`)."""
    classes = [np.asarray(own) for own in classes]
    for image, own_cams, own in zip(images, cams, classes, strict=True):
        _check_inputs(image, own_cams, own)
    cams = [own_cams.astype(np.float32, copy=False) for own_cams in cams]
    alphas = (params.la_alpha, params.ha_alpha)
    if params.crf_backend == "pydensecrf":
        found = [[dense_crf(image, stack_scores(own, alpha), params.crf) for alpha in alphas]
                 for image, own in zip(images, cams)]
    else:
        from pipeline.method.meanfield import marginals  # loads torch, which pydensecrf's processes need not

        stacks = [np.stack([stack_scores(own, alpha) for alpha in alphas]) for own in cams]
        found = marginals(images, stacks, params.crf, device)
    return [CrfOutputs.of(own_cams, own, la, ha, params.ha_alpha)
            for own_cams, own, (la, ha) in zip(cams, classes, found, strict=True)]


def reliable_regions(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, **params: Any) -> np.ndarray:
    """Reliable labels of one image: uint8 (H, W), 0 background, class index + 1, 255 unreliable.

    ``image`` uint8 (H, W, 3) RGB; ``cams`` float (k, H, W), each max-normalised; ``classes`` the
    k 0-based class indices. ``params`` override :class:`PruneParams` fields by name; an unknown
    name is a TypeError.
    """
    return prune_image(image, cams, classes, PruneParams(**params))
