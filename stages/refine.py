"""Stage `refine`: learn inter-pixel affinities on the classifier's backbone from the prune
stage's labels that `refine.labels` names (its two CRFs' labels or its reliable masks), walk the
training split's CAMs over them into dense pseudo-labels (refined.zarr in `storage.artifacts`),
and score those.

The classifier's weights, the CAM store and the labels are refused unless they were made from
the current dataset and settings. A killed run resumes: training from its last saved state, the
walk from the last image written.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.distributed import default_device, init_distributed
from pipeline.core.params import load_params
from pipeline.core.provenance import check, check_checkpoint, forget, start, write_record
from pipeline.core.registry import CAMS, CLASSIFIER_WEIGHTS, LABELS, REFINED, STAGES
from pipeline.core.run import load_run
from pipeline.core.stage import run, screened_dataset, stopwatch
from pipeline.core.store import StorageParams
from pipeline.method.cams import CamParams, cams_made_from
from pipeline.method.metrics import write_metrics
from pipeline.method.mining import MADE_FROM
from pipeline.method.prune import PruneParams
from pipeline.train.classifier import ClassifierParams, classifier_made_from
from pipeline.train.refine import (
    RefineParams,
    affinity_made_from,
    build_affinity_net,
    refine_split,
    refined_made_from,
    score_labels,
    train_affinity,
)

STAGE = STAGES["refine"]


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "refine", skip_bad)
    classifier = load_params(ClassifierParams, "classifier", params_path)
    params = load_params(RefineParams, "refine", params_path)
    storage = load_params(StorageParams, "storage", params_path)
    run_params = load_run(params_path)
    split, init = dataset.train_split, storage.file(CLASSIFIER_WEIGHTS)
    cams = storage.store(CAMS)
    check_checkpoint(init, classifier_made_from(manifest, split, classifier), manifest, "classifier")
    cams.require_complete()
    check(cams, cams_made_from(manifest, (split, dataset.val_split), load_params(CamParams, "cams", params_path),
                               init), manifest)
    labels = storage.store(LABELS[params.labels])
    labels.require_complete()
    check(labels, MADE_FROM[params.labels](manifest, split, load_params(PruneParams, "prune", params_path), cams),
          manifest)
    ctx = init_distributed()
    device = default_device(ctx)
    weights = storage.file(STAGE.weights)
    if ctx.is_main:
        forget(weights)
    net = build_affinity_net(classifier, manifest.num_classes, init, params)
    with stopwatch() as training:
        train_affinity(net, manifest, split, params, labels, weights, storage.file(STAGE.state), ctx, device,
                       run_params)
    if not ctx.is_main:
        return
    write_record(weights, affinity_made_from(manifest, split, params, init, labels))
    store = storage.store(REFINED)
    start(store, refined_made_from(manifest, split, params, weights, cams))
    with stopwatch() as walking:
        refine_split(net, manifest, split, cams, store, params, device, run_params)
    store.mark_complete(item.id for item in manifest.split(split))
    write_metrics(storage.file(STAGE.metrics_file), {**score_labels(store, manifest, split), "rejected": rejected,
                                                     "train_seconds": training["seconds"],
                                                     "walk_seconds": walking["seconds"],
                                                     "seconds": training["seconds"] + walking["seconds"]})


if __name__ == "__main__":
    run(main, "skip_bad")
