"""Two versions of the masks compared: this run's stores against another folder of stores, a
git revision or a DVC experiment (``rrm diff``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.registry import DVC_ARTIFACTS
from pipeline.inspection.figures import image_figure
from pipeline.inspection.project import SOURCES, Project, Source
from pipeline.inspection.stats import MaskStats, percent, split_items, text_table
from pipeline.method.metrics import DIGITS


def revision_artifacts(rev: str, target: Path) -> Path:
    """Copy the mask stores of git revision or DVC experiment ``rev`` into ``target``, through DVC.

    Only stores that DVC cached at that revision can be read: the reliable masks must be there;
    another store that is not counts as not run.
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc.scm import RevError

    fs = DVCFileSystem(url=".", rev=rev)
    for src in SOURCES:
        path = (DVC_ARTIFACTS / src.store.name).as_posix()
        try:
            fs.get(path, str(target / src.store.name), recursive=True)
        except RevError:
            raise InputError(rev, "not a git revision or DVC experiment of this repository") from None
        except DvcException as error:
            raise InputError(rev, f"cannot read it through DVC ({error})") from None
        except FileNotFoundError as error:
            shutil.rmtree(target / src.store.name, ignore_errors=True)  # a part-copied store would look run
            if src.name == "reliable":
                raise InputError(rev, f"no DVC-cached masks at this revision ({path}: {error})") from None
    return target


def against_artifacts(against: str, workdir: Path) -> Path:
    """The folder of stores that ``--against`` names: a folder of stores (a copy of artifacts/),
    one store named as its original (e.g. a copy of masks.zarr), or else a revision."""
    path = Path(against)
    if not path.exists():
        return revision_artifacts(against, workdir)
    if not (path / "zarr.json").is_file():
        return path
    names = [src.store.name for src in SOURCES]
    if path.name not in names:
        raise InputError(path, f"a single store must keep its name ({', '.join(names)}); or name its folder")
    os.symlink(path.resolve(), workdir / path.name)
    return workdir


def version_label(against: str) -> str:
    """A short name of the ``--against`` version for titles: a revision as given, else the name of
    the folder of stores (of the folder holding a single store)."""
    path = Path(against)
    if not path.exists():
        return against
    path = path.resolve()
    return path.parent.name if (path / "zarr.json").is_file() else path.name


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose label differs (1 where the two masks differ in size)."""
    return 1.0 if a.shape != b.shape else float(np.mean(a != b))


def _difference(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``now - before`` for every number of two :meth:`MaskStats.as_dict` (None where either is None)."""
    out = {}
    for key, value in now.items():
        if isinstance(value, dict):
            out[key] = _difference(value, before[key])
        elif value is not None and before.get(key) is not None:
            out[key] = value - before[key] if isinstance(value, int) else round(value - before[key], DIGITS)
        else:
            out[key] = None
    return out


def _compare_source(project: Project, other: Project, src: Source) -> tuple[MaskStats, MaskStats, dict[str, float]]:
    """Both versions' stats over the images both hold, and each image's changed share; one pass."""
    mine, theirs = project.store(src), other.store(src)
    now, before = (MaskStats(project.manifest.num_classes + 1) for _ in range(2))
    shares = {}
    for item in split_items(project, src.store.role, None):
        if item.id not in mine or item.id not in theirs:
            continue
        gt = project.manifest.read_mask(item)
        mask, old = mine.read(item.id)[0], theirs.read(item.id)[0]
        now.update(mask, item.labels, gt)
        before.update(old, item.labels, gt)
        shares[item.id] = changed_share(mask, old)
    return now, before, shares


def compare(project: Project, other: Project, top: int) -> dict[str, Any]:
    """Per stage: the figures of both versions over the images both hold and their difference, how
    many images changed; and the ``top`` images whose masks changed most (largest share of pixels)."""
    result: dict[str, Any] = {"stages": {}, "most_changed": []}
    changes: dict[str, tuple[float, str]] = {}
    names = project.manifest.label_names
    for src in SOURCES:
        problem = project.problem(project.store(src))
        if problem is None and other.problem(other.store(src)) is not None:
            problem = f"not in the other version ({other.store(src).path})"
        if problem is not None:
            result["stages"][src.name] = {"status": problem}
            continue
        now_stats, before_stats, shares = _compare_source(project, other, src)
        for image_id, share in shares.items():
            changes[image_id] = max(changes.get(image_id, (0.0, "")), (share, src.name))
        now, before = now_stats.as_dict(names), before_stats.as_dict(names)
        result["stages"][src.name] = {"status": "ok", "images": len(shares),
                                      "changed_images": sum(share > 0 for share in shares.values()),
                                      "now": now, "before": before, "difference": _difference(now, before)}
    ranked = sorted(((share, name, image_id) for image_id, (share, name) in changes.items() if share > 0), reverse=True)
    result["most_changed"] = [{"id": i, "stage": name, "changed": round(share, 6)} for share, name, i in ranked[:top]]
    return result


def format_comparison(result: dict[str, Any], label: str) -> str:
    """:func:`compare` as text: per stage, each class's figures before and now."""
    blocks = []
    for name, entry in result["stages"].items():
        if entry["status"] != "ok":
            blocks.append(f"{name}: {entry['status']}")
            continue
        rows = []
        for cls, figures in [*entry["now"]["per_class"].items(), ("all", entry["now"])]:
            old = entry["before"]["per_class"][cls] if cls != "all" else entry["before"]
            iou = "iou" if cls != "all" else "miou"
            rows.append((cls, *(f"{percent(old[key])} -> {percent(figures[key])}"
                                for key in ("unreliable", "precision", "coverage", iou))))
        head = f"{name}: {entry['changed_images']} of {entry['images']} images changed ({label} -> now)"
        blocks.append("\n".join([head, *text_table(("class", "unreliable", "precision", "coverage", "IoU"), rows)]))
    changed = [f"  {row['id']}  {row['stage']}  {100 * row['changed']:.1f}% of pixels"
               for row in result["most_changed"]]
    blocks.append("\n".join(["most changed:", *changed]) if changed else "no mask changed")
    return "\n\n".join(blocks)


def write_comparison_figures(project: Project, other: Project, result: dict[str, Any], out: Path,
                             label: str) -> list[Path]:
    """The :func:`image_figure` of each most-changed image, the ``other`` version beside each mask."""
    paths = []
    for row in result["most_changed"]:
        figure, _ = image_figure(project, row["id"], against=other, against_label=label)
        path = out / f"{row['id']}.png"
        figure.save(path)
        paths.append(path)
    return paths


