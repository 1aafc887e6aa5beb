"""Reliable-region mining of a whole split, in two steps that DVC runs apart, scored as it goes.

1. **The CRFs** (the crf stage, :func:`mine_split`): the two dense CRFs of each image depend on
   the CAMs, the alphas and the CRF settings alone, and cost almost all of the time, so what the
   rule needs of them and of the CAMs (:class:`~pipeline.method.prune.CrfOutputs`) is kept per
   image, exact: the CRFs' labels in the CRF store (``crf.zarr``, uint8; what the refine stage
   learns from), and those labels, the CRFs' confidence, the CAM argmax and its score as one
   float32 (4, H, W) array in the CRF maps store (``crfmaps.zarr``, with the stacked labels the
   low-alpha CRF gives in the array's attribute ``present``).
2. **The rule** (the prune stage, :func:`prune_split`): the thresholds on the kept maps alone,
   which gives the masks byte for byte as the rule on the CAMs and the marginals would
   (:func:`~pipeline.method.prune.apply_rule`); milliseconds an image, in this process.

Every image is independent, so the CRFs are spread over the processes of a ``dask.distributed``
cluster: a ``LocalCluster`` of one single-threaded process per core by default (pydensecrf holds
the GIL), or a running scheduler (see :mod:`pipeline.method.crf_runner`).

- Tasks take a chunk of :class:`~pipeline.data.manifest.Item` (ids and labels), never arrays: each
  worker reads the CAMs and the image, writes its outputs into the stores itself and returns
  only small counts, so no process ever holds all of them.
- An image already complete in the stores is read back instead of recomputed: a run killed
  part-way redoes only what it had not written. The stores' fingerprints depend on their
  settings and inputs only, never on the `run:` section (:class:`~pipeline.core.run.RunParams`).
- Each image's outputs depend only on its own inputs and the counts are integer sums, so they do
  not depend on the number of workers or the order tasks finish in.
- With the torch CRF backend (``prune.crf_backend: torch``) and a GPU, the CRFs run in the
  stage's process instead, a batch of each image size at a time on the GPU; under ``torchrun``
  each process runs its share on its own GPU (:func:`~pipeline.method.crf_runner.in_process`).

Scoring reads each image's ground truth in the task that makes its outputs: the precision and
coverage (:class:`~pipeline.method.metrics.PartialLabelScore`) of the reliable pixels (the prune
stage) and of the CRF labels (the crf stage, with, for comparison, the IoU of the plain CAM
argmax with the rule's own background score ``(1 - max_c cam_c) ** ha_alpha``: the dense
labelling that pruning starts from; the best fixed threshold is what ``metrics/cams.json``
reports).
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
from pipeline.core.provenance import MadeFrom, settings, start
from pipeline.core.registry import CAMS, CRF_MAPS, CRF_SETTINGS
from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Item, Manifest
from pipeline.method.crf import same_size
from pipeline.method.crf_runner import bounded_map, connect, in_process
from pipeline.method.metrics import PartialLabelScore, SegmentationScore
from pipeline.method.prune import CrfOutputs, PruneParams, apply_rule, run_crfs, stack_values

if TYPE_CHECKING:
    import torch

    from pipeline.core.distributed import Distributed
    from pipeline.core.stage import Context

def crf_made_from(manifest: Manifest, split: str, params: PruneParams, cams: ImageStore) -> MadeFrom:
    """What the CRF and CRF maps stores are made from: the images and tags of ``split``, the
    alphas and CRF settings (:data:`~pipeline.core.registry.CRF_SETTINGS`) and the CAMs (by their
    store's fingerprint); ``contents`` names what the arrays hold, so that a CRF store made before
    the maps were kept beside it is made anew. No threshold of the rule: changing one keeps both
    stores."""
    crf_settings = {key: value for key, value in settings("prune", params).items() if key in CRF_SETTINGS}
    contents = "crf labels; maps: labels, confidence, cam label, cam value"
    return MadeFrom.made("crf", manifest, (split,), crf_settings, {"cams.zarr": cams.fingerprint, "contents": contents})


def masks_made_from(manifest: Manifest, split: str, params: PruneParams, maps: ImageStore) -> MadeFrom:
    """What a mask store is made from: the images and tags of ``split``, the rule's settings and
    the kept CRF maps (by their store's fingerprint, which holds the CAMs')."""
    return MadeFrom.made("prune", manifest, (split,), settings("prune", params),
                         {"crfmaps.zarr": maps.fingerprint})


def expected_crf(ctx: Context) -> MadeFrom:
    """The record a reader must find in the CRF and CRF maps stores now (registered in
    :mod:`pipeline.core.registry`)."""
    return crf_made_from(ctx.manifest, ctx.dataset.train_split, ctx.params(PruneParams, "prune"),
                         ctx.storage.store(CAMS))


def expected_masks(ctx: Context) -> MadeFrom:
    """The record a reader must find in the mask store now (registered in :mod:`pipeline.core.registry`)."""
    return masks_made_from(ctx.manifest, ctx.dataset.train_split, ctx.params(PruneParams, "prune"),
                           ctx.storage.store(CRF_MAPS))


def start_mining(manifest: Manifest, split: str, params: PruneParams, cams: ImageStore, crf: ImageStore,
                 maps: ImageStore) -> None:
    """Start the CRF and CRF maps stores of ``split`` (see :func:`~pipeline.core.provenance.start`)."""
    for store in (crf, maps):
        start(store, crf_made_from(manifest, split, params, cams))


@dataclass(frozen=True)
class MiningJob:
    """What every task of the crf stage needs besides its items; small, so it travels with each task.

    ``manifest`` locates images and ground truth (its splits are not needed); store paths are
    absolute, so workers started elsewhere find them (they must see the same file system).
    """

    manifest: Manifest
    cams: ImageStore
    crf: ImageStore
    maps: ImageStore
    params: PruneParams
    device: str = "cpu"
    """Where the torch backend's CRFs run."""

    @classmethod
    def create(cls, manifest: Manifest, cams: ImageStore, crf: ImageStore, maps: ImageStore,
               params: PruneParams) -> MiningJob:
        def absolute(store: ImageStore) -> ImageStore:
            return ImageStore(store.path.resolve(), store.stage)

        return cls(replace(manifest, splits={}), absolute(cams), absolute(crf), absolute(maps), params)


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


def _check_size(where: Path, what: str, shape: tuple[int, ...], image: tuple[int, ...], hint: str) -> None:
    """Raise naming ``where`` unless an array of ``shape`` (H, W) matches its ``image`` (H, W)."""
    if shape != image:
        raise InputError(where, f"{what} is {shape[0]}x{shape[1]}, its image {image[0]}x{image[1]} ({hint})")


def _read_cams(job: MiningJob, items: Sequence[Item]) -> tuple[list[np.ndarray], list[list[int]]]:
    read = [job.cams.read(item.id) for item in items]
    return [array.astype(np.float32) for array, _ in read], [attrs["classes"] for _, attrs in read]


def _write_crf(job: MiningJob, image_id: str, crf: CrfOutputs) -> None:
    """The maps first, the labels last: an image counts as done once its labels are in."""
    job.maps.write(image_id, crf.planes(), present=list(crf.present))
    job.crf.write(image_id, crf.labels)


def _crf_outputs(job: MiningJob, items: Sequence[Item], cams: Sequence[np.ndarray],
                 classes: Sequence[Sequence[int]]) -> list[tuple[CrfOutputs, bool]]:
    """Each image's CRF outputs and whether they were computed now (False: read back from the stores).

    Written as soon as computed: with pydensecrf one image at a time, with the torch backend one
    batch of the chunk's images of one size at a time, so that a killed run loses little. An
    image without classes (k = 0) gets all 255 and nothing present: without its tags nothing is
    known about it, and calling it all background would teach that any untagged object is
    background.
    """
    kept = job.maps.read_whole([item.id for item in items if item.id in job.crf])
    found = {index: (CrfOutputs.from_planes(kept[item.id][0], kept[item.id][1]["present"]), False)
             for index, item in enumerate(items) if item.id in kept}
    todo = [index for index in range(len(items)) if index not in found]
    images = {index: job.manifest.read_image(items[index].id) for index in todo if cams[index].shape[0] > 0}
    for index, image in images.items():
        what = f"the CAM array of {items[index].id!r}"
        _check_size(job.cams.path, what, cams[index].shape[1:], image.shape[:2], "rerun the cams stage")
    for group in _crf_groups(images, job.params):
        computed = run_crfs([images[index] for index in group], [cams[index] for index in group],
                            [np.asarray(classes[index]) for index in group], job.params, job.device)
        for index, crf in zip(group, computed, strict=True):
            _write_crf(job, items[index].id, crf)
            found[index] = (crf, True)
    for index in todo:
        if index not in found:
            unknown = CrfOutputs.unknown(cams[index].shape[1:])
            _write_crf(job, items[index].id, unknown)
            found[index] = (unknown, True)
    return [found[index] for index in range(len(items))]


def _crf_groups(images: dict[int, np.ndarray], params: PruneParams) -> list[list[int]]:
    """The keys of ``images`` whose CRFs run together: each alone with pydensecrf, those of one size with torch."""
    if params.crf_backend == "pydensecrf":
        return [[index] for index in images]
    indices = list(images)
    return [[indices[at] for at in group] for group in same_size(list(images.values()))]


def _ground_truth(job: MiningJob | RuleJob, item: Item, shape: tuple[int, ...]) -> np.ndarray | None:
    gt = job.manifest.read_mask(item)
    if gt is not None:
        what = f"the ground-truth mask of {item.id!r}"
        _check_size(job.manifest.mask_path(item.id), what, gt.shape, shape, "a mask must match its image")
    return gt


def mine_chunk(job: MiningJob, items: Sequence[Item]) -> MiningScore:
    """Run the CRFs of (or read back) and score each of ``items``: the crf stage's task."""
    score = MiningScore(job.manifest.num_classes + 1)
    cams, classes = _read_cams(job, items)
    for item, own, (crf, computed) in zip(items, classes, _crf_outputs(job, items, cams, classes), strict=True):
        score.images += 1
        if computed:
            score.computed.append(item.id)
        gt = _ground_truth(job, item, crf.labels.shape)
        if gt is not None:
            score.scored += 1
            score.crf.update(gt, crf.labels)
            score.cams.update(gt, stack_values(own)[crf.cam_label])  # the CAM argmax the rule reads
    return score


@dataclass(frozen=True)
class RuleJob:
    """What the prune stage's tasks need: where the ground truth is, the kept CRF maps, the masks
    to write and the rule's settings."""

    manifest: Manifest
    maps: ImageStore
    masks: ImageStore
    params: PruneParams
    fresh: bool = False
    """Whether the mask store was started anew: none of its masks to read back."""


def prune_chunk(job: RuleJob, items: Sequence[Item]) -> MiningScore:
    """The rule on (or the masks read back of) each of ``items`` from its kept CRF maps, scored:
    the prune stage's task. (The CRF labels and the CAM argmax, which no threshold changes, are
    scored by :func:`mine_chunk`.)

    The stores are read and written a chunk at a time (:meth:`ImageStore.read_many`,
    :meth:`ImageStore.write_many`): the rule takes milliseconds an image, as much as its reads and
    writes."""
    score = MiningScore(job.manifest.num_classes + 1)
    ids = [item.id for item in items]
    masks = {} if job.fresh else {image_id: mask for image_id, (mask, _) in job.masks.read_whole(ids).items()}
    todo = [image_id for image_id in ids if image_id not in masks]
    written = [(image_id, apply_rule(CrfOutputs.from_planes(planes, attrs["present"]), job.params), {})
               for image_id, (planes, attrs) in zip(todo, job.maps.read_many(todo), strict=True)]
    job.masks.write_many(written)
    masks |= {image_id: mask for image_id, mask, _ in written}
    for item, mask in zip(items, (masks[image_id] for image_id in ids), strict=True):
        score.images += 1
        gt = _ground_truth(job, item, mask.shape)
        if gt is not None:
            score.scored += 1
            score.masks.update(gt, mask)
    score.computed = [image_id for image_id, _, _ in written]
    return score


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    return (items[start : start + size] for start in range(0, len(items), size))


def _summed(scores: Iterator[MiningScore], total: MiningScore, description: str, images: int,
            progress: bool) -> MiningScore:
    with tqdm(total=images, desc=description, unit="img", disable=not progress) as bar:
        for score in scores:
            total.add(score)
            bar.update(score.images)
    total.computed.sort()
    return total


def mine_split(
    manifest: Manifest,
    split: str,
    cams: ImageStore,
    crf: ImageStore,
    maps: ImageStore,
    params: PruneParams,
    run: RunParams,
    progress: bool = True,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> MiningScore:
    """Run the two CRFs of every image of ``split``, keep their labels in ``crf`` and what the
    rule needs of them and of the CAMs in ``maps``, and score the CRF labels (and the CAM argmax).

    Refuses to start unless the CAM store is complete. Keeps what the stores hold if they were
    started from the same settings and CAMs, else starts them anew; marks them complete once
    every image is in. Returns the summed counts (``computed`` sorted).

    Without ``device`` the images are spread over the dask cluster of
    :func:`~pipeline.method.crf_runner.connect`, chunks of ``run.chunk_size``; with one (the torch
    backend on a GPU, see :func:`~pipeline.method.crf_runner.in_process`) they run in this
    process, ``run.inference_batch`` at a time, and process ``rank`` of a job of ``world_size``
    takes the ids ``[rank::world_size]`` only: the stores are then started and marked complete by
    the caller, and the counts are this process's share.
    """
    if world_size > 1 and device is None:
        raise ValueError("several processes share a split only when each runs its CRFs in its own process (device)")
    cams.require_complete()
    items = manifest.split(split)
    share = items[rank::world_size]
    if world_size == 1:
        start_mining(manifest, split, params, cams, crf, maps)
    job = MiningJob.create(manifest, cams, crf, maps, params)
    total = _summed(_chunk_scores(job, share, run, device), MiningScore(manifest.num_classes + 1), f"crf {split}",
                    len(share), progress)
    if world_size == 1:
        for store in (crf, maps):  # the maps last: the prune stage reads them, the refine stage the labels
            store.mark_complete(item.id for item in items)
    return total


def mine_stage(manifest: Manifest, split: str, cams: ImageStore, crf: ImageStore, maps: ImageStore,
               params: PruneParams, run: RunParams, dist: Distributed, device: torch.device) -> MiningScore | None:
    """:func:`mine_split` as the crf stage runs it, where :mod:`pipeline.method.crf_runner` says:
    with the torch backend on a GPU in the stage's own process on ``device``; under
    ``torchrun`` every process runs its share there and rank 0 then reads every image back and
    scores them all; otherwise rank 0 alone, over the dask cluster. The score on rank 0, None on
    the others."""
    if not in_process(params.crf_backend, run, dist.enabled):
        return mine_split(manifest, split, cams, crf, maps, params, run) if dist.is_main else None
    if dist.enabled:
        if dist.is_main:
            start_mining(manifest, split, params, cams, crf, maps)
        dist.barrier()
        mine_split(manifest, split, cams, crf, maps, params, run, dist.is_main, device, dist.rank,
                   dist.world_size)
        dist.barrier()
        if not dist.is_main:
            return None
    return mine_split(manifest, split, cams, crf, maps, params, run, device=device)


def _chunk_scores(job: MiningJob, items: Sequence[Item], run: RunParams,
                  device: torch.device | None) -> Iterator[MiningScore]:
    """:func:`mine_chunk` of every chunk of ``items``, in this process on ``device`` or over the cluster."""
    if device is not None:
        here = replace(job, device=str(device))
        yield from (mine_chunk(here, chunk) for chunk in _chunks(items, run.inference_batch))
        return
    with connect(run) as client:
        yield from bounded_map(client, partial(mine_chunk, job), _chunks(items, run.chunk_size))


PRUNE_CHUNK = 32
"""Images the rule reads and writes at once."""


def prune_split(manifest: Manifest, split: str, maps: ImageStore, masks: ImageStore, params: PruneParams,
                progress: bool = True) -> MiningScore:
    """Apply the rule to every image of ``split`` from its kept CRF maps, write the masks into
    ``masks`` and score them.

    Refuses to start unless the maps store is complete. Keeps the masks the store holds if it
    was started from the same settings and maps; marks it complete once every image is in. In
    this process, a chunk of images at a time: no cluster to start for a rule of milliseconds an
    image.
    """
    maps.require_complete()
    items = manifest.split(split)
    kept = start(masks, masks_made_from(manifest, split, params, maps))
    job = RuleJob(manifest, maps, masks, params, fresh=not kept)
    total = _summed((prune_chunk(job, chunk) for chunk in _chunks(items, PRUNE_CHUNK)),
                    MiningScore(manifest.num_classes + 1), f"prune {split}", len(items), progress)
    masks.mark_complete(item.id for item in items)
    return total
