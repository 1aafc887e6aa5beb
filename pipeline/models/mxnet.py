"""Reading MXNet's NDArray list files (``.params``) with numpy, without MXNet.

The ImageNet ResNet-38 that PSA and RRM start from, ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``,
is such a file. The layout, all little-endian, as MXNet's ``NDArray::Save``/``Load`` write and read it:

- file header: ``uint64`` magic ``0x112``, ``uint64`` reserved (0);
- ``uint64`` array count, then each array:

  - ``uint32`` magic: ``0xF993FAC9`` (v2), ``0xF993FACA`` (v3, numpy shape semantics),
    ``0xF993FAC8`` (v1), or anything else for the legacy layout, where this word is already the
    number of dimensions;
  - v2 and v3 only: ``int32`` storage type (0 dense; sparse arrays are not supported here);
  - shape: ``uint32`` ndim then ndim ``int64`` dims (legacy: ndim ``uint32`` dims). An array
    with no shape (ndim 0; -1 in v3, where ndim 0 is a scalar) ends here;
  - context: ``int32`` device type, ``int32`` device id (ignored: everything is read to the CPU);
  - ``int32`` type flag (see ``DTYPES``), then the data, C order;
- ``uint64`` name count, then each name as ``uint64`` length and its bytes. Files written by
  ``save_checkpoint`` prefix names with ``arg:`` (parameters) or ``aux:`` (running statistics).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.core.errors import InputError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
DENSE_STORAGE = 0
MAX_DIMS = 32  # a legacy header with more dimensions than this is not an array header
MAX_NAME = 4096  # nor is a longer name a parameter name
DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
}
"""MXNet (mshadow) type flags and the numpy types they stand for."""


class _FormatError(Exception):
    """A problem in the file's layout; reported by ``read_ndarray_file`` with the file's name."""


def _read_bytes(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise _FormatError("file ends early (truncated?)")
    return data


def _unpack(handle: BinaryIO, fmt: str) -> tuple[int, ...]:
    return struct.unpack(fmt, _read_bytes(handle, struct.calcsize(fmt)))


def _read_data(handle: BinaryIO, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Read straight into a new array: no intermediate copy of a 400 MB file's bytes."""
    remaining = os.fstat(handle.fileno()).st_size - handle.tell()
    if math.prod(shape) * dtype.itemsize > remaining:
        raise _FormatError(f"file ends inside an array of shape {shape} (truncated?)")
    array = np.empty(shape, dtype)
    handle.readinto(memoryview(array.reshape(-1)).cast("B"))
    return array


def _read_shape(handle: BinaryIO, magic: int) -> tuple[int, ...] | None:
    """The array's shape, or None for an array without one."""
    if magic not in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        if magic > MAX_DIMS:
            raise _FormatError(f"unknown array header {magic:#x}")
        return _unpack(handle, f"<{magic}I") if magic else None
    (ndim,) = _unpack(handle, "<i")
    if ndim == -1 or (ndim == 0 and magic != V3_MAGIC):
        return None
    if ndim < 0:
        raise _FormatError(f"bad number of dimensions {ndim}")
    shape = _unpack(handle, f"<{ndim}q")
    if any(dim < 0 for dim in shape):
        raise _FormatError(f"array of unknown shape {shape}")
    return shape


def _read_array(handle: BinaryIO) -> np.ndarray:
    (magic,) = _unpack(handle, "<I")
    if magic in (V2_MAGIC, V3_MAGIC):
        (storage,) = _unpack(handle, "<i")
        if storage != DENSE_STORAGE:
            raise _FormatError(f"sparse arrays (storage type {storage}) are not supported")
    shape = _read_shape(handle, magic)
    if shape is None:
        return np.empty((0,), np.float32)
    _unpack(handle, "<ii")
    (type_flag,) = _unpack(handle, "<i")
    if type_flag not in DTYPES:
        raise _FormatError(f"unknown data type flag {type_flag}")
    return _read_data(handle, shape, DTYPES[type_flag])


def _read_name(handle: BinaryIO) -> str:
    (length,) = _unpack(handle, "<Q")
    if length > MAX_NAME:
        raise _FormatError(f"bad name length {length}")
    return _read_bytes(handle, length).decode("utf-8", "replace")


def _read_list(handle: BinaryIO) -> dict[str, np.ndarray]:
    magic, _reserved = _unpack(handle, "<QQ")
    if magic != LIST_MAGIC:
        raise _FormatError(f"not an MXNet NDArray file (magic {magic:#x}, expected {LIST_MAGIC:#x})")
    (count,) = _unpack(handle, "<Q")
    arrays = [_read_array(handle) for _ in range(count)]
    (name_count,) = _unpack(handle, "<Q")
    if name_count != count:
        raise _FormatError(f"{count} arrays but {name_count} names")
    names = [_read_name(handle) for _ in range(count)]
    return dict(zip(names, arrays, strict=True))


def read_ndarray_file(path: str | Path) -> dict[str, np.ndarray]:
    """The named arrays of an MXNet ``.params`` file, names as stored (``arg:``/``aux:`` kept)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return _read_list(handle)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except _FormatError as error:
        raise InputError(path, f"cannot read MXNet parameters: {error}") from None
