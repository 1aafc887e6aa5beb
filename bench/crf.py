"""Benchmark: the reliable-region rule (two dense CRFs per image) with each CRF backend.

On default `rrm synth` images rendered at two sizes, 96x96 (the benchmark's) and VOC's usual
500x375, with CAM-like maps made from their ground truth (each object's mask blurred as a
stride-8 network blurs it, plus a weaker copy shifted off it, max-normalised). Measured:

- images per second of ``prune_images`` with ``pydensecrf`` and with ``torch`` on this CPU, on
  1 core (one process, one thread) and on every core (a pool of single-threaded processes, as
  the prune stage's local cluster runs them);
- with ``--device cuda``: the torch backend on the GPU, batches of ``--batch`` images, and its
  peak GPU memory (target: at least 50 VOC-sized images per second);
- the agreement of the two backends on the same images: the share of pixels given the same
  reliable label, and the mean absolute difference of the CRFs' marginals.

    python bench/crf.py                        # CPU: about 5 minutes on 2 cores
    python bench/crf.py --device cuda --voc-images 512
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from common import load_average
from scipy.ndimage import gaussian_filter

from pipeline.data.synth import SynthParams, render, sample_rng
from pipeline.method.crf import BACKENDS
from pipeline.method.crf_runner import dense_crf
from pipeline.method.prune import PruneParams, prune_images, stack_scores

STRIDE = 8
"""The maps are blurred over about one cell of a stride-8 feature map."""

VOC_SIZE = (375, 500)
"""Height and width of most PASCAL VOC images."""

Case = tuple[np.ndarray, np.ndarray, np.ndarray]
"""An image, its CAM-like maps (k, H, W) and their k class indices."""


def cases(count: int, size: tuple[int, int]) -> list[Case]:
    """``count`` synthetic images of ``size`` (height, width) with CAM-like maps of their objects."""
    height, width = size
    made = []
    for index in range(count):
        sample = render(SynthParams(image_size=max(size)), sample_rng(0, "train", index))
        image, mask = sample.image[:height, :width], sample.mask[:height, :width]
        labels = [label for label in np.unique(mask) if label] or [int(sample.mask.max())]
        cams = []
        for label in labels:
            own = (mask == label).astype(np.float32)
            cam = gaussian_filter(own, STRIDE / 2) + 0.5 * gaussian_filter(np.roll(own, STRIDE, axis=1), STRIDE)
            cams.append(cam / max(float(cam.max()), 1e-6))
        made.append((np.ascontiguousarray(image), np.stack(cams), np.array(labels) - 1))
    return made


def _prune(chunk: Sequence[Case], params: PruneParams, device: str = "cpu") -> list[np.ndarray]:
    return prune_images(*zip(*chunk), params, device)


def _one_thread() -> None:
    torch.set_num_threads(1)


def images_per_second(work: Sequence[Case], params: PruneParams, processes: int) -> float:
    """Images per second of the rule over ``work`` on ``processes`` single-threaded processes,
    one image per task (after one warm-up image per process)."""
    if processes == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _prune(work[:1], params)
            start = time.perf_counter()
            for case in work:
                _prune([case], params)
            return len(work) / (time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=spawn, initializer=_one_thread) as pool:
        list(pool.map(_prune, [work[:1]] * processes, [params] * processes))
        start = time.perf_counter()
        list(pool.map(_prune, [[case] for case in work], [params] * len(work)))
        return len(work) / (time.perf_counter() - start)


def batched_images_per_second(work: Sequence[Case], batch: int, device: torch.device) -> float:
    """The torch backend in this process on ``device``, batches of ``batch`` images (after one
    warm-up batch): images per second."""
    params = PruneParams(crf_backend="torch")
    wait = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    _prune(work[:batch], params, str(device))
    wait()
    start = time.perf_counter()
    for first in range(0, len(work), batch):
        _prune(work[first : first + batch], params, str(device))
    wait()
    return len(work) / (time.perf_counter() - start)


def agreement(work: Sequence[Case]) -> tuple[float, float]:
    """(share of pixels with the same reliable label, mean absolute difference of the marginals)
    of the two backends over ``work``."""
    same = pixels = 0
    differences = []
    backends = [PruneParams(crf_backend=backend) for backend in BACKENDS]
    for image, cams, classes in work:
        first, second = (prune_images([image], [cams], [classes], params)[0] for params in backends)
        same, pixels = same + int((first == second).sum()), pixels + first.size
        for alpha in (backends[0].la_alpha, backends[0].ha_alpha):
            scores = stack_scores(cams.astype(np.float32), alpha)
            marginals = [dense_crf(image, scores, params.crf) for params in backends]
            differences.append(float(np.abs(marginals[0] - marginals[1]).mean()))
    return same / pixels, float(np.mean(differences))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-images", type=int, default=64, help="96x96 images per measurement")
    parser.add_argument("--voc-images", type=int, default=16, help="500x375 images per measurement")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="processes of the all-cores run")
    parser.add_argument("--device", default="cpu", help="cuda: also the torch backend on the GPU")
    parser.add_argument("--batch", type=int, default=16, help="images per GPU batch")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, load average {load_average()} before the run")
    for name, count, size in (("96x96", args.small_images, (96, 96)), ("500x375", args.voc_images, VOC_SIZE)):
        work = cases(count, size)
        same, difference = agreement(work[: min(count, 8)])
        print(f"{name}: backends agree on {100 * same:.3f} % of the pixels' reliable labels, "
              f"marginals differ by {difference:.2e} on average ({min(count, 8)} images)")
        rates = {}
        for backend in BACKENDS:
            params = PruneParams(crf_backend=backend)
            for processes in sorted({1, args.processes}):
                rates[backend, processes] = images_per_second(work, params, processes)
                rate = rates[backend, processes]
                print(f"{name}, {count} images, {backend}, {processes} single-threaded process(es): "
                      f"{rate:.2f} img/s, {1000 / rate:.1f} ms/img", flush=True)
        for processes in sorted({1, args.processes}):
            print(f"{name}, {processes} process(es): torch / pydensecrf = "
                  f"{rates['torch', processes] / rates['pydensecrf', processes]:.2f}x the rate")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            rate = batched_images_per_second(work, args.batch, device)
            print(f"{name}, {count} images, torch on {torch.cuda.get_device_name(device)}, batches of {args.batch}: "
                  f"{rate:.2f} img/s, peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB")
    print(f"load average {load_average()} after the run")


if __name__ == "__main__":
    main()
