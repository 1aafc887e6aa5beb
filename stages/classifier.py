"""Stage `classifier`: train the multi-label classifier; write its weights, with the record of
what they were trained from beside them, and its validation mAP."""

from __future__ import annotations

from pipeline.core.provenance import forget, write_record
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.train.classifier import ClassifierParams, classifier_made_from, evaluate_classifier, train_classifier


def body(ctx: Context) -> None:
    """Train and score the classifier; ``--skip-bad`` overrides ``dataset.skip_bad``."""
    manifest, params, train_split = ctx.manifest, ctx.params(ClassifierParams, "classifier"), ctx.dataset.train_split
    weights = ctx.file(ctx.stage.weights)
    made = classifier_made_from(manifest, train_split, params)
    if ctx.dist.is_main:
        forget(weights)
    with stopwatch() as timing:
        net = train_classifier(manifest, train_split, params, weights, ctx.file(ctx.stage.state), ctx.dist,
                               ctx.device, ctx.run)
    if ctx.dist.is_main:
        write_record(weights, made)
        scores = evaluate_classifier(net, manifest, ctx.dataset.val_split, ctx.device,
                                     ctx.run.loader_processes(ctx.device))
        ctx.write_metrics({**scores, "rejected": ctx.rejected, **timing})


main = stage_main("classifier", body)

if __name__ == "__main__":
    run("classifier", main)
