"""Per-image artifact stores: one zarr v3 group, one array per image named by its image id.

CAMs are float16 ``(k, H, W)`` with the present class indices in ``attrs["classes"]``; masks are
uint8 ``(H, W)``. Every stage reads and writes them through :class:`ImageStore`.

In a local folder an array's two files are made and read directly (:mod:`pipeline.core.chunkfile`,
the files zarr makes, byte for byte, without its per-array cost); zarr does the rest, and all of
it at an fsspec URL.

Safe against a kill at any moment: every file is written through a temporary file and a rename,
so a file is there whole or not at all. An array is present when its metadata carries the
``complete`` attribute and its one chunk file is there. A write replaces whatever was under the
id; in a local folder it writes the chunk, then the metadata, so a write cut short leaves a
folder without metadata, which zarr does not list and a rerun removes as debris; through zarr
(the metadata, ``complete`` in it, then the chunk) it leaves an array without its chunk, which
counts as absent and is replaced by the next write of that id. Every array keeps its chunk
file, even one all zeros (zarr would leave that out and read the fill value back), so an array
whose chunk file is gone (deleted, lost in a copy) counts as absent too: a rerun of its stage
writes it again, and reading it is an error, never an all-background mask.

A chunk file that is there but damaged (cut short by a full disk or an interrupted copy, garbled,
or another array's) counts as absent in the same way. Telling costs one small read per array,
not a decode: the file's blosc header must give the array's size in bytes and the file's own
length (:func:`chunk_problem`). Every chunk ends with a CRC-32C checksum, so bytes garbled past
the header fail when the array is decoded: a stage that reads its images back
(:meth:`ImageStore.read_whole`) writes such an image again, and any other read is an error that
names the file (``rrm verify`` decodes every array, :meth:`ImageStore.check`, and ``--repair``
deletes such files).

Safe for several processes writing their own ids into one store at once: in zarr v3 an array
lives in its own folder with its own ``zarr.json``; creating it only adds the parent group's
``zarr.json`` if that is missing (an exclusive create, never a rewrite), and listing the members
reads the folder, so no metadata file is shared between writers. Consolidated metadata is never
used.

A store may live at an fsspec URL (``s3://bucket/project/artifacts/cams.zarr``; install the
``s3`` extra), opened through zarr's ``FsspecStore``. The same guarantees hold there: every
object PUT to S3 is atomic (a reader sees the old object or the new one, never part of one) and
reads after a write see it, so an array whose ``zarr.json`` says ``complete`` and whose chunk
object is there is whole; there are no temporary files to clean up. A ``file://`` URL is a
local path.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from upath import UPath
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync
from zarr.errors import ArrayNotFoundError, ContainsGroupError
from zarr.storage import FsspecStore

from pipeline.core import chunkfile
from pipeline.core.chunkfile import BLOSC_HEADER, COMPLETE, chunk_problem, layout
from pipeline.core.errors import InputError
from pipeline.core.io import detached, location
from pipeline.core.registry import DVC_ARTIFACTS, Store

FINGERPRINT = "fingerprint"
"""Group attribute: digest of the settings and inputs the store's arrays were made from."""

MADE_FROM = "made_from"
"""Group attribute: the record of what the arrays were made from (see :mod:`pipeline.core.provenance`)."""


class DamagedImageError(InputError):
    """An image's array cannot be read back: its chunk file is gone, damaged or does not decode.
    Its stage writes it again on a rerun; ``rrm verify`` lists every such image."""


DECODE_ERRORS = (RuntimeError, ValueError, TypeError)
"""What decoding a damaged chunk raises: blosc's "error during decompression", a checksum or a
size that does not match."""


class ImageStore:
    """A zarr v3 store of one array per image id, in a local folder or at an fsspec URL.

    ``stage`` names the stage that writes the store, for the hint in error messages;
    ``storage_options`` are the fsspec options of a URL (see :func:`pipeline.core.io.location`).
    """

    def __init__(
        self, path: str | Path | UPath, stage: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self._location = location(path, storage_options)
        self.stage = stage

    @property
    def path(self) -> Path | UPath:
        """The store's folder or URL, detached (see :func:`pipeline.core.io.detached`): a store is
        read from forked DataLoader workers."""
        return detached(self._location)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r})"

    def write(self, image_id: str, array: np.ndarray, **attrs: Any) -> None:
        """Write ``array`` (kept in its dtype, one chunk) under ``image_id`` with ``attrs``.

        Replaces an existing array of that id. The array counts as present only once this returns.
        """
        self.write_many([(image_id, array, attrs)])

    def write_many(self, arrays: Sequence[tuple[str, np.ndarray, Mapping[str, Any]]]) -> None:
        """:meth:`write` of several ``(image_id, array, attrs)`` at once: in a local folder each
        directly (:mod:`pipeline.core.chunkfile`), elsewhere (and what that declines) through
        zarr, concurrently, one round trip to its event loop for all. Each array counts as
        present once its own write is done."""
        if not arrays:
            return
        for image_id, _, _ in arrays:
            _check_id(self.path, image_id)
        self._group_for_writing()
        local = isinstance(self._location, Path)
        rest = [(image_id, array, attrs) for image_id, array, attrs in arrays
                if not (local and chunkfile.write(self._location / image_id, array, attrs))]

        async def write(image_id: str, array: np.ndarray, attrs: Mapping[str, Any]) -> None:
            array = np.asarray(array)
            node = await zarr_async.create_array(self._root(), name=image_id, **layout(array),
                                                 attributes={**attrs, COMPLETE: True})
            await node.setitem(Ellipsis, array)

        if rest:
            sync(_gathered(write(*entry) for entry in rest))

    def read(self, image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The array of ``image_id`` and the attributes it was written with. An image not written
        in full is an :class:`InputError`; one whose chunk file is gone, damaged or does not
        decode a :class:`DamagedImageError`, naming the file."""
        return self.read_many([image_id])[0]

    def read_many(self, image_ids: Sequence[str]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """:meth:`read` of several ids at once, in the order given: in a local folder each
        directly, elsewhere (and where that fails, for zarr's own errors) through zarr,
        concurrently."""
        if not image_ids:
            return []
        self._require_store()

        async def read(image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
            node = await self._open_async(image_id)
            attrs = self._checked(image_id, node)
            try:
                return await node.getitem(Ellipsis), attrs
            except DECODE_ERRORS as error:
                raise self._undecodable(image_id, node, error) from None

        found = self._read_each(image_ids, read)
        return [found[image_id] for image_id in image_ids]

    def check(self, image_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """What is wrong with each of ``image_ids`` that cannot be read back, decoding every array
        (concurrently): ``(kind, why)``, ``kind`` ``"missing"`` (never written, or not in full)
        or ``"damaged"`` (its chunk file gone, damaged or undecodable). The others are left out."""
        if not self.exists():
            return {image_id: ("missing", "no store") for image_id in image_ids}

        async def check(image_id: str) -> tuple[str, str] | None:
            node = await self._open_async(image_id)
            if node is None or not node.metadata.attributes.get(COMPLETE, False):
                return "missing", "not written" if node is None else "not written in full"
            gone = self._gone(image_id, node)
            if gone is not None:  # counts as not written, as in a stage
                return "missing", gone
            problem = self._chunk_problem(image_id, node)
            if problem is not None:
                return "damaged", problem
            try:
                await node.getitem(Ellipsis)
            except DECODE_ERRORS as error:
                return "damaged", self._decode_problem(image_id, node, error)
            return None

        found = sync(_gathered(check(image_id) for image_id in image_ids))
        return {image_id: problem for image_id, problem in zip(image_ids, found, strict=True) if problem is not None}

    def remove_chunk(self, image_id: str) -> None:
        """Delete the chunk file of ``image_id``'s array (a damaged one): the array then counts as
        absent and its stage writes it again."""
        node = self._open(image_id)
        if node is not None and node.nchunks:
            path = self._chunk_file(image_id, node)
            if path.exists():
                path.unlink()

    def read_whole(self, image_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """The arrays and attributes of those of ``image_ids`` that are whole and decode (read as
        :meth:`read_many` reads): what a stage that reads its own images back keeps. It writes
        the others again, those garbled past their header included, which it learns of here at
        no cost of its own (the read is the one it makes anyway)."""
        if not self.exists():
            return {}

        async def read(image_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
            node = await self._open_async(image_id)
            if node is None or not self._is_whole(image_id, node):
                return None
            try:
                array = await node.getitem(Ellipsis)
            except DECODE_ERRORS:
                return None
            return array, _attributes(node)

        found = self._read_each(image_ids, read)
        return {image_id: found[image_id] for image_id in image_ids if found[image_id] is not None}

    def _read_each(self, image_ids: Sequence[str], through_zarr: Callable[[str], Awaitable[Any]]) -> dict[str, Any]:
        """Each of ``image_ids`` read: ``(array, attributes)`` where :func:`chunkfile.read` reads
        it whole in a local folder, else what ``through_zarr`` makes of it (all those
        concurrently, one round trip to zarr's event loop)."""
        local = isinstance(self._location, Path)
        found: dict[str, Any] = {}
        for image_id in image_ids:
            got = chunkfile.read(self._location / image_id) if local else None
            if got is not None:
                found[image_id] = got[0], _without_complete(got[1])
        rest = [image_id for image_id in image_ids if image_id not in found]
        if rest:
            found |= dict(zip(rest, sync(_gathered(through_zarr(image_id) for image_id in rest)), strict=True))
        return found

    def _require_store(self) -> None:
        if not self.exists():
            raise InputError(self.path, f"store not found{self._hint('has the {} stage run?')}")

    def _checked(self, image_id: str, node: Any) -> dict[str, Any]:
        """The attributes of ``image_id``'s array ``node`` (None: none), refused unless it was
        written in full and its chunk file is there (one presence test: a reader learns of a
        damaged chunk when it decodes it, see :meth:`_undecodable`)."""
        if node is None:
            raise InputError(self.path, f"no image {image_id!r}{self._hint('has the {} stage run?')}")
        if not node.metadata.attributes.get(COMPLETE, False):
            raise InputError(
                self.path, f"image {image_id!r} was not written in full{self._hint('rerun the {} stage')}"
            )
        gone = self._gone(image_id, node)
        if gone is not None:
            raise DamagedImageError(self.path, f"image {image_id!r}: {gone}"
                                               f"{self._hint('rerun the {} stage to write it again')}")
        return _attributes(node)

    def _decode_problem(self, image_id: str, node: Any, error: Exception) -> str:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")
        return f"its chunk file {self._chunk_file(image_id, node)} does not decode ({reason})"

    def _undecodable(self, image_id: str, node: Any, error: Exception) -> DamagedImageError:
        """The error of an array whose chunk does not decode: damaged in a way its stage sees
        without decoding (:meth:`_chunk_problem`), which a rerun of the stage mends, or past its
        header, which the stage counts as written: then the file must go first."""
        problem = self._chunk_problem(image_id, node)
        if problem is not None:
            return DamagedImageError(self.path, f"image {image_id!r}: {problem}"
                                                f"{self._hint('rerun the {} stage to write it again')}")
        then = "" if self.stage is None else f"; then rerun the {self.stage} stage"
        return DamagedImageError(self.path, f"image {image_id!r}: {self._decode_problem(image_id, node, error)} "
                                            f"(`rrm verify --repair` deletes it{then})")

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def ids(self) -> list[str]:
        """Ids of every array in the store, complete or not, sorted; none if the store does not exist."""
        if not self.exists():
            return []
        return sorted(self._group("r").array_keys())

    def complete_ids(self) -> list[str]:
        """Ids of the arrays written in full and whole (data present), sorted."""
        if not self.exists():
            return []
        return sorted(name for name, node in self._group("r").arrays() if self._is_whole(name, node))

    def is_empty(self) -> bool:
        """Whether the store holds no array (without listing them all)."""
        return not self.exists() or next(iter(self._group("r").array_keys()), None) is None

    def __contains__(self, image_id: object) -> bool:
        """Whether ``image_id`` was written in full and its data is still there."""
        node = self._open(image_id) if isinstance(image_id, str) else None
        return node is not None and self._is_whole(image_id, node)

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint the store was started with (None without a store)."""
        return self._group("r").attrs.get(FINGERPRINT) if self.exists() else None

    @property
    def made_from(self) -> dict[str, Any] | None:
        """The record of what the store was made from (None without a store or a record)."""
        return self._group("r").attrs.get(MADE_FROM) if self.exists() else None

    def reset_unless(self, fingerprint: str, made_from: Mapping[str, Any] | None = None) -> bool:
        """Keep the store only if it was started with ``fingerprint``; else start it anew, empty,
        with ``made_from`` recorded (see :mod:`pipeline.core.provenance`).

        A stage calls this once, from one process, before writing: arrays made with other
        settings are never mixed with new ones, while a rerun with the same settings keeps what
        an interrupted run finished, less the debris of the write it was killed in (see
        :meth:`_remove_debris`). Returns whether the existing arrays were kept.
        """
        if self.fingerprint == fingerprint:
            self._remove_debris()
            return True
        if self.path.exists():
            _remove_tree(self.path)
        attributes = {FINGERPRINT: fingerprint, **({} if made_from is None else {MADE_FROM: dict(made_from)})}
        zarr.open_group(self._root(), mode="w", attributes=attributes, zarr_format=3)
        return False

    def mark_complete(self, expected: Iterable[str]) -> None:
        """Record that the store holds every id in ``expected`` in full (checked; set last, once)."""
        missing = sorted(set(expected) - set(self.complete_ids()))
        if missing:
            raise InputError(self.path, f"{len(missing)} image(s) missing, e.g. {missing[0]!r}; not marked complete")
        self._group("r+").attrs.update({COMPLETE: True})

    def is_complete(self) -> bool:
        return self.exists() and bool(self._group("r").attrs.get(COMPLETE, False))

    def require_complete(self) -> None:
        """Raise naming the store unless its stage finished writing it."""
        if not self.is_complete():
            raise InputError(self.path, f"incomplete store{self._hint('rerun the {} stage')}")

    def _remove_debris(self) -> None:
        """Delete what a kill leaves beside the arrays: zarr's temporary ``*.partial`` files (a
        metadata write cut short) and folders without a ``zarr.json`` (an array whose creation was
        cut short). zarr would list both, with a warning, every time, and they would stay in the
        store's files for good. Debris inside an array's folder goes when the array, incomplete,
        is written again. In a bucket the first kind does not occur and the second is what a
        delete cut short leaves; the check costs one request per array there.
        """
        for entry in self.path.iterdir():
            if entry.is_dir() and not (entry / "zarr.json").is_file():
                _remove_tree(entry)
            elif entry.name.endswith(".partial"):
                entry.unlink()

    def _root(self) -> Path | FsspecStore:
        """What zarr opens: the local folder, or an fsspec store over the URL."""
        if isinstance(self._location, Path):
            return self._location
        return FsspecStore.from_url(str(self._location), storage_options=dict(self._location.storage_options))

    def _group(self, mode: str) -> zarr.Group:
        """The store's group; zarr v3 only, which spares the probes for v2 metadata files."""
        return zarr.open_group(self._root(), mode=mode, zarr_format=3)

    def _group_for_writing(self) -> zarr.Group:
        try:
            return self._group("a")
        except ContainsGroupError:  # another process created the store between the check and the create
            return self._group("r+")

    def _open(self, image_id: str) -> zarr.Array | None:
        try:
            return zarr.open_array(self._root(), path=image_id, mode="r", zarr_format=3)
        except (ArrayNotFoundError, FileNotFoundError):
            return None

    async def _open_async(self, image_id: str) -> Any:
        try:
            return await zarr_async.open_array(store=self._root(), path=image_id, mode="r", zarr_format=3)
        except (ArrayNotFoundError, FileNotFoundError):
            return None

    def _chunk_file(self, image_id: str, node: Any) -> Path | UPath:
        return self.path / image_id / node.metadata.encode_chunk_key((0,) * node.ndim)

    def _gone(self, image_id: str, node: Any) -> str | None:
        """``its chunk file ... is gone`` where the array's one chunk file is not there (one
        presence test; an empty array has no chunk), else None."""
        path = self._chunk_file(image_id, node) if node.nchunks else None
        return None if path is None or path.is_file() else f"its chunk file {path} is gone"

    def _chunk_problem(self, image_id: str, node: Any) -> str | None:
        """Why the array's one chunk file is not whole (gone, or damaged by :func:`chunk_problem`),
        or None; one read of its first bytes, no decode (an empty array has no chunk)."""
        if node.nchunks == 0:
            return None
        path = self._chunk_file(image_id, node)
        try:
            with path.open("rb") as file:
                head = file.read(BLOSC_HEADER.size)
                size = file.seek(0, 2)
        except FileNotFoundError:
            return f"its chunk file {path} is gone"
        checksum = any(isinstance(codec, Crc32cCodec) for codec in node.metadata.codecs)
        problem = chunk_problem(head, size, node.nbytes, checksum)
        return None if problem is None else f"its chunk file {path} is damaged: {problem}"

    def _is_whole(self, image_id: str, node: Any) -> bool:
        """Written in full (its ``complete`` attribute) and its chunk file there and whole
        (``node``: a zarr array, or the asynchronous one of :meth:`read_many`)."""
        return bool(node.metadata.attributes.get(COMPLETE, False)) and self._chunk_problem(image_id, node) is None

    def _hint(self, template: str) -> str:
        """`` (template with the stage name)``, or nothing for a store of no named stage."""
        return "" if self.stage is None else f" ({template.format(self.stage)})"


def _attributes(node: Any) -> dict[str, Any]:
    """The attributes an array was written with (``node``: a zarr array or an asynchronous one),
    less the ``complete`` the store adds."""
    return _without_complete(node.metadata.attributes)


def _without_complete(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if key != COMPLETE}


def unreadable(error: InputError, image_id: str) -> str:
    """Why ``image_id`` could not be read, as ``error`` (from :meth:`ImageStore.read`) says it,
    without the store and the image it names first: for a line that names them itself."""
    return str(error.problem).removeprefix(f"image {image_id!r}: ")


async def _gathered(coroutines: Iterable[Any]) -> list[Any]:
    return list(await asyncio.gather(*coroutines))


def _remove_tree(path: Path | UPath) -> None:
    """Delete a folder and everything in it (on an object store: every object under the prefix)."""
    if isinstance(path, Path):
        shutil.rmtree(path)
    else:
        path.fs.rm(path.path, recursive=True)


@dataclass(frozen=True)
class StorageParams:
    """The `storage:` section: where a run writes.

    ``root`` is the one folder of everything a run writes: its checkpoints (``checkpoints/``),
    metrics (``metrics/``), scores (``scores/``), plots (``plots/``), rejects files
    (``rejects/``) and, unless ``artifacts`` is an absolute path or a URL, its stores. The
    default, the project folder, is where dvc.yaml expects them; a trial params file with a root
    of its own (``trials/a``) never touches the default run's files.

    ``artifacts`` is the folder of the stores (``cams.zarr``, ``masks.zarr``, ...): a local
    path, relative to ``root``, or an fsspec URL such as ``s3://bucket/project/artifacts``.
    ``options`` are fsspec storage options for that URL, e.g. ``{endpoint_url: ...}`` for an
    S3-compatible server; secrets belong in the environment (``AWS_ACCESS_KEY_ID``, ...) or
    ``~/.aws``, not in the committed params file.
    """

    root: str = "."
    artifacts: str = str(DVC_ARTIFACTS)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, dict):
            raise ValueError(f"options={self.options!r} must be a mapping of fsspec storage options")

    def file(self, relative: str | Path) -> Path:
        """Where the run keeps ``relative`` (e.g. ``checkpoints/classifier.pth``): under ``root``."""
        return Path(self.root) / relative

    def store(self, store: Store) -> ImageStore:
        """The ``store`` of the registry (e.g. :data:`~pipeline.core.registry.CAMS`) in the artifacts folder."""
        folder = location(self.artifacts, self.options)
        if isinstance(folder, Path) and not folder.is_absolute():
            folder = self.file(folder)
        return ImageStore(folder / store.name, store.stage)


def _check_id(path: Path | UPath, image_id: str) -> None:
    """Ids become zarr node names: no '/', not empty, no leading '__' (reserved by zarr), not '.'/'..'."""
    if not image_id or "/" in image_id or image_id.startswith("__") or image_id in (".", ".."):
        raise InputError(path, f"image id {image_id!r} cannot name an array")
