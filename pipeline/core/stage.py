"""The runner of the stages: what every stage's body gets (:class:`Context`), the command line, the
one-line error, timing.

A stage's script is its body over a :class:`Context`, declared in :mod:`pipeline.core.registry`;
``main = stage_main("cams", body)`` makes it a function of a params file and the stage's
options, which ``python -m stages.cams``, ``rrm stage cams`` and the tests call. The context reads
the params file once, screens the dataset where the stage reads images, and hands out the
stage's inputs checked by the function their producer registered (no stage rebuilds another's
record) and its outputs; an input or output the declaration does not name is refused, so that
dvc.yaml, generated from the declarations, cannot leave one out.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.core.errors import as_one_line
from pipeline.core.params import PARAMS_FILE, load_params
from pipeline.core.provenance import MadeFrom, check, check_checkpoint
from pipeline.core.registry import STAGES, Checkpoint, Labels, Stage, Store, label_name
from pipeline.core.run import RunParams, load_run
from pipeline.core.store import ImageStore, StorageParams
from pipeline.data.manifest import Manifest, check_disjoint, load_manifest
from pipeline.data.screen import screen_splits
from pipeline.method.metrics import write_metrics

if TYPE_CHECKING:
    import torch

    from pipeline.core.distributed import Distributed

T = TypeVar("T")

OPTIONS: Mapping[str, str] = {
    "skip_bad": "leave out the images (or masks) that do not decode, listed in rejects/<stage>.json, "
                "instead of stopping at the first (overrides dataset.skip_bad)",
    "scheduler": "address of a running dask scheduler (overrides run.scheduler)",
}
"""The stages' command-line options (a stage's declaration names those it takes); ``skip_bad`` is
a flag."""


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


@dataclass
class Context:
    """What a stage's body works with: the params file (``params(cls, section)``), the dataset
    (read on first use, screened where the stage takes ``--skip-bad``: ``rejected`` images left
    out), where the run writes (``storage``, ``file``), how it runs (``run``, ``dist``,
    ``device``), its checked inputs (:meth:`input`, :meth:`labels`), its outputs
    (:meth:`output`) and metrics."""

    stage: Stage
    params_path: Path
    storage: StorageParams
    run: RunParams
    skip_bad: bool | None = None
    _sections: dict[tuple[type, str], Any] = field(default_factory=dict, repr=False)

    @cached_property
    def _dataset(self) -> tuple[Manifest, DatasetParams, int]:
        if "skip_bad" in self.stage.options:
            return screened_dataset(self.params_path, self.stage.name, self.skip_bad)
        return (*load_dataset(self.params_path), 0)

    @property
    def manifest(self) -> Manifest:
        return self._dataset[0]

    @property
    def dataset(self) -> DatasetParams:
        return self._dataset[1]

    @property
    def rejected(self) -> int:
        """How many images screening left out."""
        return self._dataset[2]

    @property
    def splits(self) -> tuple[str, str]:
        return self.dataset.train_split, self.dataset.val_split

    def params(self, cls: type[T], section: str) -> T:
        """The params file's ``section`` as ``cls`` (read once)."""
        if (cls, section) not in self._sections:
            self._sections[cls, section] = load_params(cls, section, self.params_path)
        return self._sections[cls, section]

    def file(self, relative: str | Path) -> Path:
        """Where the run keeps ``relative`` (under ``storage.root``)."""
        return self.storage.file(relative)

    @cached_property
    def dist(self) -> Distributed:
        """This process's place in a ``torchrun`` job (joined on first use)."""
        from pipeline.core.distributed import init_distributed
        return init_distributed()

    @cached_property
    def device(self) -> torch.device:
        from pipeline.core.distributed import default_device
        return default_device(self.dist)

    def expected(self, produced: Store | Checkpoint) -> MadeFrom:
        """The record ``produced`` must hold now, by the function its producer registered."""
        module, function = produced.record.split(":")
        return getattr(importlib.import_module(module), function)(self)

    def input(self, read: Store | Checkpoint, checked: bool = True) -> Any:
        """An input the stage declares: a store (an :class:`ImageStore`) complete and made from
        what the params file says now, or a checkpoint's weights (a path) trained from it; else one
        line naming it and the stage to rerun. ``checked=False``: taken as it is (a store still
        complete)."""
        if not self._declares(read):
            raise LookupError(f"stage {self.stage.name!r} does not declare {read} among its reads")
        if isinstance(read, Checkpoint):
            if checked:
                check_checkpoint(self.file(read.path), self.expected(read), self.manifest, read.stage)
            return self.file(read.path)
        store = self.storage.store(read)
        store.require_complete()
        if checked:
            check(store, self.expected(read), self.manifest)
        return store

    def _declares(self, read: Store | Checkpoint) -> bool:
        """Whether the stage reads ``read`` and checks it (itself, or as one of a setting's choices)."""
        choices = (choice for item in self.stage.reads if isinstance(item, Labels) for choice in item.choices)
        return self.stage.checks and (read in self.stage.reads or read in choices)

    def labels(self, labels: Labels, name: str) -> ImageStore:
        """The store of training labels ``name`` that the setting ``labels`` chose, checked."""
        return self.input(next(store for store in labels.choices if label_name(store) == name))

    def output(self, store: Store) -> ImageStore:
        """A store the stage writes."""
        if store not in self.stage.stores:
            raise LookupError(f"stage {self.stage.name!r} does not declare {store.name} among its stores")
        return self.storage.store(store)

    def write_metrics(self, scores: Mapping[str, Any]) -> None:
        """Write ``scores`` to ``scores/<stage>.json`` and their headline to ``metrics/<stage>.json``."""
        write_metrics(self.file(self.stage.scores_file), scores)
        write_metrics(self.file(self.stage.metrics_file), headline(scores, self.stage.headline))


ALWAYS_HEADLINE = ("enabled", "seconds")
"""The keys of every stage's scores that its metrics file keeps, where the scores have them."""


def headline(scores: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The part of ``scores`` at ``keys`` (dotted paths) and :data:`ALWAYS_HEADLINE`, nested as in
    ``scores``, in their order there; a key the scores lack is left out::

        headline({"miou": 0.5, "iou": {...}, "train": {"miou": 0.6, "iou": {...}}, "seconds": 9.1},
                 ("miou", "train.miou"))  # {"miou": 0.5, "train": {"miou": 0.6}, "seconds": 9.1}
    """
    wanted = [tuple(key.split(".")) for key in (*keys, *ALWAYS_HEADLINE)]

    def kept(node: Mapping[str, Any], prefix: tuple[str, ...]) -> dict[str, Any]:
        out = {}
        for name, value in node.items():
            path = (*prefix, name)
            if path in wanted:
                out[name] = value
            elif isinstance(value, Mapping) and (inner := kept(value, path)):
                out[name] = inner
        return out

    return kept(scores, ())


def open_context(stage: Stage, params_path: Path, scheduler: str | None = None,
                 skip_bad: bool | None = None) -> Context:
    """The context of ``stage`` run with ``params_path`` and its command-line options."""
    run = load_run(params_path)
    if scheduler is not None:
        run = replace(run, scheduler=scheduler)
    return Context(stage, params_path, load_params(StorageParams, "storage", params_path), run, skip_bad)


Main = Callable[..., None]


def stage_main(name: str, body: Callable[[Context], None]) -> Main:
    """The function of a params file and the stage's options that runs ``body`` as stage ``name``."""
    stage = STAGES[name]

    def main(params_path: Path = PARAMS_FILE, **options: Any) -> None:
        unknown = set(options) - set(stage.options)
        if unknown:
            raise TypeError(f"stage {name!r} takes no option {', '.join(sorted(unknown))}")
        body(open_context(stage, Path(params_path), **options))

    main.__doc__ = body.__doc__
    main.__module__ = body.__module__
    return main


def run(name: str, main: Main) -> None:
    """Run stage ``name``'s ``main`` as ``python -m stages.<name> [params.yaml] [--option ...]``,
    with the options its declaration names (``--skip-bad`` a flag). One not given is not passed,
    so it does not override ``params.yaml``. Bad input, a refused permission and Ctrl-C end the
    process with one line on stderr, not a traceback (see :func:`as_one_line`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {STAGES[name].module}", description=main.__doc__)
    parser.add_argument("params", nargs="?", type=Path, default=PARAMS_FILE, help="parameters file")
    for option in STAGES[name].options:
        flag = f"--{option.replace('_', '-')}"
        if option == "skip_bad":
            parser.add_argument(flag, dest=option, action="store_const", const=True, help=OPTIONS[option])
        else:
            parser.add_argument(flag, dest=option, help=OPTIONS[option])
    arguments = vars(parser.parse_args())
    params_path = arguments.pop("params")
    as_one_line(lambda: main(params_path, **{key: value for key, value in arguments.items() if value is not None}))
