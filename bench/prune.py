"""Benchmark: reliable-region pruning over a dask cluster against a plain serial loop.

On the synthetic benchmark's images, with fake CAMs made from the ground truth (each present
class's mask, blurred as a stride-8 network would blur it, divided by its maximum), so no
classifier is needed. Measured, over the same images:

- the plain loop: read the CAMs and the image, prune, write the mask, one image after another,
  no dask; its time per image is the rule's own cost;
- the crf and prune stages' work (``mine_split`` on a local cluster of 1 worker and of one
  worker per core, then ``prune_split``): images per second and time per image (scoring
  included, as the stages run it), the speed-up of all cores over one, and the cluster's
  start-up time, measured apart (workers are warmed up on a few images first, so the figures
  are the steady state a long run sees).

The masks of the three runs are checked to be equal. Other jobs on a shared machine slow the
parallel run most: the load average is printed before and after.

Peak host memory (resident set) of ``mine_split`` (the CRFs) on a local cluster of ``--workers`` processes
is measured in a fresh process for each count of ``--memory`` (default 200 and 2000 images of
96x96): the driver's and the largest worker's. Neither grows with the number of images: tasks
carry image ids, workers write the masks, the driver keeps a bounded number of tasks in flight.

With the project installed (``pip install -e .``)::

    python bench/prune.py --images 64 --size 96 --size 256
    python bench/prune.py --no-speed --memory 200,2000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from common import load_average, peak_rss_in_fresh_process
from scipy.ndimage import gaussian_filter

from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Manifest
from pipeline.data.synth import SynthParams, generate
from pipeline.method.crf_runner import connect
from pipeline.method.mining import mine_split, prune_split
from pipeline.method.prune import PruneParams, prune_image

SPLIT = "train"
PARAMS = PruneParams()
STRIDE = 8
"""The fake CAMs are blurred over about one cell of a stride-8 feature map."""


def kept(masks: ImageStore) -> tuple[ImageStore, ImageStore]:
    """Where the CRFs of a mask store of this benchmark are kept: its CRF labels and CRF maps beside it."""
    return tuple(ImageStore(masks.path.with_name(f"{masks.path.stem}_{name}.zarr")) for name in ("crf", "crfmaps"))


def mine_and_prune(manifest: Manifest, split: str, cams: ImageStore, masks: ImageStore, run: RunParams) -> None:
    """The crf stage's work, then the prune stage's: the masks of ``split`` from its CAMs."""
    mine_split(manifest, split, cams, *kept(masks), PARAMS, run, progress=False)
    prune_split(manifest, split, kept(masks)[1], masks, PARAMS, progress=False)


def fake_cams(gt: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """float16 (k, H, W): each class's ground-truth region blurred, divided by its maximum."""
    cams = [gaussian_filter((gt == c + 1).astype(np.float32), sigma=STRIDE / 2) for c in classes]
    return np.stack([cam / max(float(cam.max()), 1e-6) for cam in cams]).astype(np.float16)


def make_dataset(root: Path, size: int, count: int) -> tuple[Manifest, ImageStore]:
    """``count`` synthetic ``size`` x ``size`` images and a complete store of their fake CAMs."""
    params = SynthParams(image_size=size, train_images=count, val_images=0)
    manifest, _ = generate(params, root / "synth", root / "synth.json")
    cams = ImageStore(root / "cams.zarr", stage="cams")
    cams.reset_unless("fake CAMs")
    for item in manifest.split(SPLIT):
        cams.write(item.id, fake_cams(manifest.read_mask(item), item.labels), classes=list(item.labels))
    cams.mark_complete(item.id for item in manifest.split(SPLIT))
    return manifest, cams


def serial_loop(manifest: Manifest, cams: ImageStore, masks: ImageStore) -> float:
    """Seconds to prune every image in one process, without dask."""
    start = time.perf_counter()
    for item in manifest.split(SPLIT):
        image_cams, attrs = cams.read(item.id)
        image = manifest.read_image(item.id)
        mask = prune_image(image, image_cams.astype(np.float32), np.array(attrs["classes"]), PARAMS)
        masks.write(item.id, mask)
    return time.perf_counter() - start


def on_cluster(
    manifest: Manifest, cams: ImageStore, masks: ImageStore, workers: int, chunk_size: int
) -> tuple[float, float]:
    """(start-up seconds, seconds of :func:`mine_and_prune`) on a local cluster of ``workers`` warmed-up processes."""
    start = time.perf_counter()
    with connect(RunParams(workers=workers)) as client:
        started = time.perf_counter() - start
        cluster = RunParams(scheduler=client.scheduler.address, chunk_size=chunk_size)
        warm = replace(manifest, splits={"warm": manifest.split(SPLIT)[: 2 * workers]}, source=None)  # not its file's
        mine_and_prune(warm, "warm", cams, ImageStore(masks.path.with_suffix(".warm")),
                       replace(cluster, chunk_size=1))
        start = time.perf_counter()
        mine_and_prune(manifest, SPLIT, cams, masks, cluster)
        return started, time.perf_counter() - start


def _stored(store: ImageStore) -> list[bytes]:
    return [store.read(image_id)[0].tobytes() for image_id in store.ids()]


def bench(root: Path, size: int, count: int, cores: int, chunk_size: int) -> None:
    manifest, cams = make_dataset(root, size, count)
    serial = ImageStore(root / "serial.zarr")
    serial_seconds = serial_loop(manifest, cams, serial)
    print(
        f"{size}x{size}, {count} images, plain serial loop: "
        f"{count / serial_seconds:.2f} img/s, {serial_seconds / count * 1000:.1f} ms/img"
    )
    rates = {}
    for workers in sorted({1, cores}):
        masks = ImageStore(root / f"dask{workers}.zarr")
        started, seconds = on_cluster(manifest, cams, masks, workers, chunk_size)
        rates[workers] = count / seconds
        assert _stored(masks) == _stored(serial), "the masks differ from the serial loop's"
        print(
            f"{size}x{size}, {count} images, dask {workers} worker(s): {rates[workers]:.2f} img/s, "
            f"{seconds / count * 1000:.1f} ms/img, {serial_seconds / seconds:.2f}x the serial loop's rate, "
            f"cluster start-up {started:.1f} s"
        )
    print(f"{size}x{size}: speed-up of {cores} workers over 1: {rates[cores] / rates[1]:.2f}x "
          f"(load average {load_average()})")


def peak_memory(root: Path, count: int, workers: int, chunk_size: int) -> None:
    """Print the peak memory of mining ``count`` fresh 96x96 images in a fresh process."""
    manifest, cams = make_dataset(root, 96, count)
    start = time.perf_counter()
    cluster = RunParams(workers=workers, chunk_size=chunk_size)
    crf, maps = kept(ImageStore(root / "masks.zarr"))
    driver, worker = peak_rss_in_fresh_process(partial(mine_split, progress=False), manifest, SPLIT, cams, crf,
                                               maps, PARAMS, cluster)
    print(
        f"peak host memory (RSS), mine_split on {workers} worker(s), 96x96, {count} images: {driver:.0f} MB driver, "
        f"{worker:.0f} MB largest worker ({time.perf_counter() - start:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, action="append", help="image side in pixels (repeatable; default 96)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers of the all-cores run")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_RUN.chunk_size)
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with the serial loop and 1 worker (--no-speed: memory only)")
    parser.add_argument("--memory", default="200,2000",
                        help="image counts to measure peak memory for, comma-separated (empty: none)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {load_average()} before the run")
    print(f"chunk size {args.chunk_size}, CRF {PARAMS.crf}")
    for size in (args.size or [96]) if args.speed else ():
        with tempfile.TemporaryDirectory() as tmp:
            bench(Path(tmp), size, args.images, args.workers, args.chunk_size)
    for count in (int(text) for text in args.memory.split(",") if text):
        with tempfile.TemporaryDirectory() as tmp:
            peak_memory(Path(tmp), count, args.workers, args.chunk_size)
    print(f"load average {load_average()} after the run")


if __name__ == "__main__":
    main()
