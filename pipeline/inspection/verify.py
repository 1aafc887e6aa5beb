"""`rrm verify`: read back every array of a run's stores and say which images are damaged or
missing, store by store; ``--repair`` deletes the damaged chunk files so that each owning stage
writes those images again on its next run.

A stage already passes over a chunk file that is gone, cut short or another array's (see
:mod:`pipeline.core.store`); only decoding tells a file garbled past its header, so this command
decodes every array, in batches read concurrently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.core.registry import ROLES, STORES, Store
from pipeline.core.stage import REJECTS
from pipeline.inspection.project import Project

BATCH = 64
"""Arrays read at once: enough to keep zarr's event loop busy, few enough for a bounded memory."""


@dataclass(frozen=True)
class StoreCheck:
    """One store's verdict: ``status`` ``ok`` where it was read (then ``images`` were expected of
    it and ``problems`` holds those that are missing or damaged, ``(kind, why)`` by id), else why
    it was not (not run, switched off)."""

    store: Store
    location: str
    status: str
    images: int = 0
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[str]:
        return [image_id for image_id, (found, _) in self.problems.items() if found == kind]


def store_by_name(name: str) -> Store:
    """A store of the registry by its folder name, with or without ``.zarr``."""
    wanted = name if name.endswith(".zarr") else f"{name}.zarr"
    for store in STORES:
        if store.name == wanted:
            return store
    raise ValueError(f"no store {name!r}; the stores are {', '.join(store.name for store in STORES)}")


def expected_ids(project: Project, store: Store) -> list[str]:
    """The ids ``store``'s stage writes: its split (both for a store of both), less the images the
    stage left out as bad (its rejects file)."""
    roles = ROLES if store.role is None else (store.role,)
    ids = [item.id for role in roles for item in project.manifest.split(project.split(role))]
    rejects = project.storage.file(REJECTS / f"{store.stage}.json")
    left_out = {entry["id"] for entry in json.loads(rejects.read_text())} if rejects.is_file() else set()
    return [image_id for image_id in ids if image_id not in left_out]


def check_store(project: Project, store: Store, progress: bool = True) -> StoreCheck:
    """Read back every array ``store``'s stage must have written (see :func:`expected_ids`)."""
    opened = project.storage.store(store)
    location = str(opened.path)
    if not opened.exists():
        return StoreCheck(store, location, f"not run (has the {store.stage} stage run?)")
    if opened.is_empty():
        return StoreCheck(store, location, f"empty (is the {store.stage} stage switched off?)")
    ids = expected_ids(project, store)
    problems: dict[str, tuple[str, str]] = {}
    with tqdm(total=len(ids), desc=f"verify {store.name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH]
            problems.update(opened.check(batch))
            bar.update(len(batch))
    return StoreCheck(store, location, "ok", len(ids), problems)


def repair(project: Project, checks: Sequence[StoreCheck]) -> int:
    """Delete the chunk file of every damaged image of ``checks``; how many were deleted."""
    removed = 0
    for check in checks:
        opened = project.storage.store(check.store)
        for image_id in check.of_kind("damaged"):
            opened.remove_chunk(image_id)
            removed += 1
    return removed


def format_checks(checks: Sequence[StoreCheck], shown: int = 10) -> str:
    """One line per store (how many images it holds whole, damaged, missing), then up to
    ``shown`` of its bad images with why, and what to rerun."""
    lines = []
    for check in checks:
        if check.status != "ok":
            lines.append(f"{check.store.name}: {check.status}")
            continue
        damaged, missing = check.of_kind("damaged"), check.of_kind("missing")
        whole = check.images - len(check.problems)
        lines.append(f"{check.store.name}: {whole} of {check.images} images whole, {len(damaged)} damaged, "
                     f"{len(missing)} missing ({check.location})")
        for image_id in list(check.problems)[:shown]:
            kind, why = check.problems[image_id]
            lines.append(f"  {kind} {image_id}: {why}")
        if len(check.problems) > shown:
            lines.append(f"  ... and {len(check.problems) - shown} more")
        if check.problems:
            first = "`rrm verify --repair`, then " if damaged else ""
            lines.append(f"  to mend: {first}rerun the {check.store.stage} stage (`dvc repro {check.store.stage}`)")
    return "\n".join(lines)
