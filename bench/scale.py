"""Benchmark: how the stages scale with the number of images.

For each count (default 400, 2,500 and 10,000 synthetic 96x96 training images, the benchmark's
default size), in a fresh folder: the synthetic images are generated (``data``), their CAMs
extracted into a store (``cams``: the small backbone, untrained: speed does not depend on the
weights; the stage's four scales with flips) and their reliable regions mined over a local dask
cluster of every core (``prune``: started and warmed up before the clock starts, as in
``bench/prune.py``); then ``rrm stats``' figures are computed over the mask store (``stats``),
and ``rrm gallery``'s page of the training split (``gallery``: every image scored and sorted, 48
rows drawn). A training stage's steps do not depend on the count; what does is its start, the
identity of the split it records (``identity``: each image's size and first 4 KB, see
``pipeline.core.provenance``), and the segment stage's inference over the split (``infer``: its
pseudo-labels, the network untrained, one pass and the dense CRF per image in a process per
core). ``dvc`` is DVC's own part of a ``dvc repro`` of cams and
prune: the two stages as dvc.yaml declares them (their outs' options read from it), with
commands that do nothing over the stores just written, so what is timed is DVC checking, hashing
and caching; the line after it gives that as a share of cams, prune and itself. Each step runs in
a fresh process, whose peak resident memory is reported with that of its largest child (a
DataLoader, dask worker or DVC); the files of each store are counted. The last column compares
the per-image cost with the first count's.

    python bench/scale.py                       # 400, 2,500, 10,000 images: about an hour on 2 cores
    python bench/scale.py --counts 400,2500 --steps data,cams,prune
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from common import in_fresh_process, load_average
from prune import on_cluster

from pipeline.core.provenance import dataset_identity
from pipeline.core.registry import CAMS, MASKS, PSEUDO
from pipeline.core.run import RunParams
from pipeline.core.stage import DatasetParams
from pipeline.core.store import ImageStore, StorageParams
from pipeline.data.manifest import load_manifest
from pipeline.data.synth import SynthParams, generate
from pipeline.inspection.gallery import gallery_html, image_rows, sort_rows
from pipeline.inspection.project import Project
from pipeline.inspection.stats import all_stats
from pipeline.method.cams import CamParams, extract_cams
from pipeline.method.crf import INFERENCE_CRF
from pipeline.method.tags import given_tags
from pipeline.models import CAMNet, SegNet, build_backbone, fold_batch_norms
from pipeline.train.predict import infer_split, segnet_probabilities

SPLIT = "train"
STEPS = ("data", "identity", "cams", "prune", "dvc", "stats", "gallery", "infer")
"""In the order they run."""
NEEDS = {"identity": {"data"}, "cams": {"data"}, "prune": {"cams"}, "dvc": {"cams", "prune"}, "stats": {"prune"},
         "gallery": {"prune"}, "infer": {"data"}}
"""What each step reads is written by these."""
PROJECT = Path(__file__).resolve().parent.parent
GALLERY_ROWS = 48


def make_images(root: Path, count: int) -> None:
    generate(SynthParams(train_images=count, val_images=0), root / "synth", root / "synth.json")


def make_cams(root: Path) -> None:
    torch.manual_seed(0)
    manifest = load_manifest(root / "synth.json")
    net = fold_batch_norms(CAMNet(build_backbone("small"), manifest.num_classes, freeze_bn=False).eval())
    store = ImageStore(root / "cams.zarr", stage="cams")
    store.reset_unless("bench")
    extract_cams(net.cams, manifest, SPLIT, store, CamParams(), torch.device("cpu"), run=RunParams(), progress=False)
    store.mark_complete(item.id for item in manifest.split(SPLIT))


def mine(root: Path) -> float:
    """Seconds of mining on a warm cluster (its start and warm-up left out, as bench/prune.py does)."""
    manifest = load_manifest(root / "synth.json")
    _, seconds = on_cluster(manifest, ImageStore(root / "cams.zarr"), ImageStore(root / "masks.zarr", "prune"),
                            os.cpu_count() or 1, RunParams().chunk_size)
    return seconds


def identity(root: Path) -> None:
    dataset_identity(load_manifest(root / "synth.json"), (SPLIT,))


def infer(root: Path) -> None:
    torch.manual_seed(0)
    manifest = load_manifest(root / "synth.json")
    net = SegNet(build_backbone("small"), manifest.num_classes, freeze_bn=False).eval()
    store = ImageStore(root / PSEUDO.name, stage=PSEUDO.stage)
    store.reset_unless("bench")
    infer_split(segnet_probabilities(net), manifest, SPLIT, store, torch.device("cpu"), INFERENCE_CRF, RunParams(),
                given_tags(manifest, SPLIT), progress=False)


def project(root: Path) -> Project:
    return Project(load_manifest(root / "synth.json"), DatasetParams(str(root / "synth.json"), SPLIT, SPLIT),
                   StorageParams(artifacts=str(root)))


def stats(root: Path) -> None:
    all_stats(project(root))


def gallery(root: Path) -> None:
    scored = project(root)
    rows = sort_rows(list(image_rows(scored, "train")), "worst")
    (root / "gallery.html").write_text(gallery_html(scored, "train", rows[:GALLERY_ROWS], "scale"))


def store_outs(stage: str, store: str) -> dict:
    """The options (persist, cache) the project's dvc.yaml gives ``store`` as an out of ``stage``."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    wanted = f"artifacts/{store}"
    return next(out[wanted] for out in stages[stage]["outs"] if isinstance(out, dict) and wanted in out)


def dvc_repro(root: Path) -> None:
    """DVC's own time for the cams and prune stages over the finished stores (commands that do nothing)."""
    stages = {
        CAMS.stage: {"cmd": "true", "deps": ["synth.json"], "outs": [{CAMS.name: store_outs(CAMS.stage, CAMS.name)}]},
        MASKS.stage: {"cmd": "true", "deps": [CAMS.name], "outs": [{MASKS.name: store_outs(MASKS.stage, MASKS.name)}]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([*dvc, "repro", "-q"], cwd=root, check=True)


def files(store: Path) -> int:
    return sum(1 for path in store.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="400,2500,10000", help="image counts, comma-separated")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    args = parser.parse_args()
    wanted = [step for step in STEPS if step in args.steps.split(",")]
    if unknown := set(args.steps.split(",")) - set(STEPS):
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    for step in wanted:
        if missing := NEEDS.get(step, set()) - set(wanted):
            parser.error(f"the {step} step needs the {', '.join(sorted(missing))} step(s)")
    print(f"machine: {os.cpu_count()} cores, load average {load_average()} before the run")
    print(f"{'images':>7} {'step':<8} {'seconds':>8} {'ms/img':>8} {'main MB':>8} {'child MB':>8} "
          f"{'files':>7} {'ms/img vs first':>16}")
    first: dict[str, float] = {}
    for count in (int(text) for text in args.counts.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            steps = {"data": (make_images, (root, count), None), "identity": (identity, (root,), None),
                     "cams": (make_cams, (root,), CAMS.name), "prune": (mine, (root,), MASKS.name),
                     "dvc": (dvc_repro, (root,), None), "stats": (stats, (root,), None),
                     "gallery": (gallery, (root,), None), "infer": (infer, (root,), PSEUDO.name)}
            timed: dict[str, float] = {}
            for step in wanted:
                run, run_args, store = steps[step]
                result, seconds, main_mb, child_mb = in_fresh_process(run, *run_args)
                if step == "prune":
                    seconds = result
                timed[step] = seconds
                per_image = 1000 * seconds / count
                first.setdefault(step, per_image)
                stored = files(root / store) if store else ""
                print(f"{count:>7} {step:<8} {seconds:>8.1f} {per_image:>8.2f} {main_mb:>8.0f} {child_mb:>8.0f} "
                      f"{stored:>7} {per_image / first[step]:>15.2f}x", flush=True)
                if step == "dvc":
                    share = timed["dvc"] / (timed["cams"] + timed["prune"] + timed["dvc"])
                    print(f"{count:>7} DVC's own time: {100 * share:.1f} % of a dvc repro of cams and prune",
                          flush=True)
    print(f"load average {load_average()} after the run")


if __name__ == "__main__":
    main()
