"""Pictures of one image's maps and masks: titled panels side by side over a legend (PIL + numpy only).

A panel is an RGB array, made from the image and its maps enlarged by one whole factor (nearest
neighbour, so that label boundaries stay sharp and the hatching stays one pixel thin);
:func:`compose` writes each panel's title above it and a legend of palette swatches under the
row. Masks are drawn in the dataset's
palette over a faint copy of the image; unlabelled pixels (255) are a light grey copy of the
image with dark diagonal hatching, so that they can never be taken for background, which VOC's
palette draws black.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.io import IGNORE, write_image

MIN_PANEL_SIDE = 192
"""Default enlargement: the smallest whole factor that makes a panel's shorter side at least this."""

GAP = 6
"""Pixels between panels, around the row and between legend entries."""

TEXT_HEIGHT = 16
"""Height of a title bar and of a legend line (the default font is about 11 pixels high)."""

SWATCH = 12
"""Side of a legend swatch."""

HATCH_PERIOD = 6
"""Pixels between the diagonal lines that mark unlabelled pixels."""

UNLABELLED = "unlabelled (255)"
"""Legend name of the hatched pixels: unreliable in a mined mask, ignored in a ground truth."""

MASK_OPACITY = 0.7
"""Weight of the palette colour over the image in a mask panel."""

HEAT_OPACITY = 0.6
"""Weight of the heat colour over the greyscale image in a CAM panel."""

THUMBNAIL_HEIGHT = 96
"""Height of a gallery thumbnail."""

# Control points of a jet-like ramp from 0 (dark blue) to 1 (dark red).
_HEAT_STOPS = np.array([0.0, 0.15, 0.35, 0.5, 0.65, 0.85, 1.0])
_HEAT_COLOURS = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 200, 255], [60, 255, 120], [255, 220, 0], [255, 40, 0], [128, 0, 0]],
    dtype=np.float64,
)
HEAT_TABLE = np.stack([np.interp(np.linspace(0, 1, 256), _HEAT_STOPS, _HEAT_COLOURS[:, c]) for c in range(3)],
                      axis=1).round().astype(np.uint8)
"""(256, 3) uint8 colour of each of 256 levels of a map in [0, 1]."""


@dataclass(frozen=True)
class Panel:
    """One picture of the row: its title and uint8 (H, W, 3) pixels."""

    title: str
    pixels: np.ndarray


@dataclass(frozen=True)
class LegendEntry:
    """A legend swatch: a label's name and its palette colour, or None for the unlabelled hatching."""

    name: str
    colour: tuple[int, int, int] | None


@dataclass(frozen=True)
class Figure:
    """A composed picture and its layout, so that a caller can check what it shows without reading pixels.

    ``panel_size`` is (height, width) of every panel; panel ``i`` starts at column
    ``GAP + i * (width + GAP)``, below its title.
    """

    pixels: np.ndarray
    titles: tuple[str, ...]
    panel_size: tuple[int, int]
    legend: tuple[str, ...]

    def save(self, path: str | Path) -> None:
        write_image(path, self.pixels)


def default_scale(shape: tuple[int, ...]) -> int:
    """The smallest whole factor that brings an (H, W) image's shorter side to ``MIN_PANEL_SIDE``."""
    return max(1, math.ceil(MIN_PANEL_SIDE / min(shape[:2])))


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    """``pixels`` (H, W, ...) with every pixel repeated ``scale`` times along both axes."""
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)


def thumbnail(pixels: np.ndarray, height: int = THUMBNAIL_HEIGHT) -> np.ndarray:
    """An RGB panel resized to ``height`` rows, keeping its aspect (box filter down, nearest up)."""
    image = Image.fromarray(pixels)
    width = max(1, round(image.width * height / image.height))
    method = Image.Resampling.BOX if height < image.height else Image.Resampling.NEAREST
    return np.asarray(image.resize((width, height), method))


def png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB array as PNG file contents."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def greyscale(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) grey copy of an RGB image (ITU-R 601 luma)."""
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat(luma[..., None], 3, axis=2).round().astype(np.uint8)


def _blend(base: np.ndarray, top: np.ndarray, opacity: float) -> np.ndarray:
    return ((1 - opacity) * base.astype(np.float64) + opacity * top.astype(np.float64)).round().astype(np.uint8)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) colours of ``values`` in [0, 1] (clipped) on the heat ramp."""
    levels = (np.clip(np.nan_to_num(values.astype(np.float64)), 0, 1) * 255).round().astype(np.intp)
    return HEAT_TABLE[levels]


def cam_panel(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A class activation map (H, W) in [0, 1] as a heat map over the greyscale image."""
    return _blend(greyscale(image), heat_colours(cam), HEAT_OPACITY)


def hatched(image: np.ndarray) -> np.ndarray:
    """The look of unlabelled pixels: a light grey copy of ``image`` crossed by dark diagonal lines."""
    faded = _blend(greyscale(image), np.full_like(image, 255), 0.6)
    rows, cols = np.indices(image.shape[:2])
    faded[(rows + cols) % HATCH_PERIOD == 0] = (60, 60, 60)
    return faded


def mask_panel(image: np.ndarray, mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """A label mask (H, W) in ``palette`` over the image; unlabelled (255) pixels :func:`hatched`."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(palette)] = palette
    panel = _blend(image, colours[mask], MASK_OPACITY)
    unlabelled = mask == IGNORE
    panel[unlabelled] = hatched(image)[unlabelled]
    return panel


def legend_entries(values: Sequence[int], label_names: Sequence[str], palette: np.ndarray) -> list[LegendEntry]:
    """Entries for the label values in ``values`` (0..C and 255), in increasing order."""
    entries = []
    for value in sorted(set(int(v) for v in values)):
        if value == IGNORE:
            entries.append(LegendEntry(UNLABELLED, None))
        else:
            entries.append(LegendEntry(label_names[value], tuple(int(c) for c in palette[value])))
    return entries


@cache
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _swatch(entry: LegendEntry) -> np.ndarray:
    if entry.colour is not None:
        return np.full((SWATCH, SWATCH, 3), entry.colour, dtype=np.uint8)
    return hatched(np.full((SWATCH, SWATCH, 3), 128, dtype=np.uint8))


LegendLine = list[tuple[int, LegendEntry]]
"""Legend entries of one line, each with its left offset."""


def _legend_lines(entries: Sequence[LegendEntry], width: int) -> list[LegendLine]:
    """Entries wrapped into lines that fit ``width``."""
    lines: list[LegendLine] = [[]]
    left = GAP
    for entry in entries:
        span = SWATCH + 4 + math.ceil(font().getlength(entry.name)) + 2 * GAP
        if lines[-1] and left + span > width:
            lines.append([])
            left = GAP
        lines[-1].append((left, entry))
        left += span
    return lines


def compose(panels: Sequence[Panel], legend: Sequence[LegendEntry]) -> Figure:
    """The panels side by side, each under its title, the legend below."""
    if not panels:
        raise ValueError("a figure needs at least one panel")
    size = panels[0].pixels.shape[:2]
    if any(p.pixels.shape != (*size, 3) for p in panels):
        raise ValueError("every panel must be (H, W, 3) of the same size")
    total_width = GAP + len(panels) * (size[1] + GAP)
    lines = _legend_lines(legend, total_width)
    top = GAP + TEXT_HEIGHT
    total_height = top + size[0] + GAP + len(lines) * TEXT_HEIGHT + GAP
    canvas = Image.new("RGB", (total_width, total_height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, panel in enumerate(panels):
        left = GAP + index * (size[1] + GAP)
        draw.text((left, GAP), panel.title, fill="black", font=font())
        canvas.paste(Image.fromarray(panel.pixels), (left, top))
    for row, line in enumerate(lines):
        y = top + size[0] + GAP + row * TEXT_HEIGHT
        for left, entry in line:
            canvas.paste(Image.fromarray(_swatch(entry)), (left, y + (TEXT_HEIGHT - SWATCH) // 2))
            draw.text((left + SWATCH + 4, y + 2), entry.name, fill="black", font=font())
    return Figure(np.asarray(canvas), tuple(p.title for p in panels), (size[0], size[1]), tuple(e.name for e in legend))
