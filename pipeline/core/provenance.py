"""What a store was made from, recorded in it and checked by whatever reads it.

Every stage records in each store it starts, and beside each checkpoint it trains
(``classifier.pth`` -> ``classifier.json``), what the store's arrays or the weights are made from
(:class:`MadeFrom`): the identity of the dataset's images and tags (:func:`dataset_identity`),
the method settings of the params file (``section.key``), and the fingerprints of its inputs (a
checkpoint's digest, another store's fingerprint). The store's fingerprint is the digest of that
record, so a stage that owns the store redoes it when anything differs. The record names the
code too: the digest of the project files the writing stage runs (:func:`code_identity`, the
files dvc.yaml lists as its code), so that a stage DVC reruns after an edit to its code makes its
stores and its training anew instead of resuming what the earlier code began. A stage or command that
only reads a store checks its record against the current manifest and params file and refuses
in one line naming what differs: another dataset, a setting changed since, an input remade.
Outside DVC too (``rrm stage``, ``rrm show``).

How a stage runs (the `run:` section, :mod:`pipeline.core.run`) is never recorded, nor are the
few fields of a section that change what a stage reports but no store (:data:`UNRECORDED`):
changing them keeps finished stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

from upath import UPath

from pipeline.core.dvcfile import ROOT, stage_code
from pipeline.core.errors import InputError
from pipeline.core.io import file_digest, fingerprint, write_json
from pipeline.core.registry import STAGES
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Manifest, load_manifest

UNRECORDED = frozenset({"score_thresholds", "enabled"})
"""Fields of a section that no store depends on: the thresholds a score is searched over, and
whether an optional stage runs at all (a disabled one writes an empty store of its own)."""


def settings(section: str, params: Any) -> dict[str, Any]:
    """A params dataclass as ``{"section.key": value}``, its :data:`UNRECORDED` fields left out, values
    as JSON has them (tuples as lists), so that a record read back compares equal."""
    return {f"{section}.{f.name}": _plain(getattr(params, f.name)) for f in dataclasses.fields(params)
            if f.name not in UNRECORDED}


def _plain(value: Any) -> Any:
    return [_plain(item) for item in value] if isinstance(value, (tuple, list)) else value


HEAD_BYTES = 4096
"""How much of each image file its identity reads (beside its size)."""


def _file_stats(folder: Path | UPath, names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """``{file name: (size, digest of its first HEAD_BYTES)}`` of the named files of a folder;
    files that do not exist are left out. Neither changes when a file is copied, checked out,
    touched or uploaded, as modification times and ETags do, so a dataset and its copy in a
    bucket have one identity. In a bucket the sizes come from one listing and the heads from one
    batch of ranged reads (concurrent where the filesystem is asynchronous, as s3fs is)."""
    if isinstance(folder, UPath):
        if not folder.exists():
            return {}
        sizes = {Path(entry["name"]).name: entry.get("size") for entry in folder.fs.ls(folder.path, detail=True)}
        present = [name for name in names if name in sizes]
        heads = folder.fs.cat_ranges([(folder / name).path for name in present], 0, HEAD_BYTES, on_error="return")
        return {name: (sizes[name], hashlib.sha256(head).hexdigest()) for name, head in zip(present, heads)
                if isinstance(head, bytes)}
    stats = {}
    for name in names:
        try:
            with open(folder / name, "rb") as handle:
                stats[name] = (os.fstat(handle.fileno()).st_size, hashlib.sha256(handle.read(HEAD_BYTES)).hexdigest())
        except OSError:
            continue
    return stats


def dataset_identity(manifest: Manifest, splits: Iterable[str]) -> str:
    """A digest of the images and tags of ``splits``: the class names, each image's id and tags,
    and its file's size and content stamp (see :func:`_file_stats`). Another image under the same id, a retagged
    image, another class list: another identity. Ground-truth masks are not part of it (they
    only score; what trains on them adds :func:`masks_identity`).

    It is the identity of what the manifest file lists, read again from ``manifest.source``
    where there is one: screening (``--skip-bad``) leaves items out of the manifest a stage
    holds, and the stages and commands that do not screen must find the same identity.
    """
    if manifest.source is not None:
        manifest = load_manifest(manifest.source)
    splits = tuple(splits)
    images = _stats_by_id(manifest.image_dir, manifest.image_suffix,
                          [item.id for name in splits for item in manifest.split(name)])
    return fingerprint(manifest.classes, [
        (name, [(item.id, item.labels, images.get(item.id)) for item in manifest.split(name)])
        for name in splits])


def masks_identity(manifest: Manifest, split: str) -> str:
    """A digest of the ground-truth masks of ``split`` (each image's id and its mask file's size
    and content stamp), for what trains on them: a mask redrawn under the same name, another
    identity. Read again from ``manifest.source``, as :func:`dataset_identity` is."""
    if manifest.source is not None:
        manifest = load_manifest(manifest.source)
    ids = [item.id for item in manifest.split(split)]
    drawn = _stats_by_id(manifest.mask_dir, manifest.mask_suffix, ids) if manifest.mask_dir is not None else {}
    return fingerprint([(image_id, drawn.get(image_id)) for image_id in ids])


def _stats_by_id(folder: Path | UPath, suffix: str, ids: Sequence[str]) -> dict[str, tuple[int, str]]:
    """:func:`_file_stats` of the files ``<id><suffix>`` of ``folder``, by id."""
    stats = _file_stats(folder, [f"{image_id}{suffix}" for image_id in ids])
    return {image_id: stats[f"{image_id}{suffix}"] for image_id in ids if f"{image_id}{suffix}" in stats}


@cache
def code_identity(stage: str) -> str:
    """A digest of the project files ``stage`` runs (its script's import closure, as dvc.yaml lists
    them, :func:`pipeline.core.dvcfile.stage_code`), by their paths and contents."""
    files = sorted(stage_code(STAGES[stage]))
    return fingerprint([(path.relative_to(ROOT).as_posix(), file_digest(path)) for path in files])


@dataclass(frozen=True)
class MadeFrom:
    """What a store is made from: ``dataset``, the :func:`dataset_identity` of ``splits``;
    ``settings``, ``{"section.key": value}`` (see :func:`settings`); ``inputs``, ``{name: digest}``;
    ``code``, the :func:`code_identity` of the stage that makes it."""

    dataset: str
    splits: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, str | None] = field(default_factory=dict)
    code: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "splits": list(self.splits), "settings": dict(self.settings),
                "inputs": dict(self.inputs), "code": self.code}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.as_json())

    @classmethod
    def made(cls, stage: str, manifest: Manifest, splits: Sequence[str], settings: Mapping[str, Any] | None = None,
             inputs: Mapping[str, str | None] | None = None) -> MadeFrom:
        """The record of a store the stage ``stage`` makes now from ``manifest``'s ``splits``."""
        return cls(dataset_identity(manifest, splits), tuple(splits), dict(settings or {}), dict(inputs or {}),
                   code_identity(stage))


def difference(recorded: Mapping[str, Any] | None, expected: MadeFrom, manifest: Manifest) -> str | None:
    """What differs between a store's record and what it should be made from now, in words; None
    if nothing does."""
    if recorded is None:
        return "records nothing of what it was made from"
    if recorded.get("splits") != list(expected.splits) or recorded.get("dataset") != expected.dataset:
        return f"was made from other images or tags than those of {manifest.source or manifest.name}"
    now = expected.as_json()
    changed = _changed(recorded, now["settings"], now["inputs"],
                       set(recorded.get("settings", {})) | set(now["settings"]),
                       set(recorded.get("inputs", {})) | set(now["inputs"]))
    if changed is None and recorded.get("code") != expected.code:
        return "was made by another version of its stage's code"
    return changed


def stated_difference(recorded: Mapping[str, Any], stated: Mapping[str, Any],
                      inputs: Mapping[str, str | None]) -> str | None:
    """:func:`difference` beyond the dataset (see :func:`same_dataset`) as far as a params file
    states it without the stages' code: each setting the file gives explicitly (``stated``,
    ``{"section.key": value}``) and the ``inputs``. A setting left to its default is not
    compared (the default lives in the stage's code, which a command that only looks at the
    stores does not load)."""
    settings = {key: _plain(value) for key, value in stated.items()}
    return _changed(recorded, settings, inputs, set(settings) & set(recorded.get("settings", {})), set(inputs))


def _changed(recorded: Mapping[str, Any], settings: Mapping[str, Any], inputs: Mapping[str, str | None],
             setting_keys: set[str], input_keys: set[str]) -> str | None:
    """The first of ``setting_keys``, then of ``input_keys``, whose recorded value is not the
    current one (``settings``, ``inputs``; absent: None), in words; None if none."""
    was = recorded.get("settings", {})
    for key in sorted(setting_keys):
        if was.get(key) != settings.get(key):
            return f"was made with {key}={was.get(key)!r}, the params file has {settings.get(key)!r}"
    was = recorded.get("inputs", {})
    for key in sorted(input_keys):
        if was.get(key) != inputs.get(key):
            return f"was made from another {key}"
    return None


def same_dataset(recorded: Mapping[str, Any] | None, manifest: Manifest,
                 identity: Callable[[tuple[str, ...]], str] | None = None) -> str | None:
    """:func:`difference` in the dataset alone, for inspection, which reads stores of any
    settings: what differs, or None. A store without a record (written by hand, or by an
    earlier version of this project) has nothing to check and is read as it is. ``identity``
    gives the :func:`dataset_identity` of some splits (a caller's memo of it)."""
    if recorded is None:
        return None
    splits = tuple(recorded.get("splits", []))
    identity = identity or partial(dataset_identity, manifest)
    if not all(name in manifest.splits for name in splits) or recorded.get("dataset") != identity(splits):
        return f"was made from other images or tags than those of {manifest.source or manifest.name}"
    return None


def start(store: ImageStore, made: MadeFrom) -> bool:
    """Start ``store`` with ``made`` recorded, keeping what it holds if it was started with the
    same record (see :meth:`~pipeline.core.store.ImageStore.reset_unless`); whether it kept it."""
    return store.reset_unless(made.fingerprint, made.as_json())


def check(store: ImageStore, expected: MadeFrom, manifest: Manifest) -> None:
    """Raise naming ``store`` unless it was made from ``expected``; the hint names the stage to rerun."""
    _refuse(store.path, difference(store.made_from, expected, manifest), store.stage)


def record_file(checkpoint: Path) -> Path:
    """Where a checkpoint's record lives: beside it, ``classifier.pth`` -> ``classifier.json``."""
    return checkpoint.with_suffix(".json")


def forget(checkpoint: Path) -> None:
    """Remove a checkpoint's record before its stage trains anew: a run cut short then leaves
    weights that record nothing, never weights with another run's record."""
    record_file(checkpoint).unlink(missing_ok=True)


def write_record(checkpoint: Path, made: MadeFrom) -> None:
    """Record beside ``checkpoint`` (once its weights are written) what it was trained from."""
    write_json(record_file(checkpoint), made.as_json())


def check_checkpoint(checkpoint: Path, expected: MadeFrom, manifest: Manifest, stage: str) -> None:
    """Raise naming ``checkpoint`` unless its record says it was made from ``expected``."""
    record = record_file(checkpoint)
    recorded = json.loads(record.read_text()) if record.is_file() else None
    _refuse(checkpoint, difference(recorded, expected, manifest), stage)


def _refuse(where: Path | UPath, problem: str | None, stage: str | None) -> None:
    if problem is not None:
        raise InputError(where, f"{problem} (rerun the {stage} stage)")
