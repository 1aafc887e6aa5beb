"""Benchmark: the cost of one `segment.mode: end_to_end` step at VOC size, by part, and what
20,000 steps (RRM's schedule) cost at that rate.

One step of the paper's recipe on a batch of 4 crops of 321 (synthetic images, 20 classes,
ResNet-38 by default): the training forward pass, the miner's other scales (0.5, 1.5, 2.0,
without gradient) fused on its grid, the pruning rule's two dense CRFs per crop in ``--workers``
processes, and the losses' backward pass (cross-entropy, the dense energy at half resolution,
the classification loss) with the optimiser step. Each part is timed apart, ``--steps`` times
after a warm-up (the best kept), and the projection is their sum times 20,000.

    python bench/end_to_end.py                          # ResNet-38 on this CPU: minutes
    python bench/end_to_end.py --backbone small --crop 96 --steps 1   # seconds
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from common import load_average
from dense_energy import make_batch, timed

from pipeline.method.losses import segmentation_ce
from pipeline.method.prune import PruneParams
from pipeline.models import SegNet, build_backbone, param_groups
from pipeline.train.miner import Miner, fused_cams, running_statistics_kept
from pipeline.train.segment import SegmentParams
from pipeline.train.segnet import upsample

REFERENCE_STEPS = 20_000
"""RRM's `train_from_cls_weight.py` schedule."""
CLASSES = 20
PARAMS = SegmentParams()
"""The dense energy's and the miner's defaults (the paper's)."""
SCALES = PARAMS.mining_scales


def best_seconds(run: Callable[[], Any], steps: int) -> float:
    """The least wall seconds of ``steps`` runs of ``run`` after a warm-up run."""
    return min(wall for wall, _ in timed(run, steps)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet38")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed runs of each part (after a warm-up)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CRF processes of the miner")
    parser.add_argument("--threads", type=int, help="torch threads (its default if not given)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load {load_average()}")

    torch.manual_seed(0)
    net = SegNet(build_backbone(args.backbone), CLASSES, freeze_bn=True).train()
    optimizer = torch.optim.SGD(param_groups(net, 7e-4, 1e-5), lr=7e-4, momentum=1e-5)
    rgb, _, valid, _ = make_batch(args.crop)
    rgb, valid = rgb[: args.batch], valid[: args.batch]
    images = (rgb / 255 - 0.45) / 0.225
    tags = torch.zeros(args.batch, CLASSES)
    tags[:, :2] = 1
    batch = {"image": images, "rgb": rgb.to(torch.uint8), "labels": tags}
    energy = replace(PARAMS, crop_size=args.crop).energy()
    miner = Miner(PruneParams(), SCALES, args.workers, torch.device("cpu"))
    try:
        output = net(images)
        with torch.no_grad(), running_statistics_kept(net):
            maps = upsample(fused_cams(net.cams, images, output.cams, SCALES), (args.crop, args.crop))
        labels = miner._prune(maps, batch)

        def forward() -> Any:
            return net(images)

        def other_scales() -> None:
            with torch.no_grad(), running_statistics_kept(net):
                fused_cams(net.cams, images, output.cams, SCALES)

        def crfs() -> None:
            miner._prune(maps, batch)

        def backward() -> None:
            result = net(images)
            seg = upsample(result.seg, (args.crop, args.crop))
            loss = (segmentation_ce(seg, labels) + energy(rgb, seg.softmax(1), valid, labels)
                    + F.multilabel_soft_margin_loss(result.logits, tags))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        parts = {"forward": best_seconds(forward, args.steps),
                 "other scales (no gradient)": best_seconds(other_scales, args.steps),
                 f"dense CRFs ({2 * args.batch} in {args.workers} processes)": best_seconds(crfs, args.steps),
                 "forward + losses + backward + step": best_seconds(backward, args.steps)}
    finally:
        miner.close()
    step = sum(seconds for name, seconds in parts.items() if name != "forward")
    print(f"{args.backbone}, batch {args.batch} of {args.crop}x{args.crop}, scales {SCALES}:")
    for name, seconds in parts.items():
        share = "" if name == "forward" else f" ({100 * seconds / step:.0f}% of a step)"
        print(f"  {name}: {seconds:.2f} s{share}")
    print(f"  one step: {step:.2f} s; {REFERENCE_STEPS} steps: {step * REFERENCE_STEPS / 3600:.1f} hours "
          f"({step * REFERENCE_STEPS / 86400:.1f} days); load {load_average()}")


if __name__ == "__main__":
    main()
