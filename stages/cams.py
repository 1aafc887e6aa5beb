"""Stage `cams`: multi-scale CAMs of the train and val splits into cams.zarr (in `storage.artifacts`), and their score.

Under ``torchrun`` every process writes its own share of the images into the one store; rank 0
alone shows progress (its share), marks the store complete and writes the metrics.
"""

from __future__ import annotations

from pipeline.core.io import write_json
from pipeline.core.provenance import start
from pipeline.core.registry import CAMS, CAMS_CURVE, CLASSIFIER
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.method.cams import CamParams, cams_made_from, extract_cams, score_cams, warn_of_coarse_scales
from pipeline.models import fold_batch_norms
from pipeline.train.classifier import ClassifierParams, load_classifier


def body(ctx: Context) -> None:
    """Extract and score the CAMs of both splits; ``--skip-bad`` overrides ``dataset.skip_bad``."""
    manifest, params = ctx.manifest, ctx.params(CamParams, "cams")
    classifier = ctx.params(ClassifierParams, "classifier")
    weights = ctx.input(CLASSIFIER)
    net = fold_batch_norms(load_classifier(classifier, manifest.num_classes, weights)).to(ctx.device)
    store = ctx.output(CAMS)
    if ctx.dist.is_main:
        start(store, cams_made_from(manifest, ctx.splits, params, weights))
        warn_of_coarse_scales("cams.scales", manifest, ctx.dataset.train_split, params.scales, classifier.output_stride)
    ctx.dist.barrier()
    with stopwatch() as timing:
        for split in ctx.splits:
            extract_cams(net.cams, manifest, split, store, params, ctx.device, ctx.dist.rank, ctx.dist.world_size,
                         ctx.run, progress=ctx.dist.is_main, score_fn=net)
    ctx.dist.barrier()
    if not ctx.dist.is_main:
        return
    store.mark_complete(item.id for split in ctx.splits for item in manifest.split(split))
    val = score_cams(store, manifest, ctx.dataset.val_split, params.score_thresholds)
    train = score_cams(store, manifest, ctx.dataset.train_split, params.score_thresholds)
    scores = ("miou", "threshold", "iou", "scored_images")
    ctx.write_metrics({**{k: val[k] for k in scores}, "rejected": ctx.rejected,
                       "train": {k: train[k] for k in scores}, **timing})
    write_json(ctx.file(CAMS_CURVE.path), [{"threshold": p["threshold"], "val": p["miou"], "train": t["miou"]}
                                           for p, t in zip(val["curve"], train["curve"], strict=True)])


main = stage_main("cams", body)

if __name__ == "__main__":
    run("cams", main)
