"""Stage `data`: generate the synthetic benchmark (images, masks, manifest) and its statistics."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.params import load_params
from pipeline.core.registry import STAGES
from pipeline.core.stage import run, stopwatch
from pipeline.core.store import StorageParams
from pipeline.data.synth import generate, read_data_params
from pipeline.method.metrics import write_metrics


def main(params_path: Path) -> None:
    params, root, manifest_path = read_data_params(params_path)
    with stopwatch() as timing:
        _, stats = generate(params, root, manifest_path)
    storage = load_params(StorageParams, "storage", params_path)
    write_metrics(storage.file(STAGES["data"].metrics_file), {**stats, **timing})


if __name__ == "__main__":
    run(main)
