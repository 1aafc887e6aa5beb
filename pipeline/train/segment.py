"""Stage 4 and 5: the segmentation branch, trained staged or end to end, and its inference.

``staged``: the head learns from the reliable regions mined once by the prune stage.
``end_to_end`` (the paper): every step adds the classification loss, and the reliable regions
of the batch are re-mined from the CAMs of that step's own forward pass with those of the other
scales, as RRM's code does (see :class:`Miner`), the dense CRF work for the batch running in
parallel worker processes.

Both minimise the balanced cross-entropy on reliable pixels plus the gated dense energy on all
pixels (:mod:`pipeline.method.losses`).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.distributed import Distributed
from pipeline.core.io import IGNORE, file_digest, fingerprint
from pipeline.core.params import check_choice, check_range, check_scales
from pipeline.core.provenance import MadeFrom, settings
from pipeline.core.registry import SEGMENT_LABELS, SEGMENT_WEIGHTS
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset, SegmentationDataset
from pipeline.data.manifest import Item, Manifest
from pipeline.method.cams import CamFn, image_size, select_and_normalise, size_grouped_batches
from pipeline.method.crf import BACKENDS, CRFParams, crf_worker, dense_crf
from pipeline.method.losses import (
    DENSE_ENERGY_WEIGHT,
    DenseEnergyLoss,
    check_method,
    crop_reach,
    crop_weight,
    reliable_counts,
    segmentation_ce,
)
from pipeline.method.meanfield import batch_crf
from pipeline.method.metrics import SegmentationScore
from pipeline.method.mining import scheduler_client
from pipeline.method.prune import PruneParams, prune_image, prune_images
from pipeline.method.tags import TEST_TAGS, given_tags
from pipeline.models import SegNet, build_backbone, fold_batch_norms, load_checkpoint, save_checkpoint, seg_dilation
from pipeline.train.classifier import ClassifierParams
from pipeline.train.loop import Checkpoint, TrainingParams, data_parallel, train, unwrap

if TYPE_CHECKING:
    from pipeline.core.stage import Context


@dataclass(frozen=True)
class SegmentParams(TrainingParams):
    scale_range: tuple[float, ...] = (0.7, 1.3)
    batch_size: int = 8
    lr: float = 0.001
    momentum: float = 0.0
    """The reference's optimiser: its SGD gets the weight decay (1e-5) as the momentum, practically
    none. A pretrained backbone keeps its features at its rate; 0.9 gives ten times the step."""
    weight_decay: float = 1e-5
    mode: str = "staged"
    """staged: learn from the stored training ``labels``; end_to_end: re-mine the reliable regions
    every step (the paper)."""
    labels: str = "masks"
    """staged only: what the head learns from: the prune stage's reliable ``masks`` (the paper) or
    the refine stage's dense ``refined`` labels (see :mod:`pipeline.train.labels`)."""
    checkpoint: str | None = None
    """A trained segmentation network to start from instead of the classifier's weights: this
    project's ``checkpoints/segment.pth`` or RRM's released weights (its flat key names). With
    ``steps: 0`` the stage only predicts and scores it."""
    dense_weight: float = DENSE_ENERGY_WEIGHT
    """Weight of the dense energy at RRM's 321-pixel crops, with the exact kernel (5e-8 matches the
    paper's 1e-7, see :mod:`pipeline.method.losses`); other crop sizes get :func:`~pipeline.method.losses.crop_weight`
    of it, the same pull against the cross-entropy."""
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    """The energy kernel's spatial sigma at RRM's 321-pixel crops, in pixels; other crop sizes get
    :func:`~pipeline.method.losses.crop_reach` of it, the same share of the crop."""
    energy_scale: float = 0.5
    energy_method: str = "auto"
    energy_tags: bool = True
    """Count only background and each crop's tagged classes in the dense energy (see :func:`tag_mask`)."""
    cls_weight: float = 1.0
    """end_to_end only: weight of the classification loss."""
    mining_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    """end_to_end only: scales of the CAMs the reliable regions are re-mined from; 1.0 is the
    training pass itself (see :class:`Miner`), so it must be one of them."""
    crf: bool = True
    """Refine val predictions and pseudo labels with the dense CRF of the spec's inference settings."""
    crf_backend: str = "pydensecrf"
    """How that CRF is computed (:data:`pipeline.method.crf.BACKENDS`); torch on a GPU runs it there."""
    test_tags: str = "predicted"
    """How the val predictions are restricted (:data:`pipeline.method.tags.TEST_TAGS`): to the
    classes the classifier predicts for each image, or ``none``."""

    INFERENCE = ("crf", "crf_backend", "test_tags")
    """The fields that change only how the trained network predicts: a change to them keeps its
    training (see :func:`training_key`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("crf_backend", self.crf_backend, BACKENDS)
        check_choice("mode", self.mode, ("staged", "end_to_end"))
        check_choice("labels", self.labels, SEGMENT_LABELS.names)
        check_choice("test_tags", self.test_tags, TEST_TAGS)
        check_method(self.energy_method)
        for name in ("dense_weight", "cls_weight"):
            check_range(name, getattr(self, name), 0)
        check_range("energy_scale", self.energy_scale, 0.05, 1)
        check_scales("mining_scales", self.mining_scales)
        if 1.0 not in self.mining_scales:
            raise ValueError(f"mining_scales={tuple(self.mining_scales)!r} must hold 1.0, the training pass's own CAMs")

    def energy(self) -> DenseEnergyLoss:
        """The dense energy of these settings carried to ``crop_size``: its kernel's reach by
        :func:`crop_reach`, its weight by :func:`crop_weight`."""
        sigma_xy = crop_reach(self.sigma_xy, self.crop_size)
        weight = crop_weight(self.dense_weight, self.crop_size, self.energy_scale, sigma_xy)
        return DenseEnergyLoss(weight, self.sigma_rgb, sigma_xy, self.energy_scale, self.energy_method)


def training_key(params: Any) -> dict[str, Any]:
    """A stage's settings less those that change only how its trained network predicts (its
    ``INFERENCE`` fields): the identity of its training state, so that a change to the inference
    settings alone predicts again from the finished training instead of training anew."""
    return {name: value for name, value in asdict(params).items() if name not in params.INFERENCE}


def build_segnet(classifier: ClassifierParams, num_classes: int, init: Path | None,
                 checkpoint: Path | None = None) -> SegNet:
    """The joint network on the classifier's backbone: a whole segmentation ``checkpoint`` if
    given, else the classifier's trained weights ``init`` with a new segmentation head."""
    backbone = build_backbone(classifier.backbone, None, classifier.output_stride)
    dilation = seg_dilation(classifier.output_stride)
    net = SegNet(backbone, num_classes, freeze_bn=classifier.freeze_bn, dilation=dilation)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    elif init is not None:
        load_checkpoint(net, init, allow_missing=SegNet.seg_head)
    return net


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits resized bilinearly (in float32) to ``size`` = (height, width)."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def crf_processes(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes for dense CRFs: started with 'spawn', clean of this
    process's threads, one thread each, leaving Ctrl-C to this process."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=crf_worker)


def on_device(crf: CRFParams | None, device: torch.device) -> bool:
    """Whether the CRFs run on ``device`` itself, batched, without a process pool: the torch
    backend on a GPU."""
    return crf is not None and crf.backend == "torch" and device.type == "cuda"


def fused_cams(cam_fn: CamFn, images: torch.Tensor, cams: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """RRM's multi-scale CAMs of a training batch, (N, C, h, w) on the scale-1 feature grid.

    ``cams`` (N, C, h, w) are scale 1.0: the training forward pass's own, taken as they are (in
    train mode, dropout active). Every other scale's come from ``images`` (N, 3, H, W) resized
    to ``int(H * s) x int(W * s)``, through ``cam_fn`` without gradient; they are resized to
    (h, w) and the mean of all scales is taken there, on the coarse grid, before any upsampling.
    """
    total = cams.detach().float()
    height, width = images.shape[-2:]
    with torch.no_grad():
        for scale in scales:
            if scale != 1.0:
                scaled = F.interpolate(images, size=(max(1, int(height * scale)), max(1, int(width * scale))),
                                       mode="bilinear", align_corners=False)
                total = total + upsample(cam_fn(scaled), tuple(cams.shape[-2:]))
    return total / len(scales)


@contextmanager
def running_statistics_kept(net: nn.Module) -> Iterator[None]:
    """Batch norms in training mode normalise with their batch's statistics in the block, as
    usual, but do not add them to their running statistics. The miner's extra passes at other
    scales run so: with the reference's frozen batch norms they change nothing, and a network
    that trains its batch norms keeps the statistics of its training crops for inference."""
    norms = [module for module in net.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


class Miner:
    """Re-mines reliable regions for a training batch from the network's CAMs of that step, as
    RRM's training does.

    The CAMs of the step's own forward pass (train mode, dropout active) are fused with the other
    ``scales`` on its grid (:func:`fused_cams`, the batch norms' running statistics kept, see
    :func:`running_statistics_kept`), upsampled to the crop, each tagged class's map divided by
    its maximum over the whole crop; the pruning rule then labels every pixel of the crop, its
    padding included (mean colour, see :data:`pipeline.data.datasets.MEAN_COLOUR`), which can come out as
    reliable background as in the reference. The dense CRFs of the batch's crops run in
    ``workers`` processes at once (see :func:`crf_processes`), or as one batch on ``device`` where
    :func:`on_device` says.
    """

    def __init__(self, params: PruneParams, scales: tuple[float, ...], workers: int, device: torch.device) -> None:
        self.params, self.scales = params, scales
        self.device = device if on_device(params.crf, device) else None
        self.pool: Executor | None = None if self.device else crf_processes(workers)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    @torch.no_grad()
    def __call__(self, net: SegNet, batch: dict[str, Any], cams: torch.Tensor) -> torch.Tensor:
        """int64 (N, S, S) labels of the batch's crops; ``cams`` (N, C, h, w) are the CAMs of this
        step's forward pass through ``net``."""
        size = tuple(batch["rgb"].shape[-2:])
        with running_statistics_kept(net):
            maps = fused_cams(net.cams, batch["image"].to(cams.device), cams, self.scales)
        return self._prune(upsample(maps, size).cpu(), batch)

    def _prune(self, maps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The pruning rule on each crop's tagged maps of ``maps`` (N, C, S, S); a crop without
        tags is all 255."""
        size = tuple(maps.shape[-2:])
        labels = [torch.full(size, IGNORE, dtype=torch.uint8) for _ in range(maps.shape[0])]
        tagged = [(index, batch["labels"][index].nonzero().flatten().numpy()) for index in range(maps.shape[0])]
        tagged = [(index, classes) for index, classes in tagged if classes.size]
        rgbs = [batch["rgb"][index].permute(1, 2, 0).numpy() for index, _ in tagged]
        normalised = [select_and_normalise(maps[index], classes.tolist()).numpy() for index, classes in tagged]
        classes = [classes for _, classes in tagged]
        if self.pool is None:
            masks = prune_images(rgbs, normalised, classes, self.params, self.device)
        else:
            futures = [self.pool.submit(prune_image, rgb, cams, own, self.params)
                       for rgb, cams, own in zip(rgbs, normalised, classes)]
            masks = [future.result() for future in futures]
        for (index, _), mask in zip(tagged, masks, strict=True):
            labels[index] = torch.from_numpy(mask)
        return torch.stack(labels).long()


def train_segmentation(manifest: Manifest, split: str, classifier: ClassifierParams, params: SegmentParams,
                       prune: PruneParams, init: Path, targets: ImageStore | None, out: Path, state: Path,
                       ctx: Distributed, device: torch.device, run: RunParams = DEFAULT_RUN,
                       progress: bool = True) -> SegNet:
    """Train the segmentation branch (either mode) from ``params.checkpoint`` or else the
    classifier's weights ``init``, write its weights to ``out`` (rank 0); returns the network.
    Staged, it learns from the labels of ``targets`` (see :mod:`pipeline.train.labels`). With
    ``steps: 0`` the checkpoint is written as it is."""
    torch.manual_seed(params.seed)
    checkpoint = Path(params.checkpoint) if params.checkpoint else None
    net = build_segnet(classifier, manifest.num_classes, init, checkpoint).to(device)
    if params.steps > 0:
        _fit(net, manifest, split, classifier, params, prune, targets, state, ctx, device, run, progress)
    if ctx.is_main:
        save_checkpoint(unwrap(net), out)
    return net


def _fit(net: SegNet, manifest: Manifest, split: str, classifier: ClassifierParams, params: SegmentParams,
         prune: PruneParams, targets: ImageStore | None, state: Path, ctx: Distributed, device: torch.device,
         run: RunParams, progress: bool) -> None:
    """The training loop of :func:`train_segmentation`."""
    staged = params.mode == "staged"
    if staged:
        targets.require_complete()

        def read_label(image_id: str) -> np.ndarray:
            return targets.read(image_id)[0]
    else:
        def read_label(image_id: str) -> np.ndarray:  # mined anew at every step
            return np.full(image_size(manifest.image_path(image_id)), IGNORE, dtype=np.uint8)
    dataset = SegmentationDataset(manifest, split, read_label, params.augmentation(), params.seed)
    loader = params.loader(dataset, ctx, device, run)
    model = data_parallel(net, ctx, device, find_unused=staged)  # staged: the classification layer has no loss
    optimizer = params.optimizer(net)
    energy = params.energy()
    miner = None if staged else Miner(prune, params.mining_scales, run.local_workers(), device)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        valid = batch["valid"].to(device)
        output = model(batch["image"].to(device, non_blocking=True))
        labels = (batch["label"] if miner is None else miner(net, batch, output.cams)).to(device)
        seg = upsample(output.seg, tuple(labels.shape[-2:]))
        probs = seg.softmax(1)
        if params.energy_tags:
            probs = probs * tag_mask(batch["labels"].to(device))[:, :, None, None]
        losses = {"ce": segmentation_ce(seg, labels, ctx.average(reliable_counts(labels))),
                  "energy": energy(batch["rgb"].to(device).float(), probs, valid, labels)}
        if miner is not None:
            losses["cls"] = params.cls_weight * F.multilabel_soft_margin_loss(output.logits.float(),
                                                                              batch["labels"].to(device))
        return {"loss": sum(losses.values()), **losses}

    settings = params.loop(f"segment {params.mode}", progress, run)
    key = fingerprint(training_key(params), asdict(prune) if miner else targets.fingerprint, asdict(classifier),
                      manifest.name, split, len(dataset))
    try:
        train(model, loader, step, optimizer, settings, Checkpoint(state, key), ctx, device)
    finally:
        if miner is not None:
            miner.close()


def tag_mask(tags: torch.Tensor) -> torch.Tensor:
    """(N, C + 1): 1 for background and each image's tagged classes, 0 for the others, from
    multi-hot ``tags`` (N, C).

    The dense energy rewards colour-alike pixels for agreeing on a label. Over all labels, it
    rewards a body for agreeing on whatever class the network leans to there, tagged or not,
    and spreads a wrong guess over the whole body. Multiplied by this mask, the probabilities
    it sees keep only the labels the image may hold: agreement counts on those alone, and mass
    on an untagged class is pushed into them. The training split's tags are known, so its
    predictions there may only take background and the tagged classes (as its pseudo-labels).
    """
    return torch.cat([torch.ones_like(tags[:, :1]), (tags > 0).to(tags.dtype)], dim=1)


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


TagMap = Mapping[str, np.ndarray]
"""Image id -> the multi-hot (C,) classes the image may take besides background: the tags the
manifest gives it (:func:`pipeline.method.tags.given_tags`) or those the classifier predicts
(:func:`pipeline.method.tags.predicted_tags`)."""


@contextmanager
def crf_pool(run: RunParams) -> Iterator[tuple[Executor, int]]:
    """Where the inference CRFs run, and how many at once: every worker thread of the dask cluster
    at ``run.scheduler``, or else ``run.local_workers()`` local processes ('spawn': they start
    clean of the network's threads)."""
    if run.scheduler is None:
        workers = run.local_workers()
        with crf_processes(workers) as pool:
            yield pool, workers
        return
    with scheduler_client(run.scheduler) as client, client.get_executor(pure=False) as pool:
        yield pool, max(1, sum(client.nthreads().values()))


def predictions_made_from(manifest: Manifest, split: str, recorded: dict[str, Any], weights: Path) -> MadeFrom:
    """What a store of predictions of ``split`` is made from: its images and tags, the ``recorded``
    settings of the stage that trained the network (:func:`~pipeline.core.provenance.settings`)
    and the network's weights."""
    return MadeFrom.made(manifest, (split,), recorded, {"weights": file_digest(weights)})


def expected_pseudo(ctx: Context) -> MadeFrom:
    """The record a reader must find in the pseudo-labels now (registered in :mod:`pipeline.core.registry`)."""
    return predictions_made_from(ctx.manifest, ctx.dataset.train_split,
                                 settings("segment", ctx.params(SegmentParams, "segment")), ctx.file(SEGMENT_WEIGHTS))


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
    batched = on_device(crf, device)
    pool = nullcontext((None, 1)) if crf is None or batched else crf_pool(run)
    pending: deque[tuple[Item, np.ndarray, Future | None, dict[str, np.ndarray]]] = deque()
    others = others or {}

    def finished(item: Item, plain: np.ndarray, refined: Future | None, extra: dict[str, np.ndarray]) -> Prediction:
        bar.update(1)
        return Prediction(item, plain, plain if refined is None else refined.result(), extra)

    bar = tqdm(total=len(dataset), desc=f"predict {split}", unit="img", disable=not progress)
    with pool as (executor, parallel), bar:
        for batch in loader:
            images = batch["image"].to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                probs_t = probabilities(images).float()
            own = None if tags is None else [tags[image_id] for image_id in batch["id"]]
            refined_batch = (_batch_crf_labels(batch["rgb"], probs_t, crf, None if own is None else
                                               torch.from_numpy(np.stack(own))) if batched else None)
            probs = probs_t.cpu().numpy()
            for index, image_id in enumerate(batch["id"]):
                allowed = None if own is None else own[index]
                plain = _argmax(probs[index], allowed)
                extra = {name: _argmax(probs[index], None if other is None else other[image_id])
                         for name, other in others.items()}
                if refined_batch is not None:
                    refined: Future | None = Future()
                    refined.set_result(refined_batch[index])
                elif crf is None:
                    refined = None
                else:
                    values = np.arange(len(probs[index]), dtype=np.uint8) if allowed is None else tag_values(allowed)
                    scores = probs[index] if allowed is None else restrict(probs[index], values)
                    refined = executor.submit(_crf_labels, batch["rgb"][index].numpy(), scores, crf, values)
                pending.append((items[image_id], plain, refined, extra))
            while pending and (len(pending) > 4 * parallel or pending[0][2] is None or pending[0][2].done()):
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
