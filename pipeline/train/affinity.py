"""The refine stage's work (stage 7, beyond the paper): affinities learnt from the prune stage's
labels, and the training split's CAMs propagated over them into dense pseudo-labels.

The affinity network (:class:`~pipeline.models.affinity.AffinityNet`) reads the classifier's
backbone as the classifier stage left it, as IRN keeps its backbone, and learns only its new
layers from the pairs of cells the prune stage's labels label (PSA's affinity labels and loss,
:mod:`pipeline.method.affinity`): by default the labels of its two CRFs alone (``crf.zarr``),
which is what PSA and IRN learn from, rather than the reliable masks, whose confidence filters
leave the pixels around each object unlabelled and so teach the network little of where objects
end. Each training image's CAMs are then averaged down to the network's grid, walked
``2 ** log_steps`` steps over the affinities raised to ``beta`` (fewer on a small grid, see
:meth:`RefineParams.steps_on`), upsampled back bilinearly, and background competes with them
(see :attr:`RefineParams.background`; IRN's threshold chosen over the whole split's walks with
``bg_threshold: auto``, :func:`walk_split`); the argmax over background and the image's own tags gives
its label, and the affinity labels' regions of those classes complete the objects the walk found
(:attr:`RefineParams.keep`): every pixel gets a label, and none gets a class the image is not
tagged with.

Its settings, and the records of what it makes, are in :mod:`pipeline.train.refine`.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.distributed import Distributed
from pipeline.core.io import file_digest
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset, SegmentationDataset
from pipeline.data.manifest import Manifest
from pipeline.method.affinity import (
    AFFINITIES,
    affinity_loss,
    boundary_affinity,
    label_grid,
    random_walk,
    transition_weights,
)
from pipeline.method.cams import image_size, size_grouped_batches
from pipeline.method.metrics import SegmentationScore
from pipeline.method.tags import given_tags
from pipeline.models import fold_batch_norms, save_checkpoint
from pipeline.models.affinity import LEVELS, AffinityNet, to_grid
from pipeline.train.classifier import ClassifierParams, load_classifier
from pipeline.train.loop import Checkpoint, data_parallel, train, unwrap
from pipeline.train.predict import IN_FLIGHT, crf_executor, crf_labels, resolved
from pipeline.train.refine import BACKGROUND_CANDIDATES, TIED, RefineParams


def build_affinity_net(classifier: ClassifierParams, num_classes: int, weights: Path,
                       params: RefineParams) -> AffinityNet:
    """The affinity network of ``params`` on the trained classifier's backbone (batch norms
    folded: it only infers), its new layers drawn from ``params.seed``."""
    torch.manual_seed(params.seed)
    backbone = fold_batch_norms(load_classifier(classifier, num_classes, weights)).backbone
    return AffinityNet(backbone, LEVELS[classifier.backbone], params.stride, AFFINITIES[params.affinity][0])


def train_affinity(net: AffinityNet, manifest: Manifest, split: str, params: RefineParams, labels: ImageStore,
                   classifier: Path, out: Path, state: Path, ctx: Distributed, device: torch.device,
                   run: RunParams = DEFAULT_RUN, progress: bool = True) -> AffinityNet:
    """Train (or resume training) the new layers of ``net`` on the affinity labels of the
    ``labels`` of ``split``; write them to ``out`` (rank 0): the backbone is that of the
    classifier's weights ``classifier``, recorded as an input and part of the training state's key."""
    labels.require_complete()
    torch.manual_seed(params.seed)
    net.to(device)
    dataset = SegmentationDataset(manifest, split, lambda image_id: labels.read(image_id)[0], params.augmentation(),
                                  params.seed)
    loader = params.loader(dataset, ctx, device, run)
    model = data_parallel(net, ctx, device)
    optimizer = params.optimizer(net)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features = model(batch["image"].to(device, non_blocking=True)).float()
        grid = label_grid(batch["label"].to(device), params.stride)
        return affinity_loss(features, grid, params.radius, AFFINITIES[params.affinity][1])

    checkpoint = Checkpoint.of_stage(state, "refine", manifest, split, asdict(params.training_settings()),
                                     labels.fingerprint, file_digest(classifier))
    train(model, loader, step, optimizer, params.loop("refine", progress, run), checkpoint, ctx, device)
    if ctx.is_main:
        save_checkpoint(unwrap(net).head, out)
    return net


def walk_scores(cams: torch.Tensor, grid: tuple[int, int], params: RefineParams) -> torch.Tensor:
    """The maps that walk, averaged over each cell of ``grid``: the (N, K, H, W) max-normalised
    ``cams`` and, for PSA's ``power`` background, ``(1 - max_k cam_k) ** bg_power`` in front
    (an image without a CAM has that score 1 everywhere)."""
    if params.background == "threshold":
        return to_grid(cams, grid)
    peak = cams.amax(dim=1, keepdim=True) if cams.shape[1] else cams.new_zeros((cams.shape[0], 1, *cams.shape[2:]))
    return to_grid(torch.cat([(1 - peak).clamp_min(0) ** params.bg_power, cams], dim=1), grid)


def walked_labels(walked: torch.Tensor, size: tuple[int, int], params: RefineParams,
                  threshold: float | None) -> torch.Tensor:
    """The index, per pixel of ``size``, of the best of background (0) and the walked maps
    (:func:`walk_scores`, then upsampled bilinearly): against IRN's constant ``threshold`` after
    each image's maps are divided by their largest value, or against PSA's walked background
    score (``threshold`` unused)."""
    scores = F.interpolate(walked, size=size, mode="bilinear", align_corners=False)
    if params.background == "power":
        return scores.argmax(dim=1)
    return torch.cat([torch.full_like(scores[:, :1], threshold), _per_image_max(scores)], dim=1).argmax(dim=1)


def _per_image_max(scores: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) ``scores``, each image's divided by its largest."""
    return scores / scores.amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def keep_foreground(walked: np.ndarray, labels: np.ndarray, tagged: np.ndarray, share: float) -> np.ndarray:
    """The walk's labels ``walked`` (H, W) where ``labels`` (H, W: 0 background, class + 1, 255
    unlabelled) complete the objects the walk found: each connected region of ``labels`` of one
    of the label values ``tagged`` to at least ``share`` of which the walk gives that value takes
    it whole; a region the walk gives less of it (nothing: an object it did not find) adds
    nothing."""
    refined = walked.copy()
    for value in np.unique(tagged[tagged != 0]):
        regions, count = ndimage.label(labels == value)
        area = np.bincount(regions.ravel(), minlength=count + 1)
        found = np.bincount(regions[walked == value], minlength=count + 1)
        kept = (found > 0) & (found >= share * area)
        kept[0] = False
        refined[kept[regions]] = value
    return refined


def _size_batches(manifest: Manifest, split: str, skip: set[str], device: torch.device,
                  run: RunParams) -> tuple[DataLoader | None, int]:
    """The images of ``split`` but ``skip``, in batches of one size (``run.inference_batch`` of
    them, at most ``run.batch_pixels`` pixels), and how many they are (None and 0: none left)."""
    dataset = ImageDataset(manifest, split)
    todo = {index: image_size(manifest.image_path(item.id)) for index, item in enumerate(dataset.items)
            if item.id not in skip}
    if not todo:
        return None, 0
    return DataLoader(dataset, batch_sampler=size_grouped_batches(todo, run.inference_batch, run.batch_pixels),
                      num_workers=run.loader_processes(device), pin_memory=device.type == "cuda"), len(todo)


def _walk(net: AffinityNet, images: torch.Tensor, maps: torch.Tensor, params: RefineParams,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The affinity network's output maps on ``images`` and the walk of their CAMs ``maps``
    (:func:`walk_scores`) over it, both on the network's grid."""
    with torch.autocast(device.type, enabled=device.type == "cuda" and params.amp):
        features = net(images).float()
    weights = transition_weights(features, params.radius, params.beta, AFFINITIES[params.affinity][1])
    grid = tuple(features.shape[-2:])
    return features, random_walk(walk_scores(maps.to(device), grid, params), weights, params.radius,
                                 params.steps_on(grid))


@torch.inference_mode()
def walk_split(net: AffinityNet, manifest: Manifest, split: str, cams: ImageStore, walks: ImageStore,
               params: RefineParams, device: torch.device, run: RunParams = DEFAULT_RUN,
               progress: bool = True) -> list[str]:
    """Write the walk of every image of ``split`` to ``walks`` (float32 (K, h, w) on the
    network's grid, one map per tag, one at least), skipping the images it holds in full, with
    its ``classes`` and, as ``boundary``, its (T, 2) :func:`~pipeline.method.affinity.boundary_affinity`
    over :data:`BACKGROUND_CANDIDATES`: what ``bg_threshold: auto`` chooses from
    (:func:`chosen_threshold`) before :func:`refine_split` labels the stored walks. Returns the
    ids written."""
    net.eval()
    loader, count = _size_batches(manifest, split, set(walks.complete_ids()), device, run)
    candidates = torch.tensor(BACKGROUND_CANDIDATES, device=device)
    written = []
    with tqdm(total=count, desc=f"walk {split}", unit="img", disable=not progress) as bar:
        for batch in loader or ():
            read = cams.read_many(batch["id"])
            maps = _padded([array for array, _ in read], tuple(batch["image"].shape[-2:]))
            features, walked = _walk(net, batch["image"].to(device, non_blocking=True), maps, params, device)
            totals = boundary_affinity(features, _per_image_max(walked), candidates, params.radius,
                                       AFFINITIES[params.affinity][1]).double().cpu().numpy()
            walks.write_many([(image_id, walked[index, : max(1, len(attrs["classes"]))].cpu().numpy(),
                               {"classes": attrs["classes"], "boundary": totals[index].tolist()})
                              for index, (image_id, (_, attrs)) in enumerate(zip(batch["id"], read, strict=True))])
            written += batch["id"]
            bar.update(len(batch["id"]))
    return written


def chosen_threshold(walks: ImageStore, ids: list[str]) -> float:
    """The candidate of :data:`BACKGROUND_CANDIDATES` whose labels part neighbouring cells across
    the weakest mean affinity over the stored walks of ``ids`` (:func:`walk_split`), ties settled
    by :func:`weakest_candidate`."""
    totals = np.zeros((len(BACKGROUND_CANDIDATES), 2))
    for _, attrs in walks.read_many(ids):
        totals += np.asarray(attrs["boundary"])
    return weakest_candidate(np.where(totals[:, 1] > 0, totals[:, 0] / np.maximum(totals[:, 1], 1), np.inf))


def weakest_candidate(means: np.ndarray) -> float:
    """The highest of :data:`BACKGROUND_CANDIDATES` whose mean affinity across its labels' edges
    (``means``, one per candidate; inf where its labels part no cells) is within :data:`TIED` of
    the weakest; the highest of all when none parts any (each then labels every image alike)."""
    tied = np.flatnonzero(means <= means.min() * (1 + TIED))
    return BACKGROUND_CANDIDATES[int(tied.max())]


@torch.inference_mode()
def refine_split(net: AffinityNet, manifest: Manifest, split: str, cams: ImageStore, labels: ImageStore,
                 store: ImageStore, params: RefineParams, threshold: float | None, device: torch.device,
                 run: RunParams = DEFAULT_RUN, progress: bool = True, walks: ImageStore | None = None) -> list[str]:
    """Write the refined labels of ``split`` to ``store`` (uint8 (H, W): 0 background, class + 1),
    skipping the images it holds in full, so that a killed run resumes where it stopped. Images
    of one size walk together (:func:`_size_batches`), each with its own tags' CAMs, padded with
    empty maps to the batch's most, or their walks are read from ``walks`` (:func:`walk_split`);
    background scores ``threshold``, recorded in each image's attributes as ``bg_threshold``; the
    affinity labels ``labels`` keep what ``params.keep`` says; last, a dense CRF
    (``params.crf``) holds each pixel's label at ``params.crf_score`` (:func:`held_scores`) and
    moves the edges onto the image's, where :func:`crf_executor` runs it, while the walk goes on
    (a bounded number of images in flight). Returns the ids written."""
    net.eval()
    done = set(store.complete_ids())
    loader, count = _size_batches(manifest, split, done, device, run)
    if loader is None:
        return []
    written: list[str] = []
    crf, tags = params.crf_params(), given_tags(manifest, split)
    pending: deque[tuple[list[str], list[Future]]] = deque()

    def write_first() -> None:
        ids, labelled = pending.popleft()
        store.write_many([(image_id, future.result(), {"bg_threshold": threshold})
                          for image_id, future in zip(ids, labelled, strict=True)])
        written.extend(ids)
        bar.update(len(ids))

    with crf_executor(crf, device, run) as (executor, parallel), \
            tqdm(total=count, desc=f"refine {split}", unit="img", disable=not progress) as bar:
        for batch in loader:
            size = tuple(batch["image"].shape[-2:])
            read = (cams if walks is None else walks).read_many(batch["id"])
            values = _label_values([attrs["classes"] for _, attrs in read])
            if walks is None:
                maps = _padded([array for array, _ in read], size)
                _, walked = _walk(net, batch["image"].to(device, non_blocking=True), maps, params, device)
            else:
                walked = _padded([array for array, _ in read], read[0][0].shape[-2:]).to(device)
            best = walked_labels(walked, size, params, threshold).cpu().numpy()
            refined = [own[choice] for choice, own in zip(best, values, strict=True)]
            if params.keep == "foreground":
                refined = [keep_foreground(walk, kept, own[1:], params.keep_share)
                           for walk, (kept, _), own in zip(refined, labels.read_many(batch["id"]), values, strict=True)]
            if crf is None:
                pending.append((batch["id"], [resolved(label) for label in refined]))
            else:
                image_tags = [tags[image_id] for image_id in batch["id"]]
                scores = torch.from_numpy(np.stack([held_scores(label, manifest.num_classes + 1, params.crf_score)
                                                    for label in refined]))
                held = scores.to(device) if executor is None else scores  # batched on the device, else in the pool
                pending.append((batch["id"], crf_labels(batch["rgb"], held, crf, image_tags, executor)))
            while pending and (sum(len(ids) for ids, _ in pending) > IN_FLIGHT * parallel
                               or all(future.done() for future in pending[0][1])):
                write_first()
        while pending:
            write_first()
    return written


def held_scores(labels: np.ndarray, num_labels: int, score: float) -> np.ndarray:
    """Per-label scores, float32 (num_labels, H, W), that hold ``labels`` (H, W) in a CRF: each
    pixel gives its own label ``score``; the rest of one is shared by the other labels present in
    the image (a label the image does not hold scores 0, and one alone scores 1)."""
    present = np.unique(labels)
    scores = np.zeros((num_labels, *labels.shape), dtype=np.float32)
    scores[present] = (1 - score) / max(1, len(present) - 1)
    own = np.arange(num_labels)[:, None, None] == labels[None]
    scores[own] = score if len(present) > 1 else 1.0
    return scores


def _padded(arrays: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Per-image (K_i, *size) maps (CAMs or walks) as float32 (N, K, *size), K the most of any of
    them and one at least, the others padded with zero maps."""
    width = max(1, *(len(array) for array in arrays))
    maps = torch.zeros((len(arrays), width, *size))
    for index, array in enumerate(arrays):
        maps[index, : len(array)] = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return maps


def _label_values(classes: list[list[int]]) -> list[np.ndarray]:
    """Each image's label value of every map of :func:`_padded` (background in front, then its
    classes + 1; the padding maps 0 too: they stay 0 and never win)."""
    width = max(1, *(len(own) for own in classes))
    return [np.concatenate([[0], np.asarray(own, dtype=np.int64) + 1, np.zeros(width - len(own), dtype=np.int64)])
            .astype(np.uint8) for own in classes]


def score_labels(store: ImageStore, manifest: Manifest, split: str) -> dict[str, Any]:
    """``store``'s labels of ``split`` against the ground truth where it exists: ``{"miou", "iou",
    "scored_images"}`` (None without any)."""
    score = SegmentationScore(manifest.num_classes + 1)
    scored = 0
    for item in manifest.split(split):
        gt = manifest.read_mask(item)
        if gt is not None:
            score.update(gt, store.read(item.id)[0])
            scored += 1
    return {"miou": score.miou() if scored else None,
            "iou": score.as_dict(manifest.label_names)["iou"] if scored else None, "scored_images": scored}
