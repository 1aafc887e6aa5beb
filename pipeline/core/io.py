"""Reading images and masks with clear errors, and writing files atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import numpy as np
from fsspec.core import split_protocol
from PIL import ExifTags, Image, UnidentifiedImageError
from upath import UPath

from pipeline.core.errors import InputError

IGNORE = 255
"""Label value of pixels that carry no label (unreliable, or outside the image)."""

LOCAL_PROTOCOLS = ("file", "local")
"""fsspec's names of the local disk: such a URL is a plain local path."""

URL_DEFAULTS = {"use_listings_cache": False}
"""fsspec options of every URL unless given otherwise: several processes write one store
(DataLoader, dask and torchrun workers), and a folder listing cached by one would hide what the
others wrote since."""


def location(path: str | os.PathLike[str] | UPath, storage_options: Mapping[str, Any] | None = None) -> Path | UPath:
    """Where a file or folder lives: a local path as a :class:`Path`, an fsspec URL
    (``s3://bucket/key``, ``memory://...``) as a :class:`UPath` that carries ``storage_options``.

    A ``file://`` URL is a local path, so local files always get the local code (and the local
    zarr store's atomic writes). A ``UPath`` keeps its options when it is pickled, so DataLoader
    and dask workers reach the same bucket with the same settings. Credentials and endpoint not
    in ``storage_options`` come from the filesystem's usual environment (for S3:
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``). A
    ``Path`` or ``UPath`` is returned as it is.
    """
    if isinstance(path, (Path, UPath)):
        return path
    text = os.fspath(path)
    protocol, local = split_protocol(text)
    if protocol is None:
        return Path(text)
    if protocol in LOCAL_PROTOCOLS:
        return Path(local)
    return UPath(text, **{**URL_DEFAULTS, **(storage_options or {})})


def detached(path: Path | UPath) -> Path | UPath:
    """``path`` without the fsspec filesystem that a ``UPath`` caches on first use and hands on to
    every path joined to it. That instance belongs to the process that made it (s3fs's fails in
    a forked process: "not fork-safe"), and DataLoader workers are forked with the objects they
    read through, so those keep detached paths: each use then gets its filesystem from fsspec's
    own cache, which starts anew in every process. A local ``Path`` is returned as it is.
    """
    return path if isinstance(path, Path) else UPath(str(path), **path.storage_options)


def _file_mode() -> int:
    """The mode a plain ``open`` gives a new file (0o666 less the umask); ``mkstemp`` gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and move it into place only if the block succeeds.

    A reader never sees a half-written file, and an existing file survives a failure.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError:
        raise InputError(path, "permission denied (cannot write the file there)") from None
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint(*parts: Any) -> str:
    """A short digest of what a result depends on (parameters, input files' digests)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path | UPath) -> str:
    """SHA-256 of a file's bytes, read in blocks; a missing file is an error naming it."""
    path = location(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def digest_or_none(path: str | Path | UPath | None) -> str | None:
    """:func:`file_digest` of ``path``; None where no file is given (a setting left empty)."""
    return file_digest(path) if path else None


def read_json_object(path: str | Path | UPath, what: str) -> dict[str, Any]:
    """The JSON object in the file ``path``, which holds a ``what`` (e.g. "metrics file"): text
    that is not JSON, or JSON that is not an object, is one line naming the file."""
    try:
        data = json.loads(location(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, f"not a valid JSON {what} ({error})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"a {what} must hold a JSON object")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


MODE_NAMES = {
    "1": "a 1-bit black-and-white",
    "L": "an 8-bit greyscale",
    "LA": "a greyscale-with-alpha",
    "P": "a palette",
    "RGBA": "an RGB-with-alpha",
    "CMYK": "a CMYK",
    "I;16": "a 16-bit greyscale",
    "I": "a 32-bit integer",
    "F": "a 32-bit float",
}
"""How an error names the PIL modes a user is likely to meet."""

MAX_PIXELS = 40_000_000
"""The pixel budget of one image: larger ones are refused when read, from the header alone.
A 40-megapixel photo (7,700 x 5,200) fits; every stage's memory grows with the pixels (the CAMs
of four scales, two dense CRFs), and beyond this a single image takes several GB."""

SHOWN = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""How an image stored with EXIF orientation 2..8 is turned to be shown (1: as stored)."""

TURNED = (5, 6, 7, 8)
"""The EXIF orientations that turn an image a quarter (width and height swap when it is shown)."""


def orientation(image: Image.Image) -> int:
    """The EXIF orientation in an opened image's header (1 where none), without decoding its
    pixels. EXIF a PNG places after its pixels is not read: such a file is taken as stored, by
    every reader alike."""
    exif = image.info.get("exif")
    if not exif:
        return 1
    parsed = Image.Exif()
    parsed.load(exif)
    value = parsed.get(ExifTags.Base.Orientation, 1)
    return value if value in SHOWN else 1

SHOWN_VALUES = 8
"""How many bad mask values an error lists before it only counts them."""


def _mode_name(mode: str) -> str:
    return f"{MODE_NAMES.get(mode, 'an')} image (mode {mode!r})"


def _shortened(values: list[int]) -> str:
    """``values`` as a list, cut after ``SHOWN_VALUES`` with a count of them all."""
    if len(values) <= SHOWN_VALUES:
        return str(values)
    return f"[{', '.join(map(str, values[:SHOWN_VALUES]))}, ...] ({len(values)} values)"


def _read_file(path: Path | UPath) -> bytes:
    """A file's bytes in one read (one GET from an object store, not a HEAD for each check);
    missing, unreadable and empty files are ``InputError``."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InputError(path, "file not found") from None
    except OSError as error:
        raise InputError(path, f"cannot read file ({error})") from None
    if not data:
        raise InputError(path, "empty file (0 bytes)")
    return data


def _open_image(path: Path | UPath) -> tuple[Image.Image, int]:
    """Open and decode an image file, with its EXIF orientation (see :func:`orientation`);
    every way it can be unreadable is one ``InputError``.

    PIL reads only the header in ``Image.open``: the size is checked against :data:`MAX_PIXELS`
    before decoding, and a truncated file fails in ``load``, so both are inside the ``try``.
    """
    data = _read_file(path)
    try:
        image = Image.open(BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise InputError(path, f"image of {image.width}x{image.height} pixels is over the budget of "
                                   f"{MAX_PIXELS / 1e6:g} megapixels; scale it down")
        turn = orientation(image)
        image.load()
    except UnidentifiedImageError:
        raise InputError(path, "cannot read image (unknown format or broken header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(path, f"cannot read image, truncated or corrupt ({error})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(path, "image has zero size")
    return image, turn


def read_image(path: str | Path | UPath) -> np.ndarray:
    """Read an 8-bit RGB image as uint8 (H, W, 3), the way viewers show it: turned by its EXIF
    orientation (a phone photo's), if it has one. Any other mode is an error naming the file.
    Ground-truth masks are read as stored, so they must be drawn in that shown orientation.

    ``path`` may be an fsspec URL (see :func:`location`)."""
    path = location(path)
    image, turn = _open_image(path)
    if image.mode != "RGB":
        raise InputError(path, f"expected an 8-bit RGB image, got {_mode_name(image.mode)}")
    return np.array(image if turn == 1 else image.transpose(SHOWN[turn]), dtype=np.uint8)


def read_mask(path: str | Path | UPath, num_classes: int) -> np.ndarray:
    """Read a label mask as uint8 (H, W) with values 0..num_classes (0 background) or 255.

    Palette ('P') and greyscale ('L') PNGs hold label values directly, as in VOC. ``path`` may
    be an fsspec URL (see :func:`location`).
    """
    path = location(path)
    image, _ = _open_image(path)  # read as stored: see read_image
    if image.mode not in ("P", "L"):
        raise InputError(path, f"expected a palette or greyscale label mask, got {_mode_name(image.mode)}")
    mask = np.array(image, dtype=np.uint8)
    bad = np.unique(mask[(mask > num_classes) & (mask != IGNORE)]).tolist()
    if bad:
        raise InputError(path, f"mask values {_shortened(bad)} are outside 0..{num_classes} and 255")
    return mask


def write_mask(path: str | Path, mask: np.ndarray, palette: np.ndarray) -> None:
    """Write a uint8 label mask as a palette PNG (VOC style), atomically.

    ``palette`` is (n, 3) uint8, row ``v`` the colour of label value ``v``; 255 is drawn white.
    """
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    flat[IGNORE] = (255, 255, 255)
    image.putpalette(flat.flatten().tolist())
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Write a uint8 (H, W, 3) RGB image atomically; the format follows the suffix."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    options = {"quality": quality} if fmt == "JPEG" else {}
    with atomic_open(path, "wb") as handle:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(handle, format=fmt, **options)
