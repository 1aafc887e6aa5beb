"""Benchmark: batched, size-grouped CAM extraction against the plain per-image loop.

The plain loop is the PSA/IRN/RRM way: for each image, for each scale, one forward pass of the
image and another of its mirror image (the mirrored maps are added before upsampling, as in the
batched path, so that only the way images go through the network differs). Both read the same
JPEGs and write the same CAMs to a store, with the same network on the same device, once each,
over the synthetic default's image size (96x96) and a VOC-like mix of sizes. Wall time is what
a user waits; CPU time (this process and its finished DataLoader workers) is less disturbed by
other jobs on a shared machine. Peak host memory (resident set) of the batched extractor is
measured in a fresh process for each count of ``--memory`` (default 200 and 2000 images of
``--memory-set``, the synthetic 96x96 by default), at the scales of ``--memory-scales`` (default
1.0 alone, so that 2000 images take a few minutes on a 2-core CPU): it depends on the batch,
not on the number of images.

With the project installed (``pip install -e .``)::

    python bench/cams.py --device cpu --images 32 --threads 1
    python bench/cams.py --no-speed --memory 200,2000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.cams import CamFn, CamParams, extract_cams, select_and_normalise
from pipeline.data import normalize
from pipeline.io import write_image
from pipeline.manifest import Item, Manifest, load_manifest
from pipeline.models import CAMNet, build_backbone
from pipeline.store import ImageStore

NUM_CLASSES = 20
SIZE_SETS = {
    "synthetic 96x96": [(96, 96)],
    "VOC-like mix": [
        (375, 500), (500, 375), (375, 500), (333, 500), (320, 480), (375, 500), (500, 333)
    ],
}
"""(height, width)s cycled through by the images of each set."""


def build_cam_fn(backbone: str, device: torch.device) -> CamFn:
    """The CAM head of an untrained classifier on ``backbone`` (speed does not depend on the weights)."""
    torch.manual_seed(0)
    net = CAMNet(build_backbone(backbone), NUM_CLASSES, freeze_bn=False).to(device).eval()
    return net.cams


def make_dataset(root: Path, sizes: Sequence[tuple[int, int]], count: int) -> Path:
    """Write ``count`` smooth random JPEGs cycling through ``sizes``, 1-2 labels each; returns the manifest."""
    rng = np.random.default_rng(0)
    items = []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
        write_image(root / "images" / f"b{index:05d}.jpg", image)
        labels = rng.choice(NUM_CLASSES, size=int(rng.integers(1, 3)), replace=False)
        items.append(Item(f"b{index:05d}", tuple(sorted(int(c) for c in labels))))
    classes = tuple(f"c{c}" for c in range(NUM_CLASSES))
    Manifest("bench", classes, root / "images", ".jpg", {"all": tuple(items)}).save(root / "bench.json")
    return root / "bench.json"


def plain_loop(
    cam_fn: CamFn, manifest: Manifest, store: ImageStore, params: CamParams, device: torch.device
) -> None:
    """One image at a time; each scale, and each flip, its own forward pass."""
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda" and params.amp):
        for item in manifest.split("all"):
            image = torch.from_numpy(normalize(manifest.read_image(item.id)))[None].to(device)
            height, width = image.shape[-2:]
            total = torch.zeros((), device=device)
            for scale in params.scales:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
                maps = cam_fn(scaled).float()
                if params.flip:
                    maps = maps + cam_fn(scaled.flip(-1)).float().flip(-1)
                total = total + F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
            cams = select_and_normalise(total[0], item.labels).half().cpu().numpy()
            store.write(item.id, cams, classes=list(item.labels))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def timed(run: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``run()``."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def compare(
    root: Path,
    sizes: Sequence[tuple[int, int]],
    count: int,
    params: CamParams,
    backbone: str,
    device: torch.device,
) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of each way over the same ``count`` images of ``sizes``."""
    manifest = load_manifest(make_dataset(root, sizes, count))
    cam_fn = build_cam_fn(backbone, device)
    with torch.inference_mode():
        cam_fn(torch.zeros(1, 3, 64, 64, device=device))  # warm-up: library initialisation is no one's cost
    batched_store, plain_store = ImageStore(root / "batched.zarr"), ImageStore(root / "plain.zarr")
    return {
        "batched": timed(
            lambda: extract_cams(cam_fn, manifest, "all", batched_store, params, device, progress=False), device
        ),
        "per-image loop": timed(lambda: plain_loop(cam_fn, manifest, plain_store, params, device), device),
    }


def _measure_peak_rss(
    manifest_path: Path, store_path: Path, params: CamParams, backbone: str, device: str, threads: int
) -> tuple[float, float]:
    """In a fresh process: run the batched extractor; the peak resident MB of this process and of
    its largest DataLoader worker."""
    torch.set_num_threads(threads)
    cam_fn = build_cam_fn(backbone, torch.device(device))
    manifest = load_manifest(manifest_path)
    extract_cams(cam_fn, manifest, "all", ImageStore(store_path), params, torch.device(device), progress=False)
    kilobytes = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return kilobytes[0] / 1024, kilobytes[1] / 1024


def peak_memory(
    root: Path,
    sizes: Sequence[tuple[int, int]],
    count: int,
    params: CamParams,
    backbone: str,
    device: str,
    threads: int,
) -> tuple[float, float]:
    """Peak resident MB (main process, largest worker) of a fresh extraction of ``count`` images of ``sizes``."""
    manifest_path = make_dataset(root, sizes, count)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(_measure_peak_rss, manifest_path, root / "cams.zarr", params, backbone, device,
                            threads).result()


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32, help="images per size set in the speed comparison")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="compare the batched extractor with the per-image loop (--no-speed: memory only)")
    parser.add_argument("--memory", default="200,2000",
                        help="image counts to measure peak memory for, comma-separated (empty: none)")
    parser.add_argument("--memory-set", choices=list(SIZE_SETS), default="synthetic 96x96",
                        help="the images of the memory runs")
    parser.add_argument("--memory-scales", default="1.0", help="the CAM scales of the memory runs")
    parser.add_argument("--backbone", default="small", help="a backbone of pipeline.models")
    parser.add_argument("--batch-size", type=int, default=CamParams.batch_size)
    parser.add_argument("--batch-pixels", type=int, default=CamParams.batch_pixels)
    parser.add_argument("--workers", type=int, default=CamParams.num_workers)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = CamParams(batch_size=args.batch_size, batch_pixels=args.batch_pixels, num_workers=args.workers)

    print(f"machine: {os.cpu_count()} cores, load average {_load()} before the run")
    print(
        f"device {device}, backbone {args.backbone}, scales {params.scales}, flip {params.flip}, "
        f"batch {params.batch_size} (at most {params.batch_pixels} pixels), workers {params.num_workers}, "
        f"torch threads {args.threads}"
    )
    for name, sizes in SIZE_SETS.items() if args.speed else ():
        with tempfile.TemporaryDirectory() as tmp:
            results = compare(Path(tmp), sizes, args.images, params, args.backbone, device)
        for way, (wall, cpu) in results.items():
            print(
                f"{name}, {args.images} images, {way}: {args.images / wall:.2f} img/s, "
                f"{cpu / args.images:.3f} CPU s/img"
            )
        (batched_wall, batched_cpu), (plain_wall, plain_cpu) = results.values()
        print(
            f"{name}: batched/per-image speed ratio {plain_wall / batched_wall:.2f}x wall, "
            f"{plain_cpu / batched_cpu:.2f}x CPU"
        )
    memory_params = replace(params, scales=tuple(float(text) for text in args.memory_scales.split(",")))
    for count in (int(text) for text in args.memory.split(",") if text):
        with tempfile.TemporaryDirectory() as tmp:
            sizes = SIZE_SETS[args.memory_set]
            start = time.perf_counter()
            peaks = peak_memory(Path(tmp), sizes, count, memory_params, args.backbone, args.device, args.threads)
        print(
            f"peak host memory (RSS), batched extractor, {args.memory_set}, scales {memory_params.scales}, "
            f"{count} images: {peaks[0]:.0f} MB main process, {peaks[1]:.0f} MB largest worker "
            f"({time.perf_counter() - start:.0f} s with writing the images)"
        )
    print(f"load average {_load()} after the run")


if __name__ == "__main__":
    main()
