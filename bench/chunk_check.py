"""Benchmark: what telling a damaged chunk costs a stage that resumes, against reading its store
back.

A stage that reruns lists the images its store already holds whole (``complete_ids``) and writes
the others. Whole means written in full, and the chunk file there and not damaged: its size and
its first 16 bytes (the blosc header) must agree with the array. Measured side by side on the
same store:

- **existence**: the check a store made before damage was told, the chunk file's presence alone
  (one ``stat`` per image);
- **header**: ``complete_ids`` as it is now, one small read per image;
- **decode**: reading every array back (``read_many``), what catching damage by decoding on the
  happy path would cost, and what ``rrm verify`` does.

Stores: ``--images`` masks (uint8, blocks) and CAMs (float16, 3 smooth maps) of ``--size`` pixels square,
written once into a temporary folder; each figure is the best of ``--repeat`` runs (a warm page
cache, as a rerun right after a run finds it).

With the project installed (``pip install -e .``)::

    python bench/chunk_check.py --images 1000 --size 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import load_average

from pipeline.core.store import ImageStore


def best_of(repeat: int, action: Callable[[], object]) -> float:
    """The fastest of ``repeat`` runs of ``action``, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def existence_only(store: ImageStore) -> list[str]:
    """``complete_ids`` with the chunk file's presence as the only test of its data."""
    group = store._group("r")
    return sorted(name for name, node in group.arrays()
                  if node.metadata.attributes.get("complete") and store._chunk_file(name, node).is_file())


def blocks(rng: np.random.Generator, size: int) -> np.ndarray:
    """A mask of 20x20-pixel blocks of 4 labels: it compresses as masks do."""
    cells = rng.integers(0, 4, (size // 20 + 1, size // 20 + 1), dtype=np.uint8)
    return np.kron(cells, np.ones((20, 20), dtype=np.uint8))[:size, :size]


def smooth_maps(rng: np.random.Generator, size: int) -> np.ndarray:
    """Three smooth maps in 0..1, float16, as CAMs are."""
    ramp = np.linspace(0, np.pi, size)
    return np.stack([np.outer(np.sin(ramp * k), np.cos(ramp * phase)) ** 2
                     for k, phase in rng.uniform(0.5, 2.0, (3, 2))]).astype(np.float16)


def measure(store: ImageStore, ids: list[str], repeat: int) -> tuple[float, float, float]:
    """Seconds of the three ways of telling which images are whole: existence, header, decode."""
    exists = best_of(repeat, lambda: existence_only(store))
    header = best_of(repeat, store.complete_ids)
    decode = best_of(repeat, lambda: [store.read_many(ids[i:i + 64]) for i in range(0, len(ids), 64)])
    return exists, header, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory() as folder:
        for name, make in (("masks", lambda: blocks(rng, args.size)), ("cams", lambda: smooth_maps(rng, args.size))):
            store = ImageStore(Path(folder) / f"{name}.zarr")
            store.reset_unless("bench")
            ids = [f"im{index:05d}" for index in range(args.images)]
            for start in range(0, len(ids), 64):
                store.write_many([(image_id, make(), {}) for image_id in ids[start:start + 64]])
            assert existence_only(store) == store.complete_ids() == ids
            exists, header, decode = measure(store, ids, args.repeat)
            per = 1000 / args.images
            print(f"{name} ({args.images} images of {args.size}x{args.size}): existence {exists:.2f} s "
                  f"({exists * per:.2f} ms/img), header {header:.2f} s ({header * per:.2f} ms/img, "
                  f"{header / exists:.2f}x existence), decode {decode:.2f} s ({decode * per:.2f} ms/img, "
                  f"{decode / header:.1f}x header)")


if __name__ == "__main__":
    main()
