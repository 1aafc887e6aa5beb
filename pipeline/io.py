"""Reading images and masks with clear errors, and writing files atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import InputError

IGNORE = 255
"""Label value of pixels that carry no label (unreliable, or outside the image)."""


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and move it into place only if the block succeeds.

    A reader never sees a half-written file, and an existing file survives a failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks; a missing file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(path, f"cannot read image ({error})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(path, "image has zero size")
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit RGB image as uint8 (H, W, 3); any other mode is an error naming the file."""
    path = Path(path)
    image = _open_image(path)
    if image.mode != "RGB":
        raise InputError(path, f"expected an 8-bit RGB image, got mode {image.mode!r}")
    return np.array(image, dtype=np.uint8)


def read_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """Read a label mask as uint8 (H, W) with values 0..num_classes (0 background) or 255.

    Palette ('P') and greyscale ('L') PNGs hold label values directly, as in VOC.
    """
    path = Path(path)
    image = _open_image(path)
    if image.mode not in ("P", "L"):
        raise InputError(path, f"expected a palette or greyscale label mask, got mode {image.mode!r}")
    mask = np.array(image, dtype=np.uint8)
    bad = np.unique(mask[(mask > num_classes) & (mask != IGNORE)])
    if bad.size:
        raise InputError(
            path, f"mask values {bad.tolist()} are outside 0..{num_classes} and 255"
        )
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
