"""Stage 7 (beyond the paper): affinities learnt from the prune stage's labels, and the training
split's CAMs propagated over them into dense pseudo-labels.

The affinity network (:class:`~pipeline.models.affinity.AffinityNet`) reads the classifier's
backbone as the classifier stage left it, as IRN keeps its backbone, and learns only its new
layers from the pairs of cells the prune stage's labels label (PSA's affinity labels and loss,
:mod:`pipeline.method.affinity`): by default the labels of its two CRFs alone (``crf.zarr``),
which is what PSA and IRN learn from, rather than the reliable masks, whose confidence filters
leave the pixels around each object unlabelled and so teach the network little of where objects
end. Each training image's CAMs are then averaged down to the network's grid, walked
``2 ** log_steps`` steps over the affinities raised to ``beta`` (fewer on a small grid, see
:meth:`RefineParams.steps_on`), upsampled back bilinearly, and
background competes with them (see :attr:`RefineParams.background`); the argmax over background
and the image's own tags gives its label, and the affinity labels' regions of those classes
complete the objects the walk found (:attr:`RefineParams.keep`): every pixel gets a label, and
none gets a class the image is not tagged with.

Defaults are the published ones where a measurement did not pick another (sources in the
fields' notes; the measurements in ``docs/results/refine.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.distributed import Distributed
from pipeline.core.io import file_digest, fingerprint
from pipeline.core.params import check_choice, check_range
from pipeline.core.provenance import MadeFrom, settings
from pipeline.core.registry import CAMS, LABELS, REFINE_LABELS, REFINE_WEIGHTS
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset, SegmentationDataset
from pipeline.data.manifest import Manifest
from pipeline.method.affinity import AFFINITIES, affinity_loss, label_grid, random_walk, transition_weights
from pipeline.method.cams import image_size, size_grouped_batches
from pipeline.method.metrics import SegmentationScore
from pipeline.models import fold_batch_norms, save_checkpoint
from pipeline.models.affinity import LEVELS, AffinityNet, to_grid
from pipeline.train.classifier import ClassifierParams, load_classifier
from pipeline.train.loop import Checkpoint, TrainingParams, data_parallel, train, unwrap

if TYPE_CHECKING:
    from pipeline.core.stage import Context

BACKGROUNDS = ("threshold", "power")
KEEPS = ("foreground", "none")


@dataclass(frozen=True)
class RefineParams(TrainingParams):
    crop_size: int = 512
    scale_range: tuple[float, ...] = (0.5, 1.5)
    batch_size: int = 32
    steps: int = 1000
    """IRN: 3 epochs of VOC's 10,582 train_aug images in batches of 32."""
    lr: float = 0.001
    """Adam's rate for the new layers (see :meth:`optimizer`); the backbone does not learn."""
    momentum: float = 0.9
    """Adam's first-moment decay (its beta1)."""
    weight_decay: float = 0.0
    labels: str = "crf"
    """What the affinities are learnt from (:data:`~pipeline.core.registry.LABELS`): the labels of
    the prune stage's two CRFs alone (``crf``, PSA's and IRN's affinity labels) or its reliable
    ``masks``."""
    affinity: str = "feature"
    """How the network scores a pair of cells (:data:`pipeline.method.affinity.AFFINITIES`): PSA's
    ``feature`` distance or IRN's class ``boundary`` on the line between them."""
    stride: int = 4
    """Pixels per cell of the grid the affinities are learnt and walked on (IRN's 4; PSA's 8)."""
    radius: int = 5
    """Neighbours within this many cells (PSA's and IRN's 5)."""
    beta: float = 10.0
    """Power of the affinities in the transition matrix (IRN's 10; PSA's 8)."""
    log_steps: int = 8
    """The walk takes ``2 ** log_steps`` steps (PSA's ``logt`` 8, IRN's ``exp_times`` 8) on a grid
    of ``walk_diagonal`` cells across and more."""
    walk_diagonal: float = 96.0
    """The grid diagonal, in cells, from which the walk takes all its ``2 ** log_steps`` steps; a
    smaller grid takes fewer, in proportion to its area (:meth:`steps_on`). 0: all of them on
    every grid, as PSA and IRN, whose images are VOC's."""
    background: str = "threshold"
    """How background competes with the walked CAMs: IRN's ``threshold`` (the tagged classes'
    CAMs walk alone, are divided by their largest value in the image, and background scores
    ``bg_threshold`` everywhere) or PSA's ``power`` (the score ``(1 - max_k cam_k) ** bg_power``
    walks beside them)."""
    bg_threshold: float = 0.35
    """IRN's ``sem_seg_bg_thres`` is 0.25."""
    bg_power: float = 16.0
    """PSA's alpha in ``infer_aff.py``."""
    keep: str = "foreground"
    """What of the affinity labels (``labels``) the refined labels keep: ``foreground``, each of
    their regions of one class to which the walk gives that class on ``keep_share`` of its pixels
    or more keeps it whole and the walk labels the rest (:func:`keep_foreground`), or ``none``,
    the walk labels every pixel (PSA, IRN). The walk starts from the CAMs, coarser than the CRFs
    that made these labels: it leaves the far parts of an object to background, and where a
    neighbour's affinities are strong it carries that neighbour's class over the object. The
    labels' background is kept out of the rule, being where they are least sure of an object's
    extent, which is what the walk adds."""
    keep_share: float = 0.25
    """The least share of a region of the affinity labels the walk must give its class for the
    region to be kept (``keep: foreground``): a region the walk hardly touches is most often a
    CRF's stray patch, a smooth background painted as an object around a faint CAM
    (docs/results/refine.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("labels", self.labels, REFINE_LABELS.names)
        check_choice("affinity", self.affinity, tuple(AFFINITIES))
        check_choice("background", self.background, BACKGROUNDS)
        check_choice("keep", self.keep, KEEPS)
        check_range("keep_share", self.keep_share, 0, 1)
        check_range("stride", self.stride, 1)
        check_range("radius", self.radius, 2)
        check_range("beta", self.beta, 0)
        check_range("log_steps", self.log_steps, 0, 16)
        check_range("walk_diagonal", self.walk_diagonal, 0)
        check_range("bg_threshold", self.bg_threshold, 0, 1)
        check_range("bg_power", self.bg_power, 0)

    @property
    def walk_steps(self) -> int:
        return 2**self.log_steps

    def steps_on(self, grid: tuple[int, int]) -> int:
        """The walk's steps on a grid of ``grid`` cells: :attr:`walk_steps` times the grid's
        squared diagonal over ``walk_diagonal``'s, at most 1, at least one step.

        How far a walk carries the CAMs grows as the square root of its steps, so a fixed count
        carries them over a larger part of a smaller image: the published 256 steps, set on VOC's
        500x375 images (a grid of 125x94 at stride 4), spread the CAMs of neighbouring objects
        over each other on small images. Scaling the steps by the grid's area keeps the part of
        the image a walk reaches."""
        if self.walk_diagonal == 0:
            return self.walk_steps
        share = (grid[0] ** 2 + grid[1] ** 2) / self.walk_diagonal**2
        return max(1, round(self.walk_steps * min(1.0, share)))

    def optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        """Adam over the new layers, not PSA's and IRN's SGD: at IRN's rate (0.1, no momentum) the
        feature distances of the new layers had barely moved after a few hundred steps, and their
        gradients are as small as one over the feature width (docs/results/refine.md)."""
        trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]
        return torch.optim.Adam(trainable, lr=self.lr, betas=(self.momentum, 0.999), weight_decay=self.weight_decay)


def build_affinity_net(classifier: ClassifierParams, num_classes: int, weights: Path,
                       params: RefineParams) -> AffinityNet:
    """The affinity network of ``params`` on the trained classifier's backbone (batch norms
    folded: it only infers), its new layers drawn from ``params.seed``."""
    torch.manual_seed(params.seed)
    backbone = fold_batch_norms(load_classifier(classifier, num_classes, weights)).backbone
    return AffinityNet(backbone, LEVELS[classifier.backbone], params.stride, AFFINITIES[params.affinity][0])


def affinity_made_from(manifest: Manifest, split: str, params: RefineParams, classifier: Path,
                       labels: ImageStore) -> MadeFrom:
    """What the affinity network is made from: the images and tags of ``split``, the `refine:`
    settings, the classifier's weights and the labels it learns from."""
    return MadeFrom.made(manifest, (split,), settings("refine", params),
                         {"classifier": file_digest(classifier), "labels": labels.fingerprint})


def refined_made_from(manifest: Manifest, split: str, params: RefineParams, weights: Path, cams: ImageStore,
                      labels: ImageStore) -> MadeFrom:
    """What the refined labels are made from: the images and tags of ``split``, the `refine:`
    settings, the affinity network, the CAMs it walks and, where they keep some of them
    (``params.keep``), the affinity labels ``labels``."""
    inputs = {"weights": file_digest(weights), "cams.zarr": cams.fingerprint}
    if params.keep != "none":
        inputs["labels"] = labels.fingerprint
    return MadeFrom.made(manifest, (split,), settings("refine", params), inputs)


def expected_refined(ctx: Context) -> MadeFrom:
    """The record a reader must find in the refined labels now (registered in :mod:`pipeline.core.registry`)."""
    params = ctx.params(RefineParams, "refine")
    return refined_made_from(ctx.manifest, ctx.dataset.train_split, params, ctx.file(REFINE_WEIGHTS),
                             ctx.storage.store(CAMS), ctx.storage.store(LABELS[params.labels]))


def train_affinity(net: AffinityNet, manifest: Manifest, split: str, params: RefineParams, labels: ImageStore,
                   out: Path, state: Path, ctx: Distributed, device: torch.device, run: RunParams = DEFAULT_RUN,
                   progress: bool = True) -> AffinityNet:
    """Train (or resume training) the new layers of ``net`` on the affinity labels of the
    ``labels`` of ``split``; write them to ``out`` (rank 0): the backbone is the classifier's,
    recorded as an input."""
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

    key = fingerprint(asdict(params), labels.fingerprint, manifest.name, split, len(dataset))
    train(model, loader, step, optimizer, params.loop("refine", progress, run), Checkpoint(state, key), ctx, device)
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


def walked_labels(walked: torch.Tensor, size: tuple[int, int], params: RefineParams) -> torch.Tensor:
    """The index, per pixel of ``size``, of the best of background (0) and the walked maps
    (:func:`walk_scores`, then upsampled bilinearly): against IRN's constant threshold after each
    image's maps are divided by their largest value, or against PSA's walked background score."""
    scores = F.interpolate(walked, size=size, mode="bilinear", align_corners=False)
    if params.background == "power":
        return scores.argmax(dim=1)
    scores = scores / scores.amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.cat([torch.full_like(scores[:, :1], params.bg_threshold), scores], dim=1).argmax(dim=1)


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


@torch.inference_mode()
def refine_split(net: AffinityNet, manifest: Manifest, split: str, cams: ImageStore, labels: ImageStore,
                 store: ImageStore, params: RefineParams, device: torch.device, run: RunParams = DEFAULT_RUN,
                 progress: bool = True) -> list[str]:
    """Write the refined labels of ``split`` to ``store`` (uint8 (H, W): 0 background, class + 1),
    skipping the images it holds in full, so that a killed run resumes where it stopped. Images
    of one size walk together (``run.inference_batch`` of them, at most ``run.batch_pixels``
    pixels), each with its own tags' CAMs, padded with empty maps to the batch's most; the
    affinity labels ``labels`` keep what ``params.keep`` says. Returns the ids written."""
    net.eval()
    dataset = ImageDataset(manifest, split)
    done = set(store.complete_ids())
    todo = {index: image_size(manifest.image_path(item.id)) for index, item in enumerate(dataset.items)
            if item.id not in done}
    if not todo:
        return []
    loader = DataLoader(dataset, batch_sampler=size_grouped_batches(todo, run.inference_batch, run.batch_pixels),
                        num_workers=run.loader_processes(device), pin_memory=device.type == "cuda")
    written = []
    with tqdm(total=len(todo), desc=f"refine {split}", unit="img", disable=not progress) as bar:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            size = tuple(images.shape[-2:])
            maps, values = _padded_cams(cams, batch["id"], size)
            with torch.autocast(device.type, enabled=device.type == "cuda" and params.amp):
                features = net(images)
            weights = transition_weights(features.float(), params.radius, params.beta, AFFINITIES[params.affinity][1])
            grid = tuple(features.shape[-2:])
            walked = random_walk(walk_scores(maps.to(device), grid, params), weights, params.radius,
                                 params.steps_on(grid))
            best = walked_labels(walked, size, params).cpu().numpy()
            refined = [own[choice] for choice, own in zip(best, values, strict=True)]
            if params.keep == "foreground":
                refined = [keep_foreground(walk, kept, own[1:], params.keep_share)
                           for walk, (kept, _), own in zip(refined, labels.read_many(batch["id"]), values, strict=True)]
            store.write_many([(image_id, array, {}) for image_id, array in zip(batch["id"], refined, strict=True)])
            written += batch["id"]
            bar.update(len(batch["id"]))
    return written


def _padded_cams(cams: ImageStore, ids: list[str], size: tuple[int, int]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The stored CAMs of ``ids`` as float32 (N, K, H, W), K the most classes of any of them, one
    at least (the others padded with zero maps), and each image's label value of every walked
    map (background, then its classes + 1; the padding maps too, which never win: they stay 0)."""
    read = cams.read_many(ids)
    width = max(1, *(len(attrs["classes"]) for _, attrs in read))
    maps = torch.zeros((len(ids), width, *size))
    values = []
    for index, (image_cams, attrs) in enumerate(read):
        maps[index, : len(attrs["classes"])] = torch.from_numpy(image_cams.astype(np.float32))
        classes = np.asarray(attrs["classes"], dtype=np.int64) + 1
        values.append(np.concatenate([[0], classes, np.zeros(width - len(classes), dtype=np.int64)]).astype(np.uint8))
    return maps, values


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
