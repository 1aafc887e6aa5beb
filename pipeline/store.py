"""Per-image artifact stores: one zarr v3 group, one array per image named by its image id.

CAMs are float16 ``(k, H, W)`` with the present class indices in ``attrs["classes"]``; masks are
uint8 ``(H, W)``. Every stage reads and writes them through :class:`ImageStore`.

Safe against a kill at any moment: zarr's local store writes each file through a temporary file
and a rename, and an array's data is written before its ``complete`` attribute, which is set
last. An array without it (a write that was cut short) counts as absent and is replaced by the
next write of that id.

Safe for several processes writing their own ids into one store at once: in zarr v3 an array
lives in its own folder with its own ``zarr.json``; creating it only adds the parent group's
``zarr.json`` if that is missing (an exclusive create, never a rewrite), and listing the members
reads the folder, so no metadata file is shared between writers. Consolidated metadata is never
used.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import ArrayNotFoundError, ContainsGroupError

from pipeline.errors import InputError

COMPLETE = "complete"
"""Attribute set last on every array: its presence means the array was written in full. On the
store's group it means every image the stage had to write is there."""

FINGERPRINT = "fingerprint"
"""Group attribute: digest of the settings and inputs the store's arrays were made from."""

COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
"""Fast, and byte shuffling suits smooth float16 maps."""


class ImageStore:
    """A zarr v3 store of one array per image id.

    ``stage`` names the stage that writes the store, for the hint in error messages.
    """

    def __init__(self, path: str | Path, stage: str | None = None) -> None:
        self.path = Path(path)
        self.stage = stage

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r})"

    def write(self, image_id: str, array: np.ndarray, **attrs: Any) -> None:
        """Write ``array`` (kept in its dtype, one chunk) under ``image_id`` with ``attrs``.

        Replaces an existing array of that id. The array counts as present only once this returns.
        """
        _check_id(self.path, image_id)
        array = np.asarray(array)
        node = self._group_for_writing().create_array(
            image_id,
            shape=array.shape,
            dtype=array.dtype,
            chunks=tuple(max(1, n) for n in array.shape),
            compressors=COMPRESSOR,
            attributes=attrs,
            overwrite=True,
        )
        node[...] = array
        node.update_attributes({COMPLETE: True})

    def read(self, image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The array of ``image_id`` and the attributes it was written with."""
        if not self.exists():
            raise InputError(self.path, f"store not found{self._hint('has the {} stage run?')}")
        node = self._open(image_id)
        if node is None:
            raise InputError(self.path, f"no image {image_id!r}{self._hint('has the {} stage run?')}")
        attrs = node.attrs.asdict()
        if not attrs.pop(COMPLETE, False):
            raise InputError(
                self.path, f"image {image_id!r} was not written in full{self._hint('rerun the {} stage')}"
            )
        return node[...], attrs

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def ids(self) -> list[str]:
        """Ids of every array in the store, complete or not, sorted; none if the store does not exist."""
        if not self.exists():
            return []
        return sorted(zarr.open_group(self.path, mode="r").array_keys())

    def complete_ids(self) -> list[str]:
        """Ids of the arrays written in full, sorted."""
        if not self.exists():
            return []
        members = zarr.open_group(self.path, mode="r").arrays()
        return sorted(name for name, node in members if node.attrs.get(COMPLETE, False))

    def __contains__(self, image_id: object) -> bool:
        """Whether ``image_id`` was written in full."""
        node = self._open(image_id) if isinstance(image_id, str) else None
        return node is not None and bool(node.attrs.get(COMPLETE, False))

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint the store was started with (None without a store)."""
        return zarr.open_group(self.path, mode="r").attrs.get(FINGERPRINT) if self.exists() else None

    def reset_unless(self, fingerprint: str) -> bool:
        """Keep the store only if it was started with ``fingerprint``; else start it anew, empty.

        A stage calls this once, from one process, before writing: arrays made with other
        settings are never mixed with new ones, while a rerun with the same settings keeps what
        an interrupted run finished. Returns whether the existing arrays were kept.
        """
        if self.fingerprint == fingerprint:
            return True
        if self.path.exists():
            shutil.rmtree(self.path)
        zarr.open_group(self.path, mode="w", attributes={FINGERPRINT: fingerprint})
        return False

    def mark_complete(self, expected: Iterable[str]) -> None:
        """Record that the store holds every id in ``expected`` in full (checked; set last, once)."""
        missing = sorted(set(expected) - set(self.complete_ids()))
        if missing:
            raise InputError(self.path, f"{len(missing)} image(s) missing, e.g. {missing[0]!r}; not marked complete")
        zarr.open_group(self.path, mode="r+").attrs.update({COMPLETE: True})

    def is_complete(self) -> bool:
        return self.exists() and bool(zarr.open_group(self.path, mode="r").attrs.get(COMPLETE, False))

    def require_complete(self) -> None:
        """Raise naming the store unless its stage finished writing it."""
        if not self.is_complete():
            raise InputError(self.path, f"incomplete store{self._hint('rerun the {} stage')}")

    def _group_for_writing(self) -> zarr.Group:
        try:
            return zarr.open_group(self.path, mode="a")
        except ContainsGroupError:  # another process created the store between the check and the create
            return zarr.open_group(self.path, mode="r+")

    def _open(self, image_id: str) -> zarr.Array | None:
        try:
            return zarr.open_array(self.path, path=image_id, mode="r")
        except (ArrayNotFoundError, FileNotFoundError):
            return None

    def _hint(self, template: str) -> str:
        """`` (template with the stage name)``, or nothing for a store of no named stage."""
        return "" if self.stage is None else f" ({template.format(self.stage)})"


def _check_id(path: Path, image_id: str) -> None:
    """Ids become zarr node names: no '/', not empty, no leading '__' (reserved by zarr), not '.'/'..'."""
    if not image_id or "/" in image_id or image_id.startswith("__") or image_id in (".", ".."):
        raise InputError(path, f"image id {image_id!r} cannot name an array")
