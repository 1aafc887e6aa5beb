"""Class activation maps: batched multi-scale inference into a per-image store, and their score.

``cam_fn`` is the classifier's CAM head as a plain callable: a normalised batch (N, 3, h, w) in,
non-negative class maps (N, C, h', w') out (the ReLU'd 1x1-conv output at the network's stride).
It must treat the images of a batch independently (a network in eval mode does).

Batches hold images of one size only. Padding them to a common size instead would change the
activations near the padded borders (every convolution and the receptive field reach into
the padding), so an image's CAMs would depend on which images it was batched with; grouping by
size keeps them equal to one-image-at-a-time results while still running several images, and
the flipped copies, in one forward pass.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm
from upath import UPath

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, TURNED, file_digest, orientation
from pipeline.core.params import check_range, check_scales
from pipeline.core.provenance import MadeFrom, settings
from pipeline.core.registry import CLASSIFIER_WEIGHTS
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset
from pipeline.data.manifest import Manifest
from pipeline.method.metrics import SegmentationScore

if TYPE_CHECKING:
    from pipeline.core.stage import Context

CamFn = Callable[[torch.Tensor], torch.Tensor]

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""The classifier as a plain callable: a normalised batch (N, 3, h, w) in, (N, C) class logits out."""

SCORES = "scores"
"""Attribute of each CAM array: the classifier's probability of every class for the whole image
(the sigmoid of its logits, in class order), from which untagged images get predicted tags."""


@dataclass(frozen=True)
class CamParams:
    """Parameters of the ``cams`` stage.

    ``amp`` runs the network under float16 autocast on CUDA (ignored on the CPU).
    ``score_thresholds`` are the background scores tried when scoring the CAMs.
    """

    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    amp: bool = True
    score_thresholds: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))

    def __post_init__(self) -> None:
        check_scales("scales", self.scales)
        if not self.score_thresholds:
            raise ValueError("score_thresholds must hold at least one threshold")
        for threshold in self.score_thresholds:
            check_range("score_thresholds", threshold, 0, 1)


def cams_made_from(manifest: Manifest, splits: Sequence[str], params: CamParams, weights: Path) -> MadeFrom:
    """What a CAM store is made from: the images and tags of ``splits``, the `cams:` settings and
    the classifier's weights; ``contents`` names what each array holds, so that a store made
    before the image scores were kept beside the maps is made anew."""
    return MadeFrom.made("cams", manifest, splits, settings("cams", params),
                         {"classifier": file_digest(weights), "contents": f"cams, {SCORES}"})


def expected_cams(ctx: Context) -> MadeFrom:
    """The record a reader must find in the CAM store now (registered in :mod:`pipeline.core.registry`)."""
    return cams_made_from(ctx.manifest, ctx.splits, ctx.params(CamParams, "cams"), ctx.file(CLASSIFIER_WEIGHTS))


def image_size(path: Path | UPath) -> tuple[int, int]:
    """(height, width) of an image file as :func:`pipeline.core.io.read_image` returns it (its EXIF
    orientation applied), read from its header without decoding the pixels.

    ``path`` may be a :class:`UPath` (an image at an fsspec URL)."""
    try:
        with path.open("rb") as handle, Image.open(handle) as image:
            width, height = image.size
            turned = orientation(image) in TURNED
    except OSError as error:  # a missing file or one PIL cannot identify
        raise InputError(path, f"cannot read image ({error})") from None
    return (width, height) if turned else (height, width)


MIN_CAM_CELLS = 12
"""The fewest cells a scale's CAM should have on a typical image's shorter side. Coarser maps,
upsampled, spread every CAM over the background, above the pruning's background threshold
(docs/method-notes.md)."""


SIZE_SAMPLE = 256
"""Images whose sizes :func:`sampled_sizes` reads: enough for a median."""


def sampled_sizes(manifest: Manifest, split: str, count: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """The (height, width) of at most ``count`` images of ``split``, evenly spaced over it: a
    typical size without a second pass over every header (the extraction reads them all)."""
    items = manifest.split(split)
    return [image_size(manifest.image_path(item.id)) for item in items[:: max(1, -(-len(items) // count))]]


def coarse_scales_warning(setting: str, sizes: Sequence[tuple[int, int]], scales: Sequence[float],
                          output_stride: int) -> str | None:
    """One line naming the ``scales`` (the params key ``setting``) at which the median image of
    ``sizes`` ((height, width) pairs) gives CAMs of fewer than :data:`MIN_CAM_CELLS` cells on
    its shorter side at ``output_stride``; None where there is none (or no image)."""
    if not sizes:
        return None
    side = float(np.median([min(size) for size in sizes]))
    coarse = [scale for scale in scales if side * scale / output_stride < MIN_CAM_CELLS]
    if not coarse:
        return None
    at = " and ".join(f"{scale:g}" for scale in coarse)
    cells = " and ".join(f"{side * scale / output_stride:.0f}" for scale in coarse)
    return (f"{setting}: at {at} the median image ({side:.0f} pixels on its shorter side, output stride"
            f" {output_stride}) gives CAMs {cells} cells across, under {MIN_CAM_CELLS}: upsampled, they spread"
            f" over the background and the pruning keeps little of it (README \"Your own photos\")")


def warn_of_coarse_scales(setting: str, manifest: Manifest, split: str, scales: Sequence[float],
                          output_stride: int) -> None:
    """Print the :func:`coarse_scales_warning` of ``split``'s :func:`sampled_sizes`, if any, to stderr."""
    warning = coarse_scales_warning(setting, sampled_sizes(manifest, split), scales, output_stride)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def size_grouped_batches(
    sizes: Mapping[int, tuple[int, int]], batch_size: int, batch_pixels: int | None = None
) -> list[list[int]]:
    """Batches of dataset indices, each of images of one size, at most ``batch_size`` long and
    (if given) at most ``batch_pixels`` image pixels in all, but never empty.

    ``sizes`` maps index -> (height, width). Sizes come in order of first appearance and indices
    in their given order, so the batches are deterministic; a size seen once makes a batch of one.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in sizes.items():
        groups.setdefault(size, []).append(index)
    batches = []
    for (height, width), group in groups.items():
        length = batch_size if batch_pixels is None else max(1, min(batch_size, batch_pixels // (height * width)))
        batches += [group[start : start + length] for start in range(0, len(group), length)]
    return batches


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _in_passes(cam_fn: CamFn, images: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
    """``cam_fn`` over ``images`` in passes of at most ``max_pixels`` pixels (one image at least),
    in channels-last layout, as float32."""
    per_pass = len(images) if max_pixels is None else max(1, max_pixels // (images.shape[-2] * images.shape[-1]))
    return torch.cat([cam_fn(part.contiguous(memory_format=torch.channels_last)).float()
                      for part in images.split(per_pass)])


def multiscale_cams(
    cam_fn: CamFn,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    max_pixels: int | None = None,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class maps summed over ``scales`` (and horizontal flips), at the input size.

    ``images`` (N, 3, H, W) normalised, all of one size; returns float32 (N, C, H, W), or with
    ``channels`` (N, K) the K maps of each image it indexes, (N, K, H, W), taken before
    upsampling (which works on each map alone), so that only those are upsampled. At each
    scale the batch and its mirror image go through ``cam_fn`` in one pass; the mirrored maps
    are flipped back and added before upsampling, which is the same as after (the bilinear
    resize commutes with the flip) at half the cost. At each scale the images go through in
    passes of at most ``max_pixels`` pixels (all at once without it), in channels-last memory
    layout, which the convolutions of oneDNN (CPU) and cuDNN run faster with the same values. A
    sum, not a mean: each map is later divided by its own maximum, which cancels any constant
    factor.
    """
    count = images.shape[0]
    size = (images.shape[-2], images.shape[-1])
    total = torch.zeros((), device=images.device)
    for scale in scales:
        scaled = _resize(images, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))
        if flip:
            scaled = torch.cat([scaled, scaled.flip(-1)])
        maps = _in_passes(cam_fn, scaled, max_pixels)
        if flip:
            maps = maps[:count] + maps[count:].flip(-1)
        if channels is not None:
            maps = maps.gather(1, channels[:, :, None, None].expand(-1, -1, *maps.shape[-2:]))
        total = total + _resize(maps, size)
    return total


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """(k, H, W) ``maps`` as float32, each divided by its own maximum; a map whose maximum is 0 stays 0."""
    maps = maps.float()
    peak = maps.amax(dim=(1, 2), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def select_and_normalise(cams: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """The maps of the present ``classes`` of (C, H, W) ``cams``, each divided by its own maximum.

    Returns float32 (k, H, W) in [0, 1]; a map whose maximum is 0 stays 0.
    """
    return normalise(cams[list(classes)])


def padded_channels(classes: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(N, K) int64 channel indices for ``multiscale_cams``: row i is ``classes[i]`` padded with
    class 0 to the longest row (K at least 1)."""
    width = max([1, *(len(row) for row in classes)])
    return torch.tensor([[*row, *[0] * (width - len(row))] for row in classes], dtype=torch.long, device=device)


def extract_cams(
    cam_fn: CamFn,
    manifest: Manifest,
    split: str,
    store: ImageStore,
    params: CamParams,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    run: RunParams = DEFAULT_RUN,
    progress: bool = True,
    score_fn: ScoreFn | None = None,
) -> list[str]:
    """Write the CAMs of ``split`` to ``store``: float16 (k, H, W), ``attrs["classes"]`` the k
    classes and, with ``score_fn`` (the classifier's logits), ``attrs["scores"]`` the probability
    of every class for the whole image at scale 1 (see :data:`SCORES`).

    Images whose CAMs the store already holds in full are skipped, so a killed run resumes
    where it stopped. Process ``rank`` of ``world_size`` takes the ids ``[rank::world_size]``
    of the split. ``run`` sizes the batches and passes (its ``inference_batch`` and
    ``batch_pixels``) and its :meth:`~pipeline.core.run.RunParams.loader_processes` read the
    images. ``cam_fn`` must already be on ``device``. Only the present classes' maps are
    upsampled; a background thread writes each batch while the next goes through the network
    (one batch in flight, so memory stays flat; a failed write stops the run with its error).
    Returns the ids written.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    dataset = ImageDataset(manifest, split)
    done = set(store.complete_ids())
    todo = {
        index: image_size(manifest.image_path(item.id))
        for index, item in enumerate(dataset.items)
        if index % world_size == rank and item.id not in done
    }
    if not todo:
        return []
    cuda = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_sampler=size_grouped_batches(todo, run.inference_batch, run.batch_pixels),
        num_workers=run.loader_processes(device),
        pin_memory=cuda,
    )
    label = f"cams {split}" + (f" [{rank + 1}/{world_size}]" if world_size > 1 else "")
    written: list[str] = []
    pending: deque[tuple[str, Future[None]]] = deque()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, enabled=cuda and params.amp),
        tqdm(total=len(todo), desc=label, unit="img", disable=not progress) as bar,
        ThreadPoolExecutor(1, thread_name_prefix="cams-writer") as writer,
    ):
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            classes = [labels.nonzero().flatten().tolist() for labels in batch["labels"]]
            channels = padded_channels(classes, device)
            cams = multiscale_cams(cam_fn, images, params.scales, params.flip, run.batch_pixels, channels)
            scores = [None] * len(classes) if score_fn is None else torch.sigmoid(score_fn(images).float())
            for image_id, image_classes, image_cams, image_scores in zip(batch["id"], classes, cams, scores,
                                                                        strict=True):
                job = writer.submit(_write_cams, store, image_id, image_cams[: len(image_classes)], image_classes,
                                    image_scores)
                pending.append((image_id, job))
            while len(pending) > len(batch["id"]):
                written.append(_finished(*pending.popleft()))
            bar.update(len(batch["id"]))
        written += [_finished(*entry) for entry in pending]
    return written


def _write_cams(store: ImageStore, image_id: str, maps: torch.Tensor, classes: list[int],
                scores: torch.Tensor | None) -> None:
    """Normalise one image's CAMs, copy them to the host and store them (with the image's class
    scores, if given). Runs on the writer thread, so that the next batch goes through the
    network meanwhile; on a GPU it is this thread, not the main one, that waits for the copy."""
    extra = {} if scores is None else {SCORES: [round(float(score), 6) for score in scores.cpu()]}
    store.write(image_id, normalise(maps).half().cpu().numpy(), classes=classes, **extra)


def _finished(image_id: str, job: Future[None]) -> str:
    job.result()
    return image_id


def _threshold_confusions(
    gt: np.ndarray, cams: np.ndarray, classes: Sequence[int], thresholds: np.ndarray, num_labels: int
) -> np.ndarray:
    """int64 (T, L, L) confusion matrices of ``argmax([t, cams])`` against ``gt``, for each sorted t.

    One pass over the pixels for all thresholds: a pixel is foreground at threshold t exactly
    when its peak CAM exceeds t (background wins ties, as the first entry of an argmax), so
    counting pixels by (gt, strongest class, number of thresholds below the peak) and summing
    these counts over the bins gives every threshold's matrix.
    """
    valid = gt != IGNORE
    if len(classes):
        peak = cams.max(axis=0)[valid]
        strongest = (np.asarray(classes) + 1)[cams.argmax(axis=0)][valid]
    else:
        peak = np.zeros(int(valid.sum()), dtype=np.float32)
        strongest = np.zeros_like(peak, dtype=np.int64)
    bins = len(thresholds) + 1
    below = np.searchsorted(thresholds, peak, side="left")
    flat = (gt[valid].astype(np.int64) * num_labels + strongest) * bins + below
    counts = np.bincount(flat, minlength=num_labels * num_labels * bins)
    cumulative = counts.reshape(num_labels, num_labels, bins).cumsum(axis=2)
    confusions = np.empty((len(thresholds), num_labels, num_labels), dtype=np.int64)
    for index in range(len(thresholds)):
        background = cumulative[:, :, index]
        confusions[index] = cumulative[:, :, -1] - background
        confusions[index, :, 0] += background.sum(axis=1)
    return confusions


def score_cams(
    store: ImageStore, manifest: Manifest, split: str, thresholds: Sequence[float]
) -> dict[str, Any]:
    """mIoU of ``argmax([t, cams])`` against the ground truth, for each background threshold t.

    Label 0 where t wins, class index + 1 elsewhere; images without a mask are skipped; every
    image is read once. Returns ``{"miou", "threshold", "curve": [{"threshold", "miou"}, ...],
    "iou": {label name: IoU}, "scored_images"}``: ``miou`` and ``iou`` at the best threshold
    (the lowest one on a tie), the curve in ascending order of threshold; without any ground
    truth, None for the scores and an empty curve.
    """
    order = np.argsort(thresholds, kind="stable")
    ordered = np.asarray(thresholds, dtype=np.float64)[order]
    scores = [SegmentationScore(manifest.num_classes + 1) for _ in ordered]
    scored = 0
    for item in manifest.split(split):
        gt = manifest.read_mask(item)
        if gt is None:
            continue
        cams, attrs = store.read(item.id)
        if cams.shape[1:] != gt.shape:
            raise InputError(
                manifest.mask_path(item.id),
                f"mask of {gt.shape[1]}x{gt.shape[0]} pixels, its image's CAMs {cams.shape[2]}x{cams.shape[1]} "
                "(`rrm manifest` refuses such a mask)",
            )
        confusions = _threshold_confusions(
            gt, cams.astype(np.float32), attrs["classes"], ordered, manifest.num_classes + 1
        )
        for score, confusion in zip(scores, confusions, strict=True):
            score.confusion += confusion
        scored += 1
    if not scored:
        return {"miou": None, "threshold": None, "curve": [], "iou": None, "scored_images": 0}
    curve = [{"threshold": float(t), "miou": score.miou()} for t, score in zip(ordered, scores, strict=True)]
    best = max(range(len(scores)), key=lambda index: curve[index]["miou"])
    return {
        "miou": curve[best]["miou"],
        "threshold": curve[best]["threshold"],
        "curve": curve,
        "iou": scores[best].as_dict(manifest.label_names)["iou"],
        "scored_images": scored,
    }
