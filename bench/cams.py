"""Benchmark: batched, size-grouped CAM extraction against the plain per-image loop.

The plain loop is PSA's and RRM's (their ``infer_cls.py``; IRN's differs only in running an
image and its mirror image as one batch of two): for each image, for each scale, one forward
pass of the image and another of its mirror image, every class map upsampled to the image size
and summed on the host. The batched extractor is the ``cams`` stage's: images of one size and
their mirror images in one pass, the batch norms folded into the convolutions, channels-last
layout, only the present classes upsampled, the store written by a background thread. Both read
the same JPEGs with DataLoader workers and write the same CAMs to a store, with the same network
on the same device, over the synthetic default's image size (96x96) and a VOC-like mix of
sizes, taking turns for ``--repeats`` rounds; each way's best round counts, the one least
disturbed by other work on the machine. Wall time is what a user waits; CPU time (this process
and its finished DataLoader workers) shows the work saved. Peak host memory (resident set) of
the batched extractor is measured in a fresh process for each count of ``--memory`` (default
200 and 2000 images of ``--memory-set``, the synthetic 96x96 by default), at the scales of
``--memory-scales`` (default 1.0 alone, so that 2000 images take a few minutes on a 2-core
CPU): it depends on the batch, not on the number of images.

With the project installed (``pip install -e .``)::

    python bench/cams.py --memory ""
    python bench/cams.py --no-speed --memory 200,2000
    python bench/cams.py --device cuda --backbone resnet38 --batch-pixels 2000000 --workers 8
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import load_average, peak_rss_in_fresh_process
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.core.io import write_image
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset
from pipeline.data.manifest import Item, Manifest, load_manifest
from pipeline.method.cams import CamFn, CamParams, extract_cams, select_and_normalise
from pipeline.models import CAMNet, build_backbone, fold_batch_norms

NUM_CLASSES = 20
SIZE_SETS = {
    "synthetic 96x96": [(96, 96)],
    "VOC-like mix": [
        (375, 500), (500, 375), (375, 500), (333, 500), (320, 480), (375, 500), (500, 333)
    ],
}
"""(height, width)s cycled through by the images of each set."""
SPEED_IMAGES = {"synthetic 96x96": 128, "VOC-like mix": 16}
"""Images of each set in the speed comparison, unless ``--images`` says otherwise: a few seconds
a round on a 2-core CPU."""


def build_net(backbone: str, device: torch.device) -> CAMNet:
    """An untrained classifier on ``backbone`` in eval mode (speed does not depend on the weights)."""
    torch.manual_seed(0)
    return CAMNet(build_backbone(backbone), NUM_CLASSES, freeze_bn=False).to(device).eval()


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
    cam_fn: CamFn, manifest: Manifest, store: ImageStore, params: CamParams, run: RunParams, device: torch.device
) -> None:
    """PSA's and RRM's way (their ``infer_cls.py``): one image at a time, read by DataLoader
    workers; each scale, and each mirror image, its own forward pass, whose maps of every class
    are upsampled to the image size, copied to the host, masked by the image's labels and
    flipped back there; the present classes of their sum kept and normalised."""
    loader = DataLoader(ImageDataset(manifest, "all"), num_workers=run.loader_processes(device),
                        pin_memory=device.type == "cuda")
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda" and params.amp):
        for sample in loader:
            image = sample["image"].to(device)
            height, width = image.shape[-2:]
            present = sample["labels"][0].numpy()[:, None, None]
            maps = []
            for scale in params.scales:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
                for mirrored in (False, True) if params.flip else (False,):
                    cams = cam_fn(scaled.flip(-1) if mirrored else scaled).float()
                    cams = F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)
                    cams = cams[0].cpu().numpy() * present
                    maps.append(np.flip(cams, axis=-1) if mirrored else cams)
            classes = sample["labels"][0].nonzero().flatten().tolist()
            cams = select_and_normalise(torch.from_numpy(np.sum(maps, axis=0)), classes).half().numpy()
            store.write(sample["id"][0], cams, classes=classes)


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
    run: RunParams,
    backbone: str,
    device: torch.device,
    repeats: int,
) -> dict[str, tuple[float, float]]:
    """The least (wall, CPU) seconds of each way over the same ``count`` images of ``sizes`` in
    ``repeats`` rounds (the ways take turns, each round into fresh stores)."""
    manifest = load_manifest(make_dataset(root, sizes, count))
    net = build_net(backbone, device)
    folded = fold_batch_norms(net)
    with torch.inference_mode():  # warm-up: library initialisation is no one's cost
        net.cams(torch.zeros(1, 3, 64, 64, device=device))
        folded.cams(torch.zeros(1, 3, 64, 64, device=device))
    ways: dict[str, Callable[[ImageStore], None]] = {
        "batched": lambda store: extract_cams(folded.cams, manifest, "all", store, params, device, run=run,
                                              progress=False),
        "per-image loop": lambda store: plain_loop(net.cams, manifest, store, params, run, device),
    }
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    for round_ in range(repeats):
        for index, (way, extract) in enumerate(ways.items()):
            store = ImageStore(root / f"round{round_}-way{index}.zarr")
            times[way].append(timed(partial(extract, store), device))
    return {way: (min(wall for wall, _ in runs), min(cpu for _, cpu in runs)) for way, runs in times.items()}


def _extract(
    manifest_path: Path, store_path: Path, params: CamParams, run: RunParams, backbone: str, device: str,
    threads: int,
) -> None:
    """Run the batched extractor over a manifest's images, as the memory runs do in a fresh process."""
    torch.set_num_threads(threads)
    net = fold_batch_norms(build_net(backbone, torch.device(device)))
    manifest = load_manifest(manifest_path)
    extract_cams(net.cams, manifest, "all", ImageStore(store_path), params, torch.device(device), run=run,
                 progress=False)


def peak_memory(
    root: Path,
    sizes: Sequence[tuple[int, int]],
    count: int,
    params: CamParams,
    run: RunParams,
    backbone: str,
    device: str,
    threads: int,
) -> tuple[float, float]:
    """Peak resident MB (main process, largest worker) of a fresh extraction of ``count`` images of ``sizes``."""
    manifest_path = make_dataset(root, sizes, count)
    return peak_rss_in_fresh_process(_extract, manifest_path, root / "cams.zarr", params, run, backbone, device,
                                     threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int,
                        help=f"images per size set in the speed comparison (default {SPEED_IMAGES})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the speed comparison; each way's best round counts")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="compare the batched extractor with the per-image loop (--no-speed: memory only)")
    parser.add_argument("--memory", default="200,2000",
                        help="image counts to measure peak memory for, comma-separated (empty: none)")
    parser.add_argument("--memory-set", choices=list(SIZE_SETS), default="synthetic 96x96",
                        help="the images of the memory runs")
    parser.add_argument("--memory-scales", default="1.0", help="the CAM scales of the memory runs")
    parser.add_argument("--backbone", default="small", help="a backbone of pipeline.models")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_RUN.inference_batch)
    parser.add_argument("--batch-pixels", type=int, default=DEFAULT_RUN.batch_pixels)
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader processes (default: by device, RunParams.loader_processes)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = CamParams()
    run = RunParams(loader_workers=args.workers, inference_batch=args.batch_size, batch_pixels=args.batch_pixels)

    print(f"machine: {os.cpu_count()} cores, load average {load_average()} before the run")
    print(
        f"device {device}, backbone {args.backbone}, scales {params.scales}, flip {params.flip}, "
        f"batch {run.inference_batch} (at most {run.batch_pixels} pixels), workers {run.loader_processes(device)}, "
        f"torch threads {args.threads}"
    )
    for name, sizes in SIZE_SETS.items() if args.speed else ():
        with tempfile.TemporaryDirectory() as tmp:
            count = args.images or SPEED_IMAGES[name]
            results = compare(Path(tmp), sizes, count, params, run, args.backbone, device, args.repeats)
        for way, (wall, cpu) in results.items():
            print(f"{name}, {count} images, {way}, best of {args.repeats}: {count / wall:.2f} img/s, "
                  f"{cpu / count:.3f} CPU s/img")
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
            peaks = peak_memory(Path(tmp), sizes, count, memory_params, run, args.backbone, args.device,
                                args.threads)
        print(
            f"peak host memory (RSS), batched extractor, {args.memory_set}, scales {memory_params.scales}, "
            f"{count} images: {peaks[0]:.0f} MB main process, {peaks[1]:.0f} MB largest worker "
            f"({time.perf_counter() - start:.0f} s with writing the images)"
        )
    print(f"load average {load_average()} after the run")


if __name__ == "__main__":
    main()
