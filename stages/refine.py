"""Stage `refine`: learn inter-pixel affinities on the classifier's backbone from the prune
stage's labels that `refine.labels` names (its two CRFs' labels or its reliable masks), walk the
training split's CAMs over them into dense pseudo-labels (refined.zarr in `storage.artifacts`)
that keep those labels' foreground (`refine.keep`), and score those.

A killed run resumes: training from its last saved state, the walk from the last image written.
"""

from __future__ import annotations

from pipeline.core.provenance import forget, start, write_record
from pipeline.core.registry import CAMS, CLASSIFIER, REFINE_LABELS, REFINED
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.train.affinity import background_threshold, build_affinity_net, refine_split, score_labels, train_affinity
from pipeline.train.classifier import ClassifierParams
from pipeline.train.refine import RefineParams, affinity_made_from, refined_made_from


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
        train_affinity(net, manifest, split, params, labels, weights, ctx.file(ctx.stage.state), ctx.dist, ctx.device,
                       ctx.run)
    if not ctx.dist.is_main:
        return
    write_record(weights, affinity_made_from(manifest, split, params, init, labels))
    store = ctx.output(REFINED)
    start(store, refined_made_from(manifest, split, params, weights, cams, labels))
    with stopwatch() as walking:
        threshold = background_threshold(net, manifest, split, cams, params, ctx.device, ctx.run)
        refine_split(net, manifest, split, cams, labels, store, params, threshold, ctx.device, ctx.run)
    store.mark_complete(item.id for item in manifest.split(split))
    ctx.write_metrics({**score_labels(store, manifest, split), "bg_threshold": threshold, "rejected": ctx.rejected,
                       "train_seconds": training["seconds"], "walk_seconds": walking["seconds"],
                       "seconds": training["seconds"] + walking["seconds"]})


main = stage_main("refine", body)

if __name__ == "__main__":
    run("refine", main)
