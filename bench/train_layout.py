"""Benchmark: a training step in channels-last memory layout against the default (contiguous) one.

The trained stages put their networks in channels-last layout before training
(``pipeline.train.loop.data_parallel``). For each backbone at a stage's crop, batch and output
stride, the joint segmentation network (backbone, classifier and segmentation head: the segment
stage's network, the heaviest one) takes the same forward and backward pass and SGD step in both
layouts, alternately, side by side in one run; the median step of each and their ratio are printed.

    python bench/train_layout.py                       # both backbones, 6 steps each, twice
    python bench/train_layout.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import load_average

from pipeline.models import SegNet, build_backbone, seg_dilation

CASES = {
    # backbone: (crop, batch, output stride) of the preset that uses it
    "small": (96, 16, 8),  # the synthetic default
    "mobilenet_v2": (224, 8, 16),  # presets/msrc.yaml
}


def step_seconds(backbone: str, channels_last: bool, steps: int, device: torch.device) -> list[float]:
    """Seconds of each training step of a fresh network (the first, warming up, left out)."""
    crop, batch, stride = CASES[backbone]
    torch.manual_seed(0)
    net = SegNet(build_backbone(backbone, None, stride), 20, freeze_bn=backbone != "small",
                 dilation=seg_dilation(stride)).to(device).train()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, crop, crop, device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        output = net(images)
        loss = output.seg.float().mean() + output.logits.float().mean()
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
    print(f"{'backbone':<14}{'crop':>6}{'batch':>7}{'contiguous s':>14}{'channels-last s':>17}{'ratio':>8}")
    for backbone, (crop, batch, _) in CASES.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for layout in times:
                times[layout] += step_seconds(backbone, layout, args.steps, device)
        plain, last = (statistics.median(times[layout]) for layout in (False, True))
        print(f"{backbone:<14}{crop:>6}{batch:>7}{plain:>14.3f}{last:>17.3f}{last / plain:>8.2f}")


if __name__ == "__main__":
    main()
