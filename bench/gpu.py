"""Benchmark: every GPU figure of the project, measured by one script and printed as one JSON.

On one GPU, in under 8 minutes:

- ``cams``: batched CAM extraction (``pipeline.method.cams.extract_cams``) against the per-image
  loop of PSA and RRM, ResNet-38 at VOC sizes, four scales with flips (target: at least 5x);
- ``dense_energy``: the dense energy loss at the paper's size (4 crops of 321, 21 classes, half
  resolution) with the exact kernel, forward and backward (target: under 20 ms);
- ``training``: classifier (ResNet-38, crops of 448, batches of 8) and segment (end to end's
  network, crops of 321, batches of 4) steps per second, with AMP on and off (synthetic tensors:
  the network and optimiser alone, no data loading or mining);
- ``prune``: images per second of the reliable-region rule (two dense CRFs each, pydensecrf on
  the CPU cores) on VOC-sized synthetic images over a local cluster of every core;
- ``prune_torch``: the same rule with the torch CRF backend on the device, batches of 16
  500x375 images (target: at least 50 images per second on a GPU; see ``bench/crf.py``);
- ``refine_walk``: the refine stage's random walk (transition weights and ``2 ** log_steps``
  steps, the stage's defaults) on batches of 8 500x375 images on the device, three maps each
  (see ``bench/refine.py`` for the dense-matrix reference);

each with the peak GPU memory it took (null on a CPU). ``--smoke`` runs the same code at toy
sizes with the small backbone, on whatever device is given, in seconds: the test of this script.

    python bench/gpu.py --device cuda > gpu.json
    python bench/gpu.py --smoke              # on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cams import SIZE_SETS, compare
from common import load_average
from crf import VOC_SIZE, batched_images_per_second, cases
from dense_energy import loss_step, make_batch, timed
from prune import make_dataset, on_cluster

from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.method.affinity import AFFINITIES, grid_size, random_walk, transition_weights
from pipeline.method.cams import CamParams
from pipeline.method.losses import DenseEnergyLoss
from pipeline.models import CAMNet, SegNet, build_backbone, param_groups
from pipeline.train.refine import RefineParams

REFINE = RefineParams()
"""The refine stage's defaults: stride, radius, beta, walk length, kind of affinity."""


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the full GPU run, or the smoke test's toy version."""

    backbone: str
    cam_sizes: str
    cam_images: int
    energy_crop: int
    classifier_crop: int
    classifier_batch: int
    segment_crop: int
    segment_batch: int
    train_steps: int
    prune_size: int
    prune_images: int
    prune_workers: int | None
    """None: one per CPU core."""
    crf_size: tuple[int, int]
    crf_batch: int
    walk_images: int
    walk_batch: int


FULL = Sizes("resnet38", "VOC-like mix", 32, 321, 448, 8, 321, 4, 20, 400, 64, None, VOC_SIZE, 16, 32, 8)
SMOKE = Sizes("small", "synthetic 96x96", 2, 64, 64, 2, 64, 2, 2, 48, 2, 1, (48, 64), 2, 2, 2)


@contextmanager
def gpu_memory(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    """Put the peak GPU memory (MB) of the block into ``into["peak_gpu_mb"]`` (None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def synchronised(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def bench_cams(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    run = RunParams(loader_workers=min(4, os.cpu_count() or 1),
                    batch_pixels=2_000_000 if device.type == "cuda" else RunParams().batch_pixels)
    result: dict[str, Any] = {"backbone": sizes.backbone, "images": sizes.cam_images, "sizes": sizes.cam_sizes}
    with gpu_memory(device, result), tempfile.TemporaryDirectory() as tmp:
        times = compare(Path(tmp), SIZE_SETS[sizes.cam_sizes], sizes.cam_images, CamParams(), run, sizes.backbone,
                        device, repeats=1)
    (batched, _), (plain, _) = times["batched"], times["per-image loop"]
    return {**result, "batched_img_per_s": round(sizes.cam_images / batched, 2),
            "per_image_img_per_s": round(sizes.cam_images / plain, 2), "speed_ratio": round(plain / batched, 2)}


def bench_dense_energy(sizes: Sizes, device: torch.device, repeats: int = 5) -> dict[str, Any]:
    images, probs, valid, labels = (tensor.to(device) for tensor in make_batch(sizes.energy_crop))
    step = loss_step(DenseEnergyLoss(method="exact"), (images, probs, valid, labels))
    result: dict[str, Any] = {"crop": sizes.energy_crop, "batch": len(images), "classes": probs.shape[1]}
    with gpu_memory(device, result):
        seconds, _ = timed(step, repeats, cuda=device.type == "cuda")
    return {**result, "forward_backward_ms": round(1000 * min(wall for wall, _ in seconds), 2)}


def _training_step(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: bool,
                   optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        output = net(images)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        loss = F.multilabel_soft_margin_loss(logits.float(), labels)
        if not isinstance(output, torch.Tensor):
            seg = F.interpolate(output.seg.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + F.cross_entropy(seg, torch.zeros(seg.shape[0], *seg.shape[-2:], dtype=torch.long,
                                                           device=device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_training(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Steps per second of the classifier's and the segment stage's networks, AMP on and off."""
    wait = synchronised(device)
    results: dict[str, Any] = {}
    for name, network, crop, batch in (("classifier", CAMNet, sizes.classifier_crop, sizes.classifier_batch),
                                       ("segment", SegNet, sizes.segment_crop, sizes.segment_batch)):
        for amp in (True, False):
            torch.manual_seed(0)
            net = network(build_backbone(sizes.backbone), 20, freeze_bn=True).to(device).train()
            optimizer = torch.optim.SGD(param_groups(net, 0.001, 5e-4), lr=0.001, momentum=0.9)
            images = torch.randn(batch, 3, crop, crop, device=device)
            labels = (torch.rand(batch, 20, device=device) < 0.1).float()
            entry: dict[str, Any] = {"crop": crop, "batch": batch}
            with gpu_memory(device, entry):
                _training_step(net, images, labels, amp, optimizer, device)  # warm-up
                wait()
                start = time.perf_counter()
                for _ in range(sizes.train_steps):
                    _training_step(net, images, labels, amp, optimizer, device)
                wait()
                seconds = time.perf_counter() - start
            results[f"{name}_amp_{'on' if amp else 'off'}"] = {**entry,
                                                               "steps_per_s": round(sizes.train_steps / seconds, 3)}
    return results


def bench_prune(sizes: Sizes) -> dict[str, Any]:
    workers = sizes.prune_workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        manifest, cams = make_dataset(Path(tmp), sizes.prune_size, sizes.prune_images)
        started, seconds = on_cluster(manifest, cams, ImageStore(Path(tmp) / "masks.zarr"), workers, chunk_size=1)
    return {"size": sizes.prune_size, "images": sizes.prune_images, "workers": workers,
            "img_per_s": round(sizes.prune_images / seconds, 2), "cluster_start_s": round(started, 2),
            "peak_gpu_mb": None}


def bench_prune_torch(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    work = cases(sizes.prune_images, sizes.crf_size)
    result: dict[str, Any] = {"size": list(sizes.crf_size), "images": len(work), "batch": sizes.crf_batch}
    with gpu_memory(device, result):
        rate = batched_images_per_second(work, sizes.crf_batch, device)
    return {**result, "img_per_s": round(rate, 2)}


def bench_refine_walk(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    channels, pairs = AFFINITIES[REFINE.affinity]
    grid = grid_size(sizes.crf_size, REFINE.stride)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(sizes.walk_batch, channels, *grid, generator=generator).to(device),
                torch.rand(sizes.walk_batch, 3, *grid, generator=generator).to(device))
               for _ in range(max(1, sizes.walk_images // sizes.walk_batch))]
    result: dict[str, Any] = {"size": list(sizes.crf_size), "grid": list(grid), "batch": sizes.walk_batch,
                              "images": len(batches) * sizes.walk_batch, "steps": REFINE.walk_steps}
    wait = synchronised(device)
    with gpu_memory(device, result), torch.inference_mode():
        wait()
        start = time.perf_counter()
        for features, maps in batches:
            random_walk(maps, transition_weights(features, REFINE.radius, REFINE.beta, pairs), REFINE.radius,
                        REFINE.walk_steps)
        wait()
        seconds = time.perf_counter() - start
    return {**result, "img_per_s": round(result["images"] / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and the small backbone: seconds on a CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "smoke": args.smoke, "load_average_before": load_average(),
        "cams": bench_cams(sizes, device),
        "dense_energy": bench_dense_energy(sizes, device),
        "training": bench_training(sizes, device),
        "prune": bench_prune(sizes),
        "prune_torch": bench_prune_torch(sizes, device),
        "refine_walk": bench_refine_walk(sizes, device),
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
