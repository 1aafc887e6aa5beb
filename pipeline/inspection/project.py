"""A project as inspection reads it: its manifest, its splits and its stores, each store checked
before it is read (run, complete, made from these images and, with a params file, these settings).

Everything in :mod:`pipeline.inspection` reads the stores one image at a time (an array and its
ground truth, then the next), so it runs on masks for any number of images in the memory of one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.io import file_digest
from pipeline.core.params import load_params, read_params_file
from pipeline.core.provenance import dataset_identity, same_dataset, stated_difference
from pipeline.core.registry import (
    CAMS,
    CLASSIFIER_WEIGHTS,
    DEEPLAB,
    MASKS,
    PSEUDO,
    REFINED,
    ROLES,
    SEGMENT,
    STAGES,
    STORES,
    SUPERVISED,
    Store,
)
from pipeline.core.stage import DatasetParams, load_dataset
from pipeline.core.store import ImageStore, StorageParams
from pipeline.data.manifest import Item, Manifest


@dataclass(frozen=True)
class Source:
    """One stage's masks as inspection shows them: a short name, the registry's store and its
    panel title."""

    name: str
    store: Store
    title: str


SOURCES = (
    Source("reliable", MASKS, "reliable"),
    Source("refined", REFINED, "refined"),
    Source("pseudo", PSEUDO, "segment"),
    Source("segment", SEGMENT, "segment"),
    Source("deeplab", DEEPLAB, "deeplab"),
    Source("supervised", SUPERVISED, "supervised"),
)
"""Every store of masks, in pipeline order."""


@dataclass(frozen=True)
class Project:
    """Where to read: the manifest, the dataset's splits and the folder of stores; with
    ``params``, the sections of the params file whose settings each store must have been made
    with."""

    manifest: Manifest
    dataset: DatasetParams
    storage: StorageParams = field(default_factory=StorageParams)
    params: Mapping[str, Any] | None = None
    identities: dict[tuple[str, ...], str] = field(default_factory=dict, compare=False, repr=False)
    """A memo of :meth:`identity`: a command reads each image's head once, not once per store."""

    def store(self, source: Source) -> ImageStore:
        return self.storage.store(source.store)

    def cams(self) -> ImageStore:
        return self.storage.store(CAMS)

    def with_artifacts(self, folder: str | Path) -> Project:
        """The same project reading the stores in another local folder: another version, made
        with other settings (no params file to hold them to), from the same images."""
        return replace(self, storage=StorageParams(artifacts=str(folder)), params=None)

    def identity(self, splits: tuple[str, ...]) -> str:
        """The :func:`~pipeline.core.provenance.dataset_identity` of ``splits``, computed once."""
        if splits not in self.identities:
            self.identities[splits] = dataset_identity(self.manifest, splits)
        return self.identities[splits]

    def problem(self, store: ImageStore) -> str | None:
        """Why ``store`` cannot be read as this project's (see :func:`store_problem`), or None.
        With a params file, a store's record is held to it as far as it states it (see
        :func:`~pipeline.core.provenance.stated_difference`)."""
        problem = store_problem(store, self.manifest, self.identity)
        if problem is not None or store.made_from is None or self.params is None:
            return problem
        section, inputs = next(s.section for s in STORES if s.name == store.path.name), RECORDED[store.path.name]
        given = self.params.get(section) or {}
        try:
            found = {name: make(self) for name, make in inputs.items()}
        except InputError as error:  # an input the record names is gone (e.g. the weights)
            return f"cannot be checked ({error})"
        differs = stated_difference(store.made_from, {f"{section}.{key}": value for key, value in given.items()},
                                    found)
        return None if differs is None else f"{differs} (rerun the {store.stage} stage)"

    def split(self, role: str) -> str:
        """The dataset's split name for a role, ``train`` or ``val``."""
        return self.dataset.train_split if role == "train" else self.dataset.val_split

    def find(self, image_id: str) -> tuple[str, Item]:
        """The role (``train`` or ``val``) and item of an image id; an unknown id names the manifest."""
        for role in ROLES:
            for item in self.manifest.split(self.split(role)):
                if item.id == image_id:
                    return role, item
        splits = f"{self.split('train')!r} or {self.split('val')!r}"
        raise InputError(self.manifest.source or self.manifest.name, f"no image id {image_id!r} in split {splits}")


def _digest(path: Path) -> Callable[[Project], str]:
    return lambda project: file_digest(project.storage.file(path))


RECORDED: dict[str, dict[str, Callable[[Project], str | None]]] = {
    CAMS.name: {"classifier": _digest(CLASSIFIER_WEIGHTS)},
    MASKS.name: {"cams.zarr": lambda project: project.cams().fingerprint},
    REFINED.name: {"weights": _digest(STAGES["refine"].weights),
                   "cams.zarr": lambda project: project.cams().fingerprint},
    **{store.name: {"weights": _digest(STAGES[store.stage].weights)}
       for store in (PSEUDO, SEGMENT, DEEPLAB, SUPERVISED)},
}
"""Per store: how to find now each input its record names (as the stage that writes it names them)."""


def open_project(params_path: str | Path, artifacts: str | Path | None = None) -> Project:
    """The project of a params file: its `dataset:` and `storage:` sections; ``artifacts``, a
    folder of stores, overrides ``storage.artifacts``."""
    manifest, dataset = load_dataset(Path(params_path))
    project = Project(manifest, dataset, load_params(StorageParams, "storage", params_path),
                      read_params_file(params_path))
    return project if artifacts is None else project.with_artifacts(artifacts)


def store_problem(store: ImageStore, manifest: Manifest,
                  identity: Callable[[tuple[str, ...]], str] | None = None) -> str | None:
    """Why a store cannot be read (not run, cut short, switched off, made from other images or
    tags than ``manifest`` lists), or None if it can. An image whose data is gone is an error
    when it is read."""
    if not store.exists():
        return f"not run (has the {store.stage} stage run?)"
    if not store.is_complete():
        return f"incomplete (rerun the {store.stage} stage)"
    if store.is_empty():
        return f"empty (the {store.stage} stage wrote no masks: is it switched off?)"
    other = same_dataset(store.made_from, manifest, identity)
    return None if other is None else f"{other} (rerun the {store.stage} stage)"


