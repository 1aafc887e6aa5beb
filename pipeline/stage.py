"""What every stage entry point shares: argument handling, the one-line error, timing."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError
from pipeline.manifest import Manifest, load_manifest
from pipeline.params import PARAMS_FILE, load_params


def run(main: Callable[..., None], *options: str) -> None:
    """Run a stage's ``main(params_path, **options)`` as
    ``python -m stages.<name> [params.yaml] [--option VALUE ...]``.

    ``options`` name the keyword arguments ``main`` takes from the command line (for instance
    ``scheduler``); one not given is not passed. Bad input ends the process with one line on
    stderr and exit status 2, not a traceback.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {main.__module__}", description=main.__doc__)
    parser.add_argument("params", nargs="?", type=Path, default=PARAMS_FILE, help="parameters file")
    for option in options:
        parser.add_argument(f"--{option.replace('_', '-')}", dest=option)
    arguments = vars(parser.parse_args())
    params_path = arguments.pop("params")
    try:
        main(params_path, **{name: value for name, value in arguments.items() if value is not None})
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
