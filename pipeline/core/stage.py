"""What every stage entry point shares: argument handling, the one-line error, timing."""

from __future__ import annotations

import argparse
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.errors import as_one_line
from pipeline.core.params import PARAMS_FILE, load_params
from pipeline.core.store import StorageParams
from pipeline.data.manifest import Manifest, check_disjoint, load_manifest
from pipeline.data.screen import screen_splits


def _is_flag(hint: Any) -> bool:
    """Whether a keyword of type ``hint`` (``bool`` or ``bool | None``) is a flag on the command line."""
    return hint is bool or bool in typing.get_args(hint)


def run(main: Callable[..., None], *options: str) -> None:
    """Run a stage's ``main(params_path, **options)`` as
    ``python -m stages.<name> [params.yaml] [--option VALUE ...] [--flag ...]``.

    ``options`` name the keyword arguments ``main`` takes from the command line (for instance
    ``scheduler``); one typed ``bool`` is a flag that passes True (``--skip-bad``). One not given
    is not passed, so it does not override ``params.yaml``. Bad input, a refused permission and
    Ctrl-C end the process with one line on stderr, not a traceback (see :func:`as_one_line`).
    """
    parser = argparse.ArgumentParser(prog=f"python -m {main.__module__}", description=main.__doc__)
    parser.add_argument("params", nargs="?", type=Path, default=PARAMS_FILE, help="parameters file")
    hints = typing.get_type_hints(main)
    for option in options:
        name = f"--{option.replace('_', '-')}"
        if _is_flag(hints[option]):
            parser.add_argument(name, dest=option, action="store_const", const=True)
        else:
            parser.add_argument(name, dest=option)
    arguments = vars(parser.parse_args())
    params_path = arguments.pop("params")
    as_one_line(lambda: main(params_path, **{name: value for name, value in arguments.items() if value is not None}))


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Measure the wall time of a block; the yielded dict gets ``seconds`` when it ends."""
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = round(time.perf_counter() - start, 2)


REJECTS = Path("rejects")
"""Folder of the stages' rejects files, ``rejects/<stage>.json`` under ``storage.root`` (see
:mod:`pipeline.data.screen`)."""


@dataclass(frozen=True)
class DatasetParams:
    """The `dataset:` section: which manifest every stage reads and which splits it uses.

    ``skip_bad``: leave out the images (or masks) that do not decode, listed in
    ``rejects/<stage>.json``, instead of stopping at the first one.
    """

    manifest: str = "manifests/synth.json"
    train_split: str = "train"
    val_split: str = "val"
    skip_bad: bool = False


def load_dataset(params_path: Path) -> tuple[Manifest, DatasetParams]:
    """The manifest named by the `dataset:` section, checked to have both splits, with no image in both."""
    params = load_params(DatasetParams, "dataset", params_path)
    manifest = load_manifest(params.manifest)
    check_disjoint(manifest, params.train_split, params.val_split)
    return manifest, params


def screened_dataset(
    params_path: Path, stage: str, skip_bad: bool | None = None
) -> tuple[Manifest, DatasetParams, int]:
    """:func:`load_dataset` for a stage that reads the images: with ``skip_bad`` both splits are screened.

    ``skip_bad`` (the command-line flag) overrides ``dataset.skip_bad``. Screened, the manifest
    returned holds only the good items of the two splits and the bad ones are listed in
    ``rejects/<stage>.json`` (under ``storage.root``). Returns the manifest, the section and how
    many images were left out.
    """
    manifest, params = load_dataset(params_path)
    if skip_bad is not None:
        params = replace(params, skip_bad=skip_bad)
    if not params.skip_bad:
        return manifest, params, 0
    splits = (params.train_split, params.val_split)
    rejects_file = load_params(StorageParams, "storage", params_path).file(REJECTS / f"{stage}.json")
    screened, rejects = screen_splits(manifest, splits, rejects_file)
    return screened, params, len(rejects)
