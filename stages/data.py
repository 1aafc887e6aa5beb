"""Stage `data`: generate the synthetic benchmark (images, masks, manifest) and its statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.metrics import write_metrics
from pipeline.params import build_params, load_params, read_params_file
from pipeline.stage import run, stopwatch
from pipeline.store import StorageParams
from pipeline.synth import SynthParams, generate

METRICS = Path("metrics/data.json")
"""Under ``storage.root``, as every file a stage writes."""


def read_data_params(params_path: Path, overrides: dict[str, Any] | None = None) -> tuple[SynthParams, Path, Path]:
    """The `data:` section: where to write (``root``, ``manifest``) and the generator's settings."""
    section = dict(read_params_file(params_path).get("data") or {}) if params_path.is_file() else {}
    root = Path(section.pop("root", "data/synth"))
    manifest = Path(section.pop("manifest", "manifests/synth.json"))
    section.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_params(SynthParams, section, f"{params_path} [data]"), root, manifest


def main(params_path: Path) -> None:
    params, root, manifest_path = read_data_params(params_path)
    with stopwatch() as timing:
        _, stats = generate(params, root, manifest_path)
    write_metrics(load_params(StorageParams, "storage", params_path).file(METRICS), {**stats, **timing})


if __name__ == "__main__":
    run(main)
