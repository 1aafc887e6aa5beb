"""End-to-end training's miner: the reliable regions of each training batch re-mined from the
network's own CAMs of that step, as RRM's training does (:class:`Miner`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.io import IGNORE
from pipeline.method.cams import CamFn, select_and_normalise
from pipeline.method.crf_runner import crf_processes, on_device
from pipeline.method.prune import PruneParams, prune_image, prune_images
from pipeline.models import SegNet
from pipeline.train.segnet import upsample


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
