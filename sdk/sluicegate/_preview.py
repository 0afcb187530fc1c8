"""Draw items as a grid of their images with boxes and class names (``sluicegate dataset preview``).

Pure: items and their decoded images in, one PIL image out. Fetching the bytes and writing the file are
the CLI's job, so this draws the same picture from any source and is tested on pixels alone.

Each tile is the image fitted into ``size`` x ``size`` (aspect kept, centred on a dark mat) over a caption
strip with the item id. Boxes and polygons are scaled with the image; every class has one colour from a
fixed palette, chosen by a hash of its name, so a class looks the same in every preview.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sluicegate.core.manifest import Annotation

__all__ = ["MAT", "PALETTE", "Previewable", "class_color", "render_grid"]

RGB = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Mapper = Callable[[float, float], tuple[float, float]]  # image pixels -> tile pixels

# Detectron's colormap, the one COCO visualisations use, without its greys and black: a box has to
# stand out from the photo under it.
_PALETTE_HEX = """
0072BD D95319 EDB120 7E2F8E 77AC30 4DBEEE A2142F FF0000 FF8000 BFBF00 00FF00 0000FF AA00FF 555500
55AA00 55FF00 AA5500 AAAA00 AAFF00 FF5500 FFAA00 FFFF00 005580 00AA80 00FF80 550080 555580 55AA80
55FF80 AA0080 AA5580 AAAA80 AAFF80 FF0080 FF5580 FFAA80 FFFF80 0055FF 00AAFF 00FFFF 5500FF 5555FF
55AAFF 55FFFF AA55FF AAAAFF AAFFFF FF00FF FF55FF FFAAFF
"""
PALETTE: tuple[RGB, ...] = tuple(
    (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)) for h in _PALETTE_HEX.split()
)
BACKGROUND: RGB = (16, 16, 16)  # between tiles
MAT: RGB = (40, 40, 40)  # around an image whose aspect differs from the tile's
_CAPTION_INK: RGB = (210, 210, 210)


class Previewable(Protocol):
    """What a tile needs of an item (an :class:`~sluicegate.Item` or an :class:`~sluicegate.ItemRecord`)."""

    @property
    def id(self) -> str: ...

    @property
    def annotations(self) -> Sequence[Annotation]: ...


def class_color(label: str) -> RGB:
    """The palette colour of a class: a CRC of its name, so it is the same in every process and run."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def render_grid(
    items: Sequence[Previewable],
    images: Sequence[Image.Image],
    *,
    columns: int | None = None,
    size: int = 256,
) -> Image.Image:
    """One RGB picture: ``images[i]`` with ``items[i]``'s annotations, row by row, ``columns`` per row.

    ``columns`` defaults to a near-square grid; ``size`` is each tile's width and image height in pixels.
    """
    if len(items) != len(images):
        raise ValueError(f"{len(items)} items but {len(images)} images; pass one image per item")
    if not items:
        raise ValueError("nothing to draw: pass at least one item")
    if size < 16:
        raise ValueError(f"tile size must be at least 16 pixels, got {size}")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cols = min(columns or math.ceil(math.sqrt(len(items))), len(items))
    rows = math.ceil(len(items) / cols)
    font = _font(max(10, size // 18))
    caption = _line_height(font) + 4
    gap = max(4, size // 32)
    grid = Image.new("RGB", (gap + cols * (size + gap), gap + rows * (size + caption + gap)), BACKGROUND)
    for i, (item, image) in enumerate(zip(items, images, strict=True)):
        row, col = divmod(i, cols)
        tile = _tile(item, image, size, caption, font)
        grid.paste(tile, (gap + col * (size + gap), gap + row * (size + caption + gap)))
    return grid


# -- one tile ----------------------------------------------------------------------------------------


def _tile(item: Previewable, image: Image.Image, size: int, caption: int, font: Font) -> Image.Image:
    # Drawn on its own canvas and pasted: labels near an edge are clipped to the tile, never spill over.
    canvas = Image.new("RGB", (size, size + caption), MAT)
    rgb = _rgb(image)
    width, height = rgb.size
    scale = min(size / width, size / height)
    fitted = (max(1, round(width * scale)), max(1, round(height * scale)))
    ox, oy = (size - fitted[0]) // 2, (size - fitted[1]) // 2
    down = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    # reducing_gap: a photo is first shrunk by whole factors, cheaply, and the filter runs on the rest.
    canvas.paste(rgb.resize(fitted, down, reducing_gap=3.0), (ox, oy))

    def at(x: float, y: float) -> tuple[float, float]:
        return ox + x * scale, oy + y * scale

    polygons = [a for a in item.annotations if a.polygon]
    if polygons:
        canvas = _fill_polygons(canvas, polygons, at)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(size / 100))
    tags: list[tuple[str, tuple[int, int]]] = []  # class names, drawn last so no box line crosses them
    untagged: list[str] = []  # classification labels (no geometry): chips in the corner
    for ann in item.annotations:
        xs = [v for ring in ann.polygon or [] for v in ring[0::2]]
        ys = [v for ring in ann.polygon or [] for v in ring[1::2]]
        if ann.bbox is not None:
            x, y, w, h = ann.bbox
            (x0, y0), (x1, y1) = at(x, y), at(x + w, y + h)
            # A box covers pixels [x, x + w): the outline's outer edge is its last pixel, the width inward.
            left, top = round(x0), round(y0)
            box = (left, top, max(left, round(x1) - 1), max(top, round(y1) - 1))
            draw.rectangle(box, outline=class_color(ann.label), width=line)
            tags.append((ann.label, (left, top)))
        elif xs and ys:  # a polygon without a box: its name at the polygon's top-left
            left, top = (round(v) for v in at(min(xs), min(ys)))
            tags.append((ann.label, (left, top)))
        elif ann.label not in untagged:
            untagged.append(ann.label)
    for label, (left, top) in tags:
        _tag(draw, label, left, top, size, font, above=True)
    chip_y = oy
    for label in untagged:
        chip_y += _tag(draw, label, ox, chip_y, size, font, above=False)
    draw.text((3, size + 2), _fit_text(item.id, font, size - 6), fill=_CAPTION_INK, font=font)
    return canvas


def _tag(
    draw: ImageDraw.ImageDraw, label: str, left: int, top: int, size: int, font: Font, above: bool
) -> int:
    """A class name on a box filled with its colour, above ``top`` if there is room, else below it.

    Returns the tag's height.
    """
    text = _fit_text(label, font, size - 4)
    width, height = round(font.getlength(text)) + 6, _line_height(font) + 2
    y = top - height if above and top >= height else top
    x = max(0, min(left, size - width))  # shifted left rather than cut at the tile's right edge
    colour = class_color(label)
    draw.rectangle((x, y, x + width - 1, y + height - 1), fill=colour)
    draw.text((x + 3, y + 1), text, fill=_ink(colour), font=font)
    return height


def _fill_polygons(
    canvas: Image.Image,
    annotations: Sequence[Annotation],
    at: Mapper,
) -> Image.Image:
    """Polygons as translucent fills with a solid edge (COCO's look), composited once per tile."""
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for ann in annotations:
        colour = class_color(ann.label)
        for ring in ann.polygon or []:
            points = [at(x, y) for x, y in zip(ring[0::2], ring[1::2], strict=False)]
            if len(points) >= 3:
                draw.polygon(points, fill=(*colour, 90), outline=(*colour, 255))
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: transparency over the mat, 16-bit and float images stretched to 0..255."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*MAT, 255)), rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # convert("RGB") would clip these at 255 and show a white tile.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        span = high - low or 1.0
        return Image.fromarray(((values - low) * (255 / span)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _ink(colour: RGB) -> RGB:
    """Black or white, whichever reads better on ``colour`` (ITU-R BT.601 luma)."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _fit_text(text: str, font: Font, width: float) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


@functools.cache
def _font(size: int) -> Font:
    # Pillow's bundled font: no font files to find on the machine, the same picture everywhere.
    return ImageFont.load_default(size=size)


def _line_height(font: Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    _, top, _, bottom = font.getbbox("Ag")  # the bitmap fallback, when Pillow lacks FreeType
    return int(bottom - top)
