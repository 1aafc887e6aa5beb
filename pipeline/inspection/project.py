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
from pipeline.core.registry import CAMS, ROLES, SHOWN, STORES, Checkpoint, Store
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


SOURCES = tuple(Source(store.shown, store, store.title) for store in SHOWN)
"""Every store of masks, in pipeline order (the registry's :data:`~pipeline.core.registry.SHOWN`)."""


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
        declared = next(s for s in STORES if s.name == store.path.name)
        given = self.params.get(declared.section) or {}
        try:
            found = {name: self.current(source) for name, source in declared.inputs}
        except InputError as error:  # an input the record names is gone (e.g. the weights)
            return f"cannot be checked ({error})"
        stated = {f"{declared.section}.{key}": value for key, value in given.items()}
        differs = stated_difference(store.made_from, stated, found)
        return None if differs is None else f"{differs} (rerun the {store.stage} stage)"

    def current(self, source: Checkpoint | Store) -> str | None:
        """What a record names an input by now: a network's digest, a store's fingerprint."""
        if isinstance(source, Checkpoint):
            return file_digest(self.storage.file(source.path))
        return self.storage.store(source).fingerprint

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


