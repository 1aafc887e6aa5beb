"""Benchmark: a training step in channels-last memory layout against the default (contiguous) one.

The trained stages put their networks in channels-last layout before training
(``pipeline.train.loop.data_parallel``). For each backbone at its preset's crop, batch and output
stride, the classifier stage's network and the segment stage's (the classifier with the
segmentation head) take the same forward and backward pass and SGD step in both layouts,
alternately, side by side in one run; the median step of each and their ratio are printed.

    python bench/train_layout.py                       # both backbones, 6 steps each, twice
    python bench/train_layout.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import load_average

from pipeline.models import CAMNet, SegNet
from pipeline.train.classifier import ClassifierParams, build_classifier
from pipeline.train.segment import build_segnet

CASES = {
    # backbone: (crop, batch, output stride) of the preset that uses it
    "small": (96, 16, 8),  # the synthetic default
    "mobilenet_v2": (224, 8, 16),  # presets/msrc.yaml
}


def network(name: str, backbone: str) -> CAMNet | SegNet:
    """The ``classifier`` or ``segment`` stage's network on ``backbone``, 20 classes, built as the
    stage builds it (random weights: speed does not depend on them)."""
    params = ClassifierParams(backbone=backbone, output_stride=CASES[backbone][2], freeze_bn=backbone != "small")
    return build_classifier(params, 20) if name == "classifier" else build_segnet(params, 20, None)


def step_seconds(name: str, backbone: str, channels_last: bool, steps: int, device: torch.device) -> list[float]:
    """Seconds of each training step of a fresh network (the first, warming up, left out)."""
    crop, batch, _ = CASES[backbone]
    torch.manual_seed(0)
    net = network(name, backbone).to(device).train()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, crop, crop, device=device)
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
        for backbone, (crop, batch, _) in CASES.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for layout in times:
                    times[layout] += step_seconds(name, backbone, layout, args.steps, device)
            plain, last = (statistics.median(times[layout]) for layout in (False, True))
            print(f"{name:<12}{backbone:<14}{crop:>6}{batch:>7}{plain:>14.3f}{last:>17.3f}{last / plain:>8.2f}")


if __name__ == "__main__":
    main()
