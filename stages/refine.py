"""Stage `refine`: learn inter-pixel affinities on the classifier's backbone from the prune
stage's labels that `refine.labels` names (its two CRFs' labels or its reliable masks), walk the
training split's CAMs over them into dense pseudo-labels (refined.zarr in `storage.artifacts`)
that keep those labels' foreground (`refine.keep`), with their edges set on the image's by a
dense CRF (`refine.crf`), and score those.

A killed run resumes: training from its last saved state, the walk from the last image written.
With `refine.bg_threshold: auto` every image's walk is kept beside the training state until the
threshold is chosen and the labels are written, so that the split is walked once and a killed run
resumes there too; a rerun over finished labels reads the threshold they were made with.
"""

from __future__ import annotations

import shutil

from pipeline.core.provenance import forget, start, write_record
from pipeline.core.registry import CAMS, CLASSIFIER, REFINE_LABELS, REFINED
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.core.store import ImageStore
from pipeline.train.affinity import (
    build_affinity_net,
    chosen_threshold,
    refine_split,
    score_labels,
    train_affinity,
    walk_split,
)
from pipeline.train.classifier import ClassifierParams
from pipeline.train.refine import RefineParams, affinity_made_from, refined_made_from

WALKS = "refine_walks.zarr"
"""The walks of ``bg_threshold: auto``, in the folder of the training state, removed once the labels are written."""


def body(ctx: Context) -> None:
    """Train the affinities, walk and score the refined labels; ``--skip-bad`` overrides
    ``dataset.skip_bad``."""
    manifest, split = ctx.manifest, ctx.dataset.train_split
    params = ctx.params(RefineParams, "refine")
    init, cams = ctx.input(CLASSIFIER), ctx.input(CAMS)
    labels = ctx.labels(REFINE_LABELS, params.labels)
    weights = ctx.file(ctx.stage.weights)
    if ctx.dist.is_main:
        forget(weights)
    net = build_affinity_net(ctx.params(ClassifierParams, "classifier"), manifest.num_classes, init, params)
    with stopwatch() as training:
        train_affinity(net, manifest, split, params, labels, init, weights, ctx.file(ctx.stage.state), ctx.dist,
                       ctx.device, ctx.run)
    if not ctx.dist.is_main:
        return
    write_record(weights, affinity_made_from(manifest, split, params, init, labels))
    store = ctx.output(REFINED)
    start(store, refined_made_from(manifest, split, params, weights, cams, labels))
    ids = [item.id for item in manifest.split(split)]
    walks = None
    with stopwatch() as walking:
        threshold = None if isinstance(params.bg_threshold, str) else params.bg_threshold
        if params.chooses_threshold and store.is_complete():
            threshold = store.read(ids[0])[1]["bg_threshold"]
        elif params.chooses_threshold:
            walks = ImageStore(ctx.file(ctx.stage.state).with_name(WALKS))
            walks.reset_unless(store.fingerprint)
            walk_split(net, manifest, split, cams, walks, params, ctx.device, ctx.run)
            threshold = chosen_threshold(walks, ids)
        refine_split(net, manifest, split, cams, labels, store, params, threshold, ctx.device, ctx.run, walks=walks)
    store.mark_complete(ids)
    if walks is not None:
        shutil.rmtree(walks.path, ignore_errors=True)
    ctx.write_metrics({**score_labels(store, manifest, split), "bg_threshold": threshold, "rejected": ctx.rejected,
                       "train_seconds": training["seconds"], "walk_seconds": walking["seconds"],
                       "seconds": training["seconds"] + walking["seconds"]})


main = stage_main("refine", body)

if __name__ == "__main__":
    run("refine", main)
