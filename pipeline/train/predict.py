"""Predictions of a trained network (the one-step's or DeepLab's): softmax, argmax over the labels
an image may take, the optional dense CRF where :mod:`pipeline.method.crf_runner` runs it, the
store written and scored."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.io import file_digest
from pipeline.core.provenance import MadeFrom
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset
from pipeline.data.manifest import Item, Manifest
from pipeline.method.cams import image_size, size_grouped_batches
from pipeline.method.crf import CRFParams
from pipeline.method.crf_runner import crf_pool, dense_crf, on_device
from pipeline.method.meanfield import batch_crf
from pipeline.method.metrics import SegmentationScore
from pipeline.method.tags import given_tags
from pipeline.models import SegNet, fold_batch_norms
from pipeline.train.segnet import tag_mask, upsample


def tag_values(tags: torch.Tensor | np.ndarray) -> np.ndarray:
    """The label values an image with multi-hot ``tags`` (C,) may take: background (0) and its
    classes (index + 1), ascending, uint8."""
    return np.concatenate([[0], np.flatnonzero(np.asarray(tags)) + 1]).astype(np.uint8)


def restrict(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The (K, H, W) probabilities of the label ``values`` alone, renormalised: the softmax over
    those labels' logits."""
    kept = probs[values]
    return kept / np.maximum(kept.sum(axis=0, keepdims=True), np.finfo(kept.dtype).tiny)


def _crf_labels(image: np.ndarray, probs: np.ndarray, params: CRFParams, values: np.ndarray) -> np.ndarray:
    """The label ``values[k]`` of the CRF's most probable entry ``k`` of ``probs`` at each pixel."""
    return values[dense_crf(image, probs, params).argmax(axis=0)]


def _batch_crf_labels(rgb: torch.Tensor, probs: torch.Tensor, crf: CRFParams, tags: torch.Tensor | None) -> np.ndarray:
    """The CRF labels, uint8 (N, H, W), of a batch's probabilities (N, K, H, W) on their device
    by :func:`batch_crf`; with ``tags`` (N, C), over background and each image's tags only,
    renormalised as :func:`restrict` does."""
    valid = None
    if tags is not None:
        valid = tag_mask(tags).bool().to(probs.device)
        probs = probs * valid[:, :, None, None]
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    marginals = batch_crf(rgb.to(probs.device), probs[:, None], crf, valid)[:, 0]
    return marginals.argmax(dim=1).to(torch.uint8).cpu().numpy()


IN_FLIGHT = 4
"""Images per CRF worker whose labels may be awaited at once while the network goes on: enough
that no worker waits for the next batch, few enough that memory does not grow with the split."""


def crf_executor(crf: CRFParams | None, device: torch.device,
                 run: RunParams) -> AbstractContextManager[tuple[Executor | None, int]]:
    """Where :func:`crf_labels` sends CRFs, and how many run at once: nowhere (None, 1) without a
    CRF or where they run batched on ``device`` (:func:`on_device`), else :func:`crf_pool`."""
    return nullcontext((None, 1)) if crf is None or on_device(crf, device) else crf_pool(run)


def crf_labels(rgb: torch.Tensor, probs: torch.Tensor, crf: CRFParams, tags: list[np.ndarray] | None,
               executor: Executor | None) -> list[Future]:
    """The CRF labels, uint8 (H, W), of each image of a batch: ``rgb`` uint8 (N, H, W, 3),
    ``probs`` (N, K, H, W) over every label; with ``tags`` (one multi-hot (C,) per image), over
    background and each image's tags alone, renormalised (:func:`restrict`). Computed at once on
    ``probs``' device without an ``executor`` (:func:`crf_executor`), else sent to it one image each."""
    if executor is None:
        labels = _batch_crf_labels(rgb, probs, crf, None if tags is None else torch.from_numpy(np.stack(tags)))
        return [resolved(label) for label in labels]
    scores = probs.cpu().numpy()
    futures = []
    for index, own in enumerate(scores):
        values = np.arange(len(own), dtype=np.uint8) if tags is None else tag_values(tags[index])
        futures.append(executor.submit(_crf_labels, rgb[index].numpy(),
                                       own if tags is None else restrict(own, values), crf, values))
    return futures


def resolved(result: Any) -> Future:
    """A future that holds ``result`` already."""
    future: Future = Future()
    future.set_result(result)
    return future


TagMap = Mapping[str, np.ndarray]
"""Image id -> the multi-hot (C,) classes the image may take besides background: the tags the
manifest gives it (:func:`pipeline.method.tags.given_tags`) or those the classifier predicts
(:func:`pipeline.method.tags.predicted_tags`)."""


def predictions_made_from(stage: str, manifest: Manifest, split: str, recorded: dict[str, Any],
                          weights: Path) -> MadeFrom:
    """What a store of predictions of ``split`` that ``stage`` writes is made from: its images and
    tags, the ``recorded`` settings of the stage that trained the network
    (:func:`~pipeline.core.provenance.settings`) and the network's weights."""
    return MadeFrom.made(stage, manifest, (split,), recorded, {"weights": file_digest(weights)})


ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]
"""Normalised images (N, 3, H, W) of one size -> class probabilities (N, K, H, W) at that size."""


def segnet_probabilities(net: SegNet) -> ProbabilityFn:
    """The softmax of ``net``'s segmentation logits upsampled to the input, by a copy of ``net``
    with its batch norms folded (see :func:`fold_batch_norms`); ``net`` stays as it is."""
    folded = fold_batch_norms(net)
    return lambda images: upsample(folded.segment(images), tuple(images.shape[-2:])).softmax(1)


class Prediction(NamedTuple):
    """One image's label maps, uint8 (H, W)."""

    item: Item
    plain: np.ndarray
    """The argmax of the network's probabilities (over the labels its tags allow, where restricted)."""
    refined: np.ndarray
    """``plain`` refined by the dense CRF (``plain`` itself without a CRF)."""
    others: dict[str, np.ndarray]
    """The argmax under each other restriction asked for, without CRF (diagnostics)."""


def _argmax(probs: np.ndarray, tags: np.ndarray | None) -> np.ndarray:
    """The label of the most probable entry of (K, H, W) ``probs`` at each pixel, over every label
    or, with multi-hot ``tags``, over background and those classes."""
    if tags is None:
        return probs.argmax(axis=0).astype(np.uint8)
    values = tag_values(tags)
    return values[probs[values].argmax(axis=0)]


@torch.inference_mode()
def predict(probabilities: ProbabilityFn, manifest: Manifest, split: str, device: torch.device,
            crf: CRFParams | None, tags: TagMap | None = None, run: RunParams = DEFAULT_RUN,
            progress: bool = True, others: Mapping[str, TagMap | None] | None = None) -> Iterator[Prediction]:
    """The :class:`Prediction` of every image of ``split``.

    ``probabilities`` is the network's inference (one pass, or several scales averaged; a
    network in eval mode). ``tags`` restricts each image to background and its classes there:
    the other classes' scores are dropped before the argmax and before the CRF (the training
    split, whose tags are known; or val, by the tags the classifier predicts). Without it every
    class competes. ``others`` names further restrictions (None: every class) whose argmax
    comes beside, as diagnostics. Images of one size go through the network together; the CRFs
    run while the network goes on, a bounded number in flight, where ``run`` says (see
    :func:`crf_pool`), or on ``device`` with the network's batch where :func:`on_device` says.
    Batches are sized by ``run`` as in the CAM stage (its ``inference_batch`` and
    ``batch_pixels``).
    """
    dataset = ImageDataset(manifest, split)
    items = {item.id: item for item in dataset.items}
    sizes = {index: image_size(manifest.image_path(item.id)) for index, item in enumerate(dataset.items)}
    loader = DataLoader(dataset, batch_sampler=size_grouped_batches(sizes, run.inference_batch, run.batch_pixels))
    pending: deque[tuple[Item, np.ndarray, Future | None, dict[str, np.ndarray]]] = deque()
    others = others or {}

    def finished(item: Item, plain: np.ndarray, refined: Future | None, extra: dict[str, np.ndarray]) -> Prediction:
        bar.update(1)
        return Prediction(item, plain, plain if refined is None else refined.result(), extra)

    bar = tqdm(total=len(dataset), desc=f"predict {split}", unit="img", disable=not progress)
    with crf_executor(crf, device, run) as (executor, parallel), bar:
        for batch in loader:
            images = batch["image"].to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                probs_t = probabilities(images).float()
            own = None if tags is None else [tags[image_id] for image_id in batch["id"]]
            refined: list[Future | None] = ([None] * len(images) if crf is None else
                                            crf_labels(batch["rgb"], probs_t, crf, own, executor))
            probs = probs_t.cpu().numpy()
            for index, image_id in enumerate(batch["id"]):
                plain = _argmax(probs[index], None if own is None else own[index])
                extra = {name: _argmax(probs[index], None if other is None else other[image_id])
                         for name, other in others.items()}
                pending.append((items[image_id], plain, refined[index], extra))
            while pending and (len(pending) > IN_FLIGHT * parallel or pending[0][2] is None or pending[0][2].done()):
                yield finished(*pending.popleft())
        while pending:
            yield finished(*pending.popleft())


def infer_split(probabilities: ProbabilityFn, manifest: Manifest, split: str, store: ImageStore,
                device: torch.device, crf: CRFParams | None, run: RunParams = DEFAULT_RUN,
                tags: TagMap | None = None, others: Mapping[str, TagMap | None] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Write the (refined) predictions of ``split`` to ``store`` and score them against the ground
    truth where it exists: ``{"miou", "miou_no_crf", "miou_tagged_no_crf", "miou_<name>_no_crf"
    of each of ``others``, "iou", "scored_images"}``.

    ``tags``: restrict each image to them (see :func:`predict`); ``miou_tagged_no_crf`` scores
    the argmax over the manifest's tags beside, as a diagnostic of how much is lost to telling
    the classes apart, and ``others`` (name -> tags, or None for every class) are scored alike.
    """
    restrictions = {"tagged": given_tags(manifest, split), **(others or {})}
    scores = {name: SegmentationScore(manifest.num_classes + 1) for name in ("plain", "refined", *restrictions)}
    scored = 0
    for prediction in predict(probabilities, manifest, split, device, crf, tags, run, progress, restrictions):
        store.write(prediction.item.id, prediction.refined)
        gt = manifest.read_mask(prediction.item)
        if gt is not None:
            for name, labels in (("plain", prediction.plain), ("refined", prediction.refined),
                                 *prediction.others.items()):
                scores[name].update(gt, labels)
            scored += 1
    store.mark_complete(item.id for item in manifest.split(split))
    names = manifest.label_names
    return {"miou": scores["refined"].miou() if scored else None,
            "miou_no_crf": scores["plain"].miou() if scored else None,
            **{f"miou_{name}_no_crf": scores[name].miou() if scored else None for name in restrictions},
            "iou": scores["refined"].as_dict(names)["iou"] if scored else None,
            "scored_images": scored}
