"""What every stage entry point shares: argument handling, the one-line error, timing."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError
from pipeline.manifest import Manifest, load_manifest
from pipeline.params import PARAMS_FILE, load_params


def run(main: Callable[[Path], None]) -> None:
    """Run a stage's ``main(params_path)`` as ``python -m stages.<name> [params.yaml]``.

    Bad input ends the process with one line on stderr and exit status 2, not a traceback.
    """
    params_path = Path(sys.argv[1]) if len(sys.argv) > 1 else PARAMS_FILE
    try:
        main(params_path)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Measure the wall time of a block; the yielded dict gets ``seconds`` when it ends."""
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = round(time.perf_counter() - start, 2)


@dataclass(frozen=True)
class DatasetParams:
    """The `dataset:` section: which manifest every stage reads and which splits it uses."""

    manifest: str = "manifests/synth.json"
    train_split: str = "train"
    val_split: str = "val"


def load_dataset(params_path: Path) -> tuple[Manifest, DatasetParams]:
    """The manifest named by the `dataset:` section, checked to have both splits."""
    params = load_params(DatasetParams, "dataset", params_path)
    manifest = load_manifest(params.manifest)
    for split in (params.train_split, params.val_split):
        manifest.split(split)
    return manifest, params
