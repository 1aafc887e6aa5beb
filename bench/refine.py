"""Benchmark: the refine stage's random walk against a dense-matrix reference of the same walk.

On VOC-sized images (500x375 by default, a grid of 125x94 cells at the refine stage's stride 4),
with affinities from random features through the stage's own functions, so no network is
needed. Measured, over the same images, one image at a time:

- the walk as the stage runs it (:func:`pipeline.method.affinity.random_walk`): the transition
  weights kept as one map per neighbour offset, ``2 ** log_steps`` steps of a weighted mean
  over the radius;
- the reference: the same transition matrix as a dense ``(hw, hw)`` matrix
  (:func:`~pipeline.method.affinity.dense_transition`), the maps multiplied by it as many
  times, as PSA and IRN hold it (they square it instead, which costs a matrix product of
  ``(hw)^3`` per squaring).

Both give the same maps (the largest difference is printed). Printed: images per second of
each and their ratio, and the memory each holds for one image's transition (the weights
against the dense matrix). With ``--device cuda`` both run on the GPU.

With the project installed (``pip install -e .``)::

    python bench/refine.py --images 3
    python bench/refine.py --images 20 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from common import load_average

from pipeline.method.affinity import (
    AFFINITIES,
    PairFn,
    dense_transition,
    grid_size,
    random_walk,
    transition_weights,
)
from pipeline.train.refine import RefineParams

PARAMS = RefineParams()
"""The stage's defaults: stride, radius, beta, walk length and kind of affinity."""


def dense_walk(maps: torch.Tensor, weights: torch.Tensor, radius: int, steps: int) -> torch.Tensor:
    """The reference: (K, hw) maps times the dense transition matrix, ``steps`` times."""
    matrix = dense_transition(weights, radius)
    flat = maps.reshape(maps.shape[0], -1)
    for _ in range(steps):
        flat = flat @ matrix.T
    return flat.reshape(maps.shape)


def walk(maps: torch.Tensor, features: torch.Tensor, pairs: PairFn) -> torch.Tensor:
    """The stage's walk of (N, K, h, w) maps over the affinities of ``features``, weights included."""
    return random_walk(maps, transition_weights(features, PARAMS.radius, PARAMS.beta, pairs), PARAMS.radius,
                       PARAMS.walk_steps)


def _timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3, help="images walked by each")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--classes", type=int, default=2, help="tags per image: the walk carries these and background")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = grid_size((args.height, args.width), PARAMS.stride)
    channels, pairs = AFFINITIES[PARAMS.affinity]
    print(f"{args.images} images of {args.width}x{args.height}: grid {size[1]}x{size[0]} at stride {PARAMS.stride}, "
          f"radius {PARAMS.radius}, {PARAMS.walk_steps} steps, {PARAMS.affinity} affinities, {args.device}; "
          f"load {load_average()}")
    generator = torch.Generator().manual_seed(0)
    times = {"walk": 0.0, "dense": 0.0}
    difference = 0.0
    for _ in range(args.images):
        maps = torch.rand(1, args.classes + 1, *size, generator=generator).to(device)
        features = torch.randn(1, channels, *size, generator=generator).to(device)
        with torch.inference_mode():
            walked, seconds = _timed(partial(walk, maps, features, pairs), device)
            times["walk"] += seconds
            weights = transition_weights(features, PARAMS.radius, PARAMS.beta, pairs)[0]
            reference, seconds = _timed(partial(dense_walk, maps[0], weights, PARAMS.radius, PARAMS.walk_steps),
                                        device)
            times["dense"] += seconds
        difference = max(difference, float((walked[0] - reference).abs().max()))
    cells = size[0] * size[1]
    for name, seconds in times.items():
        print(f"  {name:5s} {args.images / seconds:8.3f} images/s")
    print(f"  walk / dense: {times['dense'] / times['walk']:.1f}x the images per second")
    weights_mb = weights.numel() * weights.element_size() / 2**20
    print(f"  memory per image's transition: {weights_mb:.1f} MB of weights against {cells**2 * 4 / 2**20:.0f} MB "
          f"dense ({cells} cells); largest difference {difference:.2e}")


if __name__ == "__main__":
    main()
