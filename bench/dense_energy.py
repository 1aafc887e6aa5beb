"""Benchmark: the dense energy loss at the paper's setting, by filter, and the lattice's accuracy.

Batch 4, crop 321, 21 classes, sigma_rgb 15, sigma_xy 100, half resolution (160 x 160): one
forward and backward pass of the loss with the lattice (CPU), the exact blockwise filter (CPU),
the exact filter on a GPU when there is one, and a brute-force filter that writes W out (at a
smaller size where W would not fit; the paper-size figure is then scaled by the squared pixel
count, W's size). Images are the project's synthetic ones (:mod:`pipeline.data.synth`). Times are
compared with 0.28 s per batch, the reference's compiled lattice on a 2-core CPU; the machine's
load average is printed with each, since a shared CPU slows them all.

    python bench/dense_energy.py               # with the project installed (pip install -e .)
    python bench/dense_energy.py --skip-exact  # the exact CPU filter takes about a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.synth import SynthParams, render, sample_rng
from pipeline.method.losses import DenseEnergyLoss, bilateral_filter, bilateral_filter_lattice

BATCH, CROP, CLASSES = 4, 321, 21
SIGMA_RGB, SIGMA_XY, SCALE = 15.0, 100.0, 0.5
REFERENCE_SECONDS = 0.28
"""The reference's compiled permutohedral lattice, forward and backward, per batch on this CPU."""

Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def make_batch(size: int, seed: int = 0) -> Batch:
    """Synthetic images, softmax outputs that roughly follow the ground truth, crop padding on the
    right of the last image, and labels of which 60% are unknown (255)."""
    params = SynthParams(image_size=size, num_classes=CLASSES - 1)
    samples = [render(params, sample_rng(seed, "train", index)) for index in range(BATCH)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() for s in samples])
    truth = torch.stack([torch.from_numpy(s.mask).long() for s in samples])
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * F.one_hot(truth, CLASSES).permute(0, 3, 1, 2).float()
    probs = torch.softmax(logits + 2 * torch.randn(logits.shape, generator=generator), dim=1)
    valid = torch.ones(BATCH, size, size)
    valid[-1, :, size * 3 // 4 :] = 0
    labels = truth.masked_fill(torch.rand(truth.shape, generator=generator) < 0.6, 255)
    return images, probs, valid, labels


Timings = list[tuple[float, float]]
"""(wall, CPU) seconds of each timed run."""


def timed(
    run: Callable[[], Tensor], repeats: int, warm_up: bool = True, cuda: bool = False
) -> tuple[Timings, Tensor]:
    """Wall and CPU seconds of each of ``repeats`` runs (after a warm-up run), and the last result."""
    result = run() if warm_up else torch.empty(())
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        if cuda:
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
    return seconds, result


def loss_step(loss: DenseEnergyLoss, batch: Batch) -> Callable[[], Tensor]:
    """One forward and backward pass of ``loss``; returns the loss."""
    images, probs, valid, labels = batch

    def run() -> Tensor:
        leaf = probs.detach().requires_grad_(True)
        value = loss(images, leaf, valid, labels)
        value.backward()
        return value.detach()

    return run


def brute_force_filter(images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """``W @ values`` with each image's W written out in full (pixels^2 floats)."""
    _, _, h, w = images.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    position = torch.stack([rows, cols], dim=-1).reshape(-1, 2).float()
    filtered = []
    for image, value in zip(images, values, strict=True):
        colour = image.reshape(3, -1).T
        kernel = torch.exp(
            -torch.cdist(position, position).square() / (2 * sigma_xy**2)
            - torch.cdist(colour, colour).square() / (2 * sigma_rgb**2)
        )
        filtered.append((kernel @ value.reshape(len(value), -1).T).T.reshape(value.shape))
    return torch.stack(filtered)


def report(name: str, seconds: Timings, note: str = "") -> None:
    """Best and median wall time, the best's CPU time, the best's ratio to the reference, the load."""
    best = min(seconds)
    median = statistics.median(wall for wall, _ in seconds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{name:<36} wall best {best[0]:8.3f} s, median {median:8.3f} s; CPU {best[1]:8.3f} s; "
        f"x{best[0] / REFERENCE_SECONDS:7.2f} of the reference (load {load}){note}",
        flush=True,
    )


def lattice_accuracy(batch: Batch) -> None:
    """Per-pixel ratio of the lattice's to the exact sum of W, at the loss's resolution and sigmas."""
    images = F.interpolate(batch[0], scale_factor=SCALE, mode="bilinear", align_corners=False)
    ones = torch.ones_like(images[:, :1])
    ratio = bilateral_filter_lattice(images, ones, SIGMA_RGB, SIGMA_XY * SCALE) / bilateral_filter(
        images, ones, SIGMA_RGB, SIGMA_XY * SCALE
    )
    per_image = ", ".join(f"{float(r.mean()):.3f}" for r in ratio)
    print(
        f"lattice / exact sum of W per pixel: mean {float(ratio.mean()):.3f} (per image {per_image}), "
        f"sd {float(ratio.std()):.3f}, range {float(ratio.min()):.2f}-{float(ratio.max()):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-exact", action="store_true", help="skip the exact filter on the CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast filters")
    parser.add_argument("--brute-crop", type=int, default=161, help="crop for the brute-force filter")
    parser.add_argument("--threads", type=int, help="CPU threads (torch's default if not given)")
    args = parser.parse_args()
    if args.threads:
        # on a shared CPU one thread per free core avoids threads waiting on a descheduled one
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"batch {BATCH}, crop {CROP} -> {int(CROP * SCALE)} x {int(CROP * SCALE)}, {CLASSES} classes")
    batch = make_batch(CROP)
    energies = {}
    seconds, energies["lattice"] = timed(loss_step(DenseEnergyLoss(method="lattice"), batch), args.repeats)
    report("lattice, CPU", seconds)
    if not args.skip_exact:
        seconds, energies["exact"] = timed(loss_step(DenseEnergyLoss(method="exact"), batch), 1, warm_up=False)
        report("exact blockwise, CPU", seconds)
        print(f"loss with the lattice / exact: {float(energies['lattice'] / energies['exact']):.4f}")
        lattice_accuracy(batch)

    small = make_batch(args.brute_crop)
    images = F.interpolate(small[0], scale_factor=SCALE, mode="bilinear", align_corners=False)
    probs = F.interpolate(small[1], scale_factor=SCALE, mode="bilinear", align_corners=False)
    seconds, _ = timed(lambda: brute_force_filter(images, probs, SIGMA_RGB, SIGMA_XY * SCALE), 1, warm_up=False)
    growth = (int(CROP * SCALE) / images.shape[-1]) ** 4
    report(f"brute force, CPU, {images.shape[-1]} x {images.shape[-1]}", seconds)
    estimate = [(wall * growth, cpu * growth) for wall, cpu in seconds]
    report("brute force, CPU, paper size (est.)", estimate, f" [x{growth:.0f} the above]")

    if torch.cuda.is_available():
        on_gpu = tuple(tensor.cuda() for tensor in batch)
        seconds, energy = timed(loss_step(DenseEnergyLoss(method="exact"), on_gpu), args.repeats, cuda=True)
        report(f"exact (attention), {torch.cuda.get_device_name()}", seconds)
        if "exact" in energies:
            print(f"GPU / CPU exact loss: {float(energy.cpu() / energies['exact']):.6f}")
    else:
        print("no GPU: the exact filter's GPU timing is not measured")


if __name__ == "__main__":
    main()
