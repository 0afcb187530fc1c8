"""The header parser: the same answers as Pillow for the formats it reads, ``None`` (never a guess
or a crash) for truncated, garbage and unusual headers."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sluicegate._imageinfo import ImageInfo, image_info


def _encode(fmt: str, width: int, height: int, mode: str = "RGB", **params: Any) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    if mode not in ("RGB", "RGBA"):
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _pillow(data: bytes) -> ImageInfo:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format is not None
        return ImageInfo(Image.MIME[image.format], *image.size)


SAMPLES = {
    "png": _encode("PNG", 37, 21),
    "png-gray-interlaced": _encode("PNG", 5, 300, "L", interlace=1),
    "png-palette": _encode("PNG", 64, 1, "P"),
    "jpeg": _encode("JPEG", 33, 17),
    "jpeg-progressive-exif": _encode("JPEG", 640, 3, progressive=True, exif=b"Exif\x00\x00" + b"\x00" * 5000),
    "jpeg-gray": _encode("JPEG", 1, 1, "L"),
    "gif": _encode("GIF", 19, 23, "P"),
    "bmp": _encode("BMP", 13, 7),
    "bmp-1bit": _encode("BMP", 9, 4, "1"),
    "webp-lossy": _encode("WEBP", 101, 57, quality=50),
    "webp-lossless": _encode("WEBP", 70, 3, lossless=True),
    "webp-extended": _encode("WEBP", 31, 44, "RGBA"),  # alpha: a VP8X chunk first
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_agrees_with_pillow(name: str) -> None:
    data = SAMPLES[name]
    info = image_info(data)
    assert info is not None, name
    assert info == _pillow(data)


def test_webp_extended_is_read_from_its_canvas_header() -> None:
    assert SAMPLES["webp-extended"][12:16] == b"VP8X"
    assert image_info(SAMPLES["webp-extended"]) == ImageInfo("image/webp", 31, 44)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_truncated_headers_give_none_or_the_full_answer(name: str) -> None:
    data = SAMPLES[name]
    full = image_info(data)
    answers = {image_info(data[:n]) for n in range(min(len(data), 2000))}
    assert answers <= {None, full}
    assert image_info(data[:10]) is None  # too short for any size field


def test_bmp_top_down_rows_have_a_positive_height() -> None:
    data = bytearray(SAMPLES["bmp"])
    struct.pack_into("<i", data, 22, -7)  # negative height: rows stored top-down
    assert image_info(bytes(data)) == ImageInfo("image/bmp", 13, 7) == _pillow(bytes(data))


def _png_with_ihdr(width: int, height: int) -> bytes:
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"hello, world, this is plain text and not an image", "text"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG signature, no IHDR"),
        (SAMPLES["png"][:29] + b"\x00\x00\x00\x00" + SAMPLES["png"][33:], "IHDR with a wrong CRC"),
        (_png_with_ihdr(0, 5), "zero width"),
        (_png_with_ihdr(2**31, 5), "width beyond the PNG limit"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 9 + b"\xff\xda\x00\x08" + b"\x00" * 20, "no frame"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 9 + b"garbage" * 10, "junk between segments"),
        (b"\xff\xd8\xff\xe2\x00\x10MPF\x00" + b"\x00" * 10 + SAMPLES["jpeg"][2:], "multi-picture"),
        (
            b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0, 0, 0) + b",\x00\x00\x00\x00\x08\x00\x08\x00\x00",
            "big frame",
        ),
        (b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0, 0, 0) + b";", "no frame"),
        (SAMPLES["bmp"][:30] + struct.pack("<I", 4) + SAMPLES["bmp"][34:], "BMP with JPEG compression"),
        (SAMPLES["bmp"][:14] + struct.pack("<I", 20) + SAMPLES["bmp"][18:], "unknown BMP header"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x00" * 40, "RIFF, not WebP"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 40, "VP8 without its start code"),
    ],
)
def test_unusual_or_foreign_headers_give_none(data: bytes, why: str) -> None:
    assert image_info(data) is None, why


def test_a_gif_frame_inside_the_screen_is_fine() -> None:
    descriptor = b",\x00\x00\x01\x00\x03\x00\x03\x00\x00"
    extension = b"!\xf9\x04\x00\x00\x00\x00\x00"  # graphic control block before the frame
    data = b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0, 0, 0) + extension + descriptor
    assert image_info(data) == ImageInfo("image/gif", 4, 4)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"\x89P", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"]),
    rest=st.binary(max_size=200),
)
def test_garbage_never_raises(prefix: bytes, rest: bytes) -> None:
    info = image_info(prefix + rest)
    assert info is None or (info.width > 0 and info.height > 0 and info.media_type.startswith("image/"))
