"""Benchmark: a training step in channels-last memory layout against the default (contiguous) one.

The trained stages put their networks in channels-last layout before training
(``pipeline.train.loop.data_parallel``). For each backbone at its recipe's crop, batch and output
stride (the `classifier:` sections of ``params.yaml``, the synthetic default, and of
``presets/msrc.yaml``), the classifier stage's network and the segment stage's (the classifier
with the segmentation head) take the same forward and backward pass and SGD step in both
layouts, alternately, side by side in one run; the median step of each and their ratio are
printed.

    python bench/train_layout.py                       # both backbones, 6 steps each, twice
    python bench/train_layout.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import load_average

from pipeline.core.params import load_params
from pipeline.models import CAMNet, SegNet
from pipeline.train.classifier import ClassifierParams, build_classifier
from pipeline.train.segnet import build_segnet

ROOT = Path(__file__).resolve().parents[1]
RECIPES = (ROOT / "params.yaml", ROOT / "presets" / "msrc.yaml")
"""The params files whose `classifier:` recipes are timed: one backbone each."""


def cases() -> dict[str, ClassifierParams]:
    """Each backbone's `classifier:` recipe (crop, batch, output stride, frozen batch norms), less
    its initial weights: speed does not depend on them."""
    recipes = (load_params(ClassifierParams, "classifier", path) for path in RECIPES)
    return {params.backbone: replace(params, weights=None, checkpoint=None) for params in recipes}


def network(name: str, params: ClassifierParams) -> CAMNet | SegNet:
    """The ``classifier`` or ``segment`` stage's network of ``params``, 20 classes, built as the
    stage builds it."""
    return build_classifier(params, 20) if name == "classifier" else build_segnet(params, 20, None)


def step_seconds(name: str, params: ClassifierParams, channels_last: bool, steps: int,
                 device: torch.device) -> list[float]:
    """Seconds of each training step of a fresh network (the first, warming up, left out)."""
    torch.manual_seed(0)
    net = network(name, params).to(device).train()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    images = torch.randn(params.batch_size, 3, params.crop_size, params.crop_size, device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        output = net(images)
        logits = output if name == "classifier" else output.seg
        loss = logits.float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two layouts")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, load average {load_average()}")
    print(f"{'network':<12}{'backbone':<14}{'crop':>6}{'batch':>7}{'contiguous s':>14}{'channels-last s':>17}"
          f"{'ratio':>8}")
    for name in ("classifier", "segment"):
        for backbone, params in cases().items():
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for layout in times:
                    times[layout] += step_seconds(name, params, layout, args.steps, device)
            plain, last = (statistics.median(times[layout]) for layout in (False, True))
            print(f"{name:<12}{backbone:<14}{params.crop_size:>6}{params.batch_size:>7}{plain:>14.3f}"
                  f"{last:>17.3f}{last / plain:>8.2f}")


if __name__ == "__main__":
    main()
