"""One image's array as the files of a zarr v3 array on a local disk, made and read directly.

Every array of an :class:`~pipeline.core.store.ImageStore` is one chunk with one codec chain
(:func:`layout`): a ``zarr.json`` and one chunk file, the array's bytes through blosc, then their
CRC-32C. zarr spends milliseconds an array on those two small files (building and checking
metadata objects, an event-loop round trip, a thread hop for each codec), more than the prune
rule takes on an image's maps, so a threshold rerun was mostly zarr's. Here the same files are
made and read in this thread: the metadata is zarr's own for the array's shape and dtype (made
by zarr once per shape and dtype), the chunk numcodecs' blosc with the metadata's settings and
google_crc32c's checksum, as zarr's codecs make them (byte for byte: a test compares them), each
file written through a temporary file and a rename as zarr's local store does.

This is the fast path only: :func:`read` returns None for anything but a whole array of this
layout written in full (a file missing, another layout, a checksum or a size that does not match,
an empty array), and :func:`write` declines an empty array (zarr writes no chunk for it); the store then
does it through zarr, whose errors it words.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

COMPLETE = "complete"
"""Attribute set on every array as it is written: its presence means the array was written in
full. On the store's group it means every image the stage had to write is there."""

COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
"""Fast, and byte shuffling suits smooth float16 maps."""

CHECKSUM = Crc32cCodec()
"""Four bytes after each compressed chunk: a garbled chunk fails to decode instead of reading
back as other numbers."""

BLOSC_HEADER = struct.Struct("<4xIII")
"""The first 16 bytes of a blosc chunk: version and flags, then the uncompressed size, the block
size and the compressed size (the chunk's own length), little-endian."""

METADATA = "zarr.json"

SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def chunk_problem(head: bytes, size: int, data_bytes: int, checksum: bool) -> str | None:
    """Why a chunk file of ``size`` bytes starting with ``head`` cannot be the whole blosc chunk
    of an array of ``data_bytes`` bytes (``checksum``: followed by its CRC-32C), or None where it
    can; read from the header alone, nothing is decoded."""
    trailer = 4 if checksum else 0
    if size < BLOSC_HEADER.size + trailer or len(head) < BLOSC_HEADER.size:
        return f"cut short ({size} bytes)"
    held, _, compressed = BLOSC_HEADER.unpack_from(head)
    if held != data_bytes:
        return f"not this array's ({held} bytes of data where the array has {data_bytes})"
    if compressed + trailer != size:
        return f"{'cut short' if size < compressed + trailer else 'too long'} ({size} bytes of {compressed + trailer})"
    return None


def layout(array: np.ndarray) -> dict[str, Any]:
    """How every array is stored (zarr's ``create_array`` arguments): its shape and dtype, one
    chunk (kept even when all zeros), zstd, then its checksum."""
    return {"shape": array.shape, "dtype": array.dtype, "chunks": tuple(max(1, n) for n in array.shape),
            "compressors": (COMPRESSOR, CHECKSUM), "overwrite": True, "config": {"write_empty_chunks": True}}


def chunk_key(ndim: int) -> str:
    """The one chunk's file, relative to the array's folder (zarr's default key encoding)."""
    return "/".join(["c"] + ["0"] * ndim)


@functools.lru_cache(maxsize=64)
def _template(shape: tuple[int, ...], dtype: str) -> tuple[dict[str, Any], Blosc]:
    """zarr's own metadata for an array of :func:`layout` with ``shape`` and ``dtype``, without
    attributes, and the blosc codec it names."""
    array = zarr.create_array(MemoryStore(), **layout(np.empty(shape, dtype=dtype)))
    files = array.metadata.to_buffer_dict(default_buffer_prototype())
    metadata = json.loads(files[METADATA].to_bytes())
    codec = _blosc(metadata)
    if codec is None:
        raise RuntimeError(f"zarr made codecs {metadata['codecs']} of layout(), which chunkfile does not write")
    return metadata, codec


def _blosc(metadata: Mapping[str, Any]) -> Blosc | None:
    """The numcodecs blosc codec of ``metadata``'s codec chain, or None where the chain is not
    :func:`layout`'s (bytes, little-endian where it says; blosc; the checksum or, in stores
    written before it, none)."""
    names = [codec.get("name") for codec in metadata.get("codecs", ())]
    if names not in (["bytes", "blosc", "crc32c"], ["bytes", "blosc"]):
        return None
    if metadata["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
        return None
    config = metadata["codecs"][1].get("configuration", {})
    try:
        return Blosc(cname=config["cname"], clevel=config["clevel"], shuffle=SHUFFLES[config["shuffle"]],
                     blocksize=config.get("blocksize", 0), typesize=config.get("typesize"))
    except (KeyError, ValueError, TypeError):
        return None


def write(folder: Path, array: np.ndarray, attributes: Mapping[str, Any]) -> bool:
    """Write ``array`` with ``attributes`` (``complete`` added) as a zarr array in ``folder``,
    replacing whatever was there: the chunk file, then ``zarr.json`` (so a write cut short leaves
    a folder without metadata, which zarr does not list and the store removes as debris). Returns
    False, having written nothing, for an empty array (zarr writes it: it has no chunk)."""
    array = np.asarray(array)
    if array.size == 0:
        return False
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # the bytes codec's order
    template, codec = _template(array.shape, array.dtype.str)
    text = json.dumps({**template, "attributes": {**attributes, COMPLETE: True}}, indent=2).encode()
    data = codec.encode(array.view(np.uint8).ravel())
    chunk = data + np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()
    if folder.exists():
        shutil.rmtree(folder)
    path = folder / chunk_key(array.ndim)
    path.parent.mkdir(parents=True)
    _atomic_write(path, chunk)
    _atomic_write(folder / METADATA, text)
    return True


def read(folder: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The array in ``folder`` and all its attributes, or None unless it is a whole, non-empty
    array of :func:`layout` written in full (then zarr reads it, and words what is wrong)."""
    try:
        metadata = json.loads((folder / METADATA).read_bytes())
        shape = tuple(metadata["shape"])
        dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        chunked = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"]) == shape
        default_keys = metadata["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    attributes = metadata.get("attributes", {})
    codec = _blosc(metadata)
    if not (chunked and default_keys and attributes.get(COMPLETE) is True and codec is not None) or 0 in shape:
        return None
    try:
        chunk = (folder / chunk_key(len(shape))).read_bytes()
    except OSError:
        return None
    checksum = metadata["codecs"][-1]["name"] == "crc32c"
    data_bytes = int(np.prod(shape)) * dtype.itemsize
    if chunk_problem(chunk[: BLOSC_HEADER.size], len(chunk), data_bytes, checksum) is not None:
        return None
    if checksum:
        chunk, stored = chunk[:-4], chunk[-4:]
        if np.uint32(google_crc32c.value(chunk)).astype("<u4").tobytes() != stored:
            return None
    out = np.empty(shape, dtype=dtype)
    try:
        codec.decode(chunk, out=out)
    except (RuntimeError, ValueError, TypeError):
        return None
    return out.astype(dtype.newbyteorder("="), copy=False), attributes


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` whole or not at all: a temporary file beside it, then a rename."""
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with partial.open("wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
