"""Reliable-region mining of a whole split over a dask cluster, scored as it goes.

The rule (:func:`pipeline.method.prune.prune_image`) costs two dense CRFs per image and every image is
independent, so the images are spread over the processes of a ``dask.distributed`` cluster: a
``LocalCluster`` of one single-threaded process per core by default (pydensecrf holds the GIL,
so threads would not run in parallel), or a running scheduler given by its address, so the
same command runs on a cluster.

- Tasks take a chunk of :class:`~pipeline.data.manifest.Item` (ids and labels), never arrays: each
  worker reads the CAMs and the image, writes the reliable mask into the mask store and the
  labels of the two CRFs alone (:func:`~pipeline.method.prune.crf_labels`, what the refine
  stage learns its affinities from) into the CRF store itself, and returns only small counts,
  so no process ever holds all masks.
- The driver keeps a bounded number of tasks in flight and submits the next one as each
  finishes, so its memory does not grow with the number of images.
- A mask already complete in the store is read back instead of recomputed: a run killed
  part-way redoes only what it had not written. The store's fingerprint depends on
  :class:`~pipeline.method.prune.PruneParams` and the CAM store's fingerprint only, never on
  the `run:` section (:class:`~pipeline.core.run.RunParams`): another worker count or
  scheduler keeps the finished masks.
- Each image's mask depends only on its own inputs and the counts are integer sums, so masks
  and scores do not depend on the number of workers or the order tasks finish in.
- With the torch CRF backend (``prune.crf_backend: torch``) and a GPU, the images are mined in
  the stage's process instead, a batch of each image size at a time on the GPU; under
  ``torchrun`` each process mines its share on its own GPU (:func:`~pipeline.method.crf_runner.in_process`).

Scoring reads each image's ground truth once, in the task that prunes it: the precision and
coverage of the reliable pixels (:class:`~pipeline.method.metrics.PartialLabelScore`) and, for
comparison, the IoU of the plain CAM argmax with the rule's own background score
``(1 - max_c cam_c) ** ha_alpha`` (the dense labelling that pruning starts from; the best
fixed threshold is what ``metrics/cams.json`` reports).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE
from pipeline.core.provenance import MadeFrom, settings, start
from pipeline.core.registry import CAMS
from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Item, Manifest
from pipeline.method.crf import same_size
from pipeline.method.crf_runner import bounded_map, connect, in_process
from pipeline.method.metrics import PartialLabelScore, SegmentationScore
from pipeline.method.prune import PruneParams, mine_images, stack_scores

if TYPE_CHECKING:
    import torch

    from pipeline.core.distributed import Distributed
    from pipeline.core.stage import Context

def masks_made_from(manifest: Manifest, split: str, params: PruneParams, cams: ImageStore) -> MadeFrom:
    """What a mask store is made from: the images and tags of ``split``, the rule's settings and
    the CAMs (by their store's fingerprint)."""
    return MadeFrom.made(manifest, (split,), settings("prune", params), {"cams.zarr": cams.fingerprint})


CRF_SETTINGS = ("la_alpha", "ha_alpha", "crf_iterations", "crf_gaussian_sxy", "crf_gaussian_compat",
                "crf_bilateral_sxy", "crf_bilateral_srgb", "crf_bilateral_compat", "crf_backend")
"""The settings of :class:`~pipeline.method.prune.PruneParams` the labels of the two CRFs depend on."""


def crf_made_from(manifest: Manifest, split: str, params: PruneParams, cams: ImageStore) -> MadeFrom:
    """What a store of CRF labels is made from: as :func:`masks_made_from`, but of the settings
    only :data:`CRF_SETTINGS`, so that a threshold of the rule keeps the store (rewritten with the
    same bytes) and the refine stage that learns from it has nothing to redo."""
    crf_settings = {key: value for key, value in settings("prune", params).items()
                    if key.removeprefix("prune.") in CRF_SETTINGS}
    return MadeFrom.made(manifest, (split,), crf_settings, {"cams.zarr": cams.fingerprint})


def expected_masks(ctx: Context) -> MadeFrom:
    """The record a reader must find in the mask store now (registered in :mod:`pipeline.core.registry`)."""
    return masks_made_from(ctx.manifest, ctx.dataset.train_split, ctx.params(PruneParams, "prune"),
                           ctx.storage.store(CAMS))


def expected_crf(ctx: Context) -> MadeFrom:
    """The record a reader must find in the store of CRF labels now (registered in :mod:`pipeline.core.registry`)."""
    return crf_made_from(ctx.manifest, ctx.dataset.train_split, ctx.params(PruneParams, "prune"),
                         ctx.storage.store(CAMS))


def start_mining(manifest: Manifest, split: str, params: PruneParams, cams: ImageStore, masks: ImageStore,
                 crf: ImageStore) -> None:
    """Start the mask and CRF-label stores of ``split`` (see :func:`~pipeline.core.provenance.start`)."""
    start(crf, crf_made_from(manifest, split, params, cams))
    start(masks, masks_made_from(manifest, split, params, cams))


@dataclass(frozen=True)
class MiningJob:
    """What every task needs besides its items; small, so it travels with each task.

    ``manifest`` locates images and ground truth (its splits are not needed); store paths are
    absolute, so workers started elsewhere find them (they must see the same file system).
    """

    manifest: Manifest
    cams: ImageStore
    masks: ImageStore
    crf: ImageStore
    params: PruneParams
    device: str = "cpu"
    """Where the torch backend's CRFs run."""

    @classmethod
    def create(cls, manifest: Manifest, cams: ImageStore, masks: ImageStore, crf: ImageStore,
               params: PruneParams) -> MiningJob:
        return cls(replace(manifest, splits={}),
                   *(ImageStore(store.path.resolve(), store.stage) for store in (cams, masks, crf)), params)


@dataclass
class MiningScore:
    """Counts over a set of images, summed from the tasks' own.

    ``computed``: ids whose masks were pruned (the others were read back from the store);
    ``images``: images seen; ``scored``: those with a ground-truth mask; ``masks``: the
    reliable pixels against the ground truth; ``crf``: the labels of the two CRFs alone against
    it; ``cams``: the plain CAM argmax against it.
    """

    num_labels: int
    computed: list[str] = field(default_factory=list)
    images: int = 0
    scored: int = 0
    masks: PartialLabelScore = field(init=False)
    crf: PartialLabelScore = field(init=False)
    cams: SegmentationScore = field(init=False)

    def __post_init__(self) -> None:
        self.masks = PartialLabelScore(self.num_labels)
        self.crf = PartialLabelScore(self.num_labels)
        self.cams = SegmentationScore(self.num_labels)

    def add(self, other: MiningScore) -> None:
        self.computed += other.computed
        self.images += other.images
        self.scored += other.scored
        self.masks.counts += other.masks.counts
        self.crf.counts += other.crf.counts
        self.cams.confusion += other.cams.confusion

    def as_dict(self, label_names: Sequence[str]) -> dict[str, Any]:
        """``{"precision", "coverage", "per_class", "crf": {"precision", "coverage"}, "cam_argmax":
        {"miou", ...}, "images", "scored_images"}`` for JSON (None for a ratio with nothing to
        count, e.g. without ground truth)."""
        crf = self.crf.as_dict(label_names)
        return {
            **self.masks.as_dict(label_names),
            "crf": {key: crf[key] for key in ("precision", "coverage")},
            "cam_argmax": self.cams.as_dict(label_names),
            "images": self.images,
            "scored_images": self.scored,
        }


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"class", "precision", "coverage"}, ...]`` from :meth:`MiningScore.as_dict`, for a DVC bar plot."""
    return [
        {"class": name, "precision": scores["precision"], "coverage": scores["coverage"]}
        for name, scores in metrics["per_class"].items()
    ]


def cam_argmax(cams: np.ndarray, classes: Sequence[int], alpha: float) -> np.ndarray:
    """uint8 (H, W) labels of ``argmax([(1 - max cam) ** alpha, cams])``: 0 or class index + 1.

    All background for an image without classes (k = 0).
    """
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    values = np.concatenate([[0], np.asarray(classes) + 1]).astype(np.uint8)
    return values[stack_scores(cams, alpha).argmax(axis=0)]


def _check_size(where: Path, what: str, shape: tuple[int, ...], image: tuple[int, ...], hint: str) -> None:
    """Raise naming ``where`` unless an array of ``shape`` (H, W) matches its ``image`` (H, W)."""
    if shape != image:
        raise InputError(where, f"{what} is {shape[0]}x{shape[1]}, its image {image[0]}x{image[1]} ({hint})")


def _masks(job: MiningJob, items: Sequence[Item], cams: Sequence[np.ndarray],
           classes: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Each image's reliable mask, its CRF labels and whether they were computed now (False:
    read back from the stores, which hold both).

    Both are written as soon as they are computed, the CRF labels first, so that a killed run
    loses little: with pydensecrf one image at a time, with the torch backend one batch of the
    chunk's images of one size at a time (:func:`mine_images`). An image without classes (k = 0)
    gets all 255: without its tags nothing is known about it, and calling it all background
    would teach that any untagged object is background.
    """
    found = {index: (job.masks.read(item.id)[0], job.crf.read(item.id)[0], False)
             for index, item in enumerate(items) if item.id in job.masks and item.id in job.crf}
    todo = [index for index in range(len(items)) if index not in found]
    images = {index: job.manifest.read_image(items[index].id) for index in todo if cams[index].shape[0] > 0}
    for index, image in images.items():
        what = f"the CAM array of {items[index].id!r}"
        _check_size(job.cams.path, what, cams[index].shape[1:], image.shape[:2], "rerun the cams stage")
    for group in _prune_groups(images, job.params):
        mined = mine_images([images[index] for index in group], [cams[index] for index in group],
                            [np.asarray(classes[index]) for index in group], job.params, job.device)
        for index, (mask, crf) in zip(group, mined, strict=True):
            _write(job, items[index].id, mask, crf)
            found[index] = (mask, crf, True)
    for index in todo:
        if index not in found:
            unknown = np.full(cams[index].shape[1:], IGNORE, dtype=np.uint8)
            _write(job, items[index].id, unknown, unknown)
            found[index] = (unknown, unknown, True)
    return [found[index] for index in range(len(items))]


def _write(job: MiningJob, image_id: str, mask: np.ndarray, crf: np.ndarray) -> None:
    job.crf.write(image_id, crf)
    job.masks.write(image_id, mask)


def _prune_groups(images: dict[int, np.ndarray], params: PruneParams) -> list[list[int]]:
    """The keys of ``images`` to prune together: each alone with pydensecrf, those of one size with torch."""
    if params.crf_backend == "pydensecrf":
        return [[index] for index in images]
    indices = list(images)
    return [[indices[at] for at in group] for group in same_size(list(images.values()))]


def mine_chunk(job: MiningJob, items: Sequence[Item]) -> MiningScore:
    """Prune (or read back) and score each of ``items``: the task that runs on the workers."""
    score = MiningScore(job.manifest.num_classes + 1)
    read = [job.cams.read(item.id) for item in items]
    cams = [array.astype(np.float32) for array, _ in read]
    classes = [attrs["classes"] for _, attrs in read]
    for item, own_cams, own, (mask, crf, computed) in zip(items, cams, classes, _masks(job, items, cams, classes)):
        score.images += 1
        if computed:
            score.computed.append(item.id)
        gt = job.manifest.read_mask(item)
        if gt is None:
            continue
        what = f"the ground-truth mask of {item.id!r}"
        _check_size(job.manifest.mask_path(item.id), what, gt.shape, mask.shape, "a mask must match its image")
        score.scored += 1
        score.masks.update(gt, mask)
        score.crf.update(gt, crf)
        score.cams.update(gt, cam_argmax(own_cams, own, job.params.ha_alpha))
    return score


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    return (items[start : start + size] for start in range(0, len(items), size))


def mine_split(
    manifest: Manifest,
    split: str,
    cams: ImageStore,
    masks: ImageStore,
    crf: ImageStore,
    params: PruneParams,
    run: RunParams,
    progress: bool = True,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> MiningScore:
    """Write the reliable-region mask of every image of ``split`` into ``masks`` and the labels of
    its two CRFs into ``crf``, and score them.

    Refuses to start unless the CAM store is complete. Keeps what the stores hold if they were
    started from the same settings and CAMs, else starts them anew; marks them complete once
    every image is in. Returns the summed counts (``computed`` sorted).

    Without ``device`` the images are spread over the dask cluster of
    :func:`~pipeline.method.crf_runner.connect`, chunks of ``run.chunk_size``; with one (the torch
    backend on a GPU, see :func:`~pipeline.method.crf_runner.in_process`) they are mined in this
    process, ``run.inference_batch`` at a time, and process ``rank`` of a job of ``world_size``
    takes the ids ``[rank::world_size]`` only: the stores are then started and marked complete by
    the caller, and the counts are this process's share.
    """
    if world_size > 1 and device is None:
        raise ValueError("several processes share a split only when each mines in its own process (device)")
    cams.require_complete()
    items = manifest.split(split)
    share = items[rank::world_size]
    if world_size == 1:
        start_mining(manifest, split, params, cams, masks, crf)
    job = MiningJob.create(manifest, cams, masks, crf, params)
    total = MiningScore(manifest.num_classes + 1)
    with tqdm(total=len(share), desc=f"prune {split}", unit="img", disable=not progress) as bar:
        for score in _chunk_scores(job, share, run, device):
            total.add(score)
            bar.update(score.images)
    if world_size == 1:
        for store in (crf, masks):
            store.mark_complete(item.id for item in items)
    total.computed.sort()
    return total


def mine_stage(manifest: Manifest, split: str, cams: ImageStore, masks: ImageStore, crf: ImageStore,
               params: PruneParams, run: RunParams, dist: Distributed, device: torch.device) -> MiningScore | None:
    """:func:`mine_split` as the prune stage runs it, where :mod:`pipeline.method.crf_runner` says:
    with the torch backend on a GPU in the stage's own process on ``device``; under
    ``torchrun`` every process mines its share there and rank 0 then reads every mask back and
    scores them all; otherwise rank 0 alone, over the dask cluster. The score on rank 0, None on
    the others."""
    if not in_process(params.crf_backend, run, dist.enabled):
        return mine_split(manifest, split, cams, masks, crf, params, run) if dist.is_main else None
    if dist.enabled:
        if dist.is_main:
            start_mining(manifest, split, params, cams, masks, crf)
        dist.barrier()
        mine_split(manifest, split, cams, masks, crf, params, run, dist.is_main, device, dist.rank, dist.world_size)
        dist.barrier()
        if not dist.is_main:
            return None
    return mine_split(manifest, split, cams, masks, crf, params, run, device=device)


def _chunk_scores(job: MiningJob, items: Sequence[Item], run: RunParams,
                  device: torch.device | None) -> Iterator[MiningScore]:
    """:func:`mine_chunk` of every chunk of ``items``, in this process on ``device`` or over the cluster."""
    if device is not None:
        here = replace(job, device=str(device))
        yield from (mine_chunk(here, chunk) for chunk in _chunks(items, run.inference_batch))
        return
    with connect(run) as client:
        yield from bounded_map(client, partial(mine_chunk, job), _chunks(items, run.chunk_size))
