"""Benchmark: a threshold rerun from the kept CRFs against the whole pruning it replaces.

Before the crf stage kept what the rule needs of the two dense CRFs, editing any threshold of
`prune:` reran the whole pruning: both CRFs of every image and the rule. Now it reruns the rule
alone, from the maps the crf stage kept. Measured side by side on the same images, each
as its stage runs it:

- **whole**: ``mine_split`` on a local dask cluster of ``--workers`` processes (its start-up
  included, as a stage run pays it) then ``prune_split``: the CRFs and the rule;
- **rule**: ``prune_split`` again after a threshold change (``cam_quantile`` 0.6 -> 0.7): the
  rule alone on the kept maps, in this process.

Both write masks, checked equal to the rule's on the CRF marginals (``prune_image``) for the
new threshold. Also printed: the disk the crf stage's stores take per image (the CRF labels and
the maps, zarr chunks and metadata as written).

Datasets: synthetic images of ``--size`` pixels (VOC's are about 500x375) with fake CAMs from
their ground truth (as in ``bench/prune.py``), and, where ``--msrc`` names the shared MSRC-v2
folder, its training photos (about 320x240) with fake CAMs from their masks.

With the project installed (``pip install -e .``)::

    python bench/rule.py --images 48 --size 500 --msrc ../shared/data/msrc
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import load_average
from prune import PARAMS, SPLIT, fake_cams, kept, make_dataset

from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.data.folder import build_folder
from pipeline.data.manifest import Manifest
from pipeline.method.mining import mine_split, prune_split
from pipeline.method.prune import prune_image

CHANGED = replace(PARAMS, cam_quantile=0.7)
"""The threshold edit the rule is rerun for."""


def msrc_dataset(root: Path, folder: Path, count: int) -> tuple[Manifest, ImageStore]:
    """The first ``count`` MSRC-v2 training photos and a complete store of fake CAMs from their masks."""
    full = build_folder(folder / "images", folder / "labels.csv", folder / "masks",
                        (folder / "classes.txt").read_text().strip().split(","), "msrc")
    items = [item for item in full.split("train") if item.labels and item.has_mask][:count]
    manifest = replace(full, splits={SPLIT: tuple(items)})
    cams = ImageStore(root / "cams.zarr", stage="cams")
    cams.reset_unless("fake CAMs")
    for item in items:
        cams.write(item.id, fake_cams(manifest.read_mask(item), item.labels), classes=list(item.labels))
    cams.mark_complete(item.id for item in items)
    return manifest, cams


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def bench(name: str, manifest: Manifest, cams: ImageStore, root: Path, workers: int) -> dict[str, float]:
    """Seconds of the whole pruning and of a threshold rerun, their ratio, and the kept CRFs' bytes per image."""
    run = RunParams(workers=workers)
    masks = ImageStore(root / "masks.zarr", "prune")
    crf, maps = kept(masks)
    count = len(manifest.split(SPLIT))
    start = time.perf_counter()
    mine_split(manifest, SPLIT, cams, crf, maps, PARAMS, run, progress=False)
    prune_split(manifest, SPLIT, maps, masks, PARAMS, progress=False)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    rerun = prune_split(manifest, SPLIT, maps, masks, CHANGED, progress=False)
    rule = time.perf_counter() - start
    assert rerun.computed == sorted(item.id for item in manifest.split(SPLIT)), "the rule did not rerun every image"
    for item in manifest.split(SPLIT):
        image_cams, attrs = cams.read(item.id)
        expected = prune_image(manifest.read_image(item.id), image_cams.astype(np.float32),
                               np.array(attrs["classes"]), CHANGED)
        assert masks.read(item.id)[0].tobytes() == expected.tobytes(), f"{item.id}: not the rule's mask"
    kept_bytes = (folder_bytes(crf.path) + folder_bytes(maps.path)) / count
    sizes = {manifest.read_image(item.id).shape[:2] for item in manifest.split(SPLIT)[:8]}
    print(f"{name}, {count} images ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}...), {workers} workers: "
          f"whole pruning {whole:.2f} s ({whole / count * 1000:.0f} ms/img), threshold rerun {rule:.2f} s "
          f"({rule / count * 1000:.1f} ms/img): {whole / rule:.1f}x faster; crf stage's stores "
          f"{kept_bytes / 1024:.1f} KiB/img (labels {folder_bytes(crf.path) / count / 1024:.1f}, maps "
          f"{folder_bytes(maps.path) / count / 1024:.1f})")
    return {"whole_s": whole, "rule_s": rule, "ratio": whole / rule, "kept_kib_per_image": kept_bytes / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, action="append", help="synthetic image side (repeatable; default 500)")
    parser.add_argument("--msrc", type=Path, help="the MSRC-v2 folder (images/, masks/, labels.csv, classes.txt)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {load_average()} before the run")
    for size in args.size or [500]:
        with tempfile.TemporaryDirectory() as tmp:
            manifest, cams = make_dataset(Path(tmp), size, args.images)
            bench(f"synthetic {size}x{size}", manifest, cams, Path(tmp), args.workers)
    if args.msrc is not None:
        with tempfile.TemporaryDirectory() as tmp:
            manifest, cams = msrc_dataset(Path(tmp), args.msrc, args.images)
            bench("MSRC-v2 photos", manifest, cams, Path(tmp), args.workers)
    print(f"load average {load_average()} after the run")


if __name__ == "__main__":
    main()
