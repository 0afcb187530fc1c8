"""Image format and size from a file's first bytes, for the common formats, without Pillow.

Opening a file with Pillow costs several times more than reading and hashing a small image, so
imports read PNG, JPEG, GIF, BMP and WebP headers here and ask Pillow only about other formats and
headers this module finds unusual (it answers ``None`` then, never a guess). The answers match
Pillow's ``Image.open(...).size`` and ``Image.MIME[format]`` for the files it accepts.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["HEADER_BYTES", "ImageInfo", "image_info"]

# The largest header a caller needs to pass: JPEG frame headers may follow up to 64 KiB of EXIF.
HEADER_BYTES = 256 * 2**10

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR = b"\x00\x00\x00\x0dIHDR"  # the first chunk: its length (13) and type
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): the others in C0-CF are DHT
# (C4), JPG (C8) and DAC (CC), which hold no frame size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
# BMP info-header sizes Pillow reads, and the compressions it decodes (RAW, RLE8, RLE4, BITFIELDS).
_BMP_HEADERS = frozenset({40, 52, 56, 64, 108, 124})
_BMP_COMPRESSIONS = frozenset({0, 1, 2, 3})
_BMP_BITS = frozenset({1, 2, 4, 8, 16, 24, 32})


class ImageInfo(NamedTuple):
    media_type: str
    width: int
    height: int


def image_info(header: bytes) -> ImageInfo | None:
    """The media type and pixel size of the image whose file starts with ``header``.

    ``None`` when the bytes are not one of the formats read here, are truncated before the size,
    or are unusual in a way Pillow might read differently: the caller then asks Pillow.
    """
    parse = _PARSERS.get(header[:2])
    return parse(header) if parse is not None else None


def _png(data: bytes) -> ImageInfo | None:
    if data[:8] != _PNG_SIGNATURE or data[8:16] != _PNG_IHDR or len(data) < 33:
        return None
    # The chunk's CRC (over type and data) tells a PNG from bytes that merely start like one.
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return _sized("image/png", width, height, 2**31 - 1)


def _jpeg(data: bytes) -> ImageInfo | None:
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None  # segments must follow one another: this is not a well-formed header
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1  # fill byte before a marker
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 9 > end:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return _sized("image/jpeg", width, height, 0xFFFF)
        if marker == 0xE2 and data[pos + 4 : pos + 8] == b"MPF\x00":
            return None  # a multi-picture file: Pillow calls some of these MPO, let it decide
        if marker in (0xD9, 0xDA) or length < 2:
            return None  # image end or scan data before any frame header
        pos += 2 + length
    return None


def _gif(data: bytes) -> ImageInfo | None:
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 13:
        return None
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # skip the global colour table
    end = len(data)
    # Pillow grows the canvas to fit the first frame: find that frame and check that it fits.
    while pos < end:
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks each led by its length
            pos += 2
            while pos < end and data[pos]:
                pos += data[pos] + 1
            pos += 1
        elif block == 0x2C:  # image descriptor
            if pos + 9 > end:
                return None
            left, top, frame_width, frame_height = struct.unpack_from("<HHHH", data, pos + 1)
            if left + frame_width > width or top + frame_height > height:
                return None
            return _sized("image/gif", width, height, 0xFFFF)
        else:
            return None  # trailer or garbage before the first frame
    return None


def _bmp(data: bytes) -> ImageInfo | None:
    if len(data) < 30:
        return None
    header_size = int.from_bytes(data[14:18], "little")
    if header_size == 12:  # OS/2 core header: 16-bit sizes, raw pixels
        width, height, _, bits = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif header_size in _BMP_HEADERS and len(data) >= 34:
        width, height, _, bits, compression = struct.unpack_from("<iiHHI", data, 18)
        if height < 0 and data[25] == 0xFF:
            height = -height  # top-down rows; Pillow reads other negative heights differently
    else:
        return None
    if bits not in _BMP_BITS or compression not in _BMP_COMPRESSIONS:
        return None  # Pillow refuses (or special-cases) these: let it say so
    return _sized("image/bmp", width, height, 2**31 - 1)


def _webp(data: bytes) -> ImageInfo | None:
    if data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack_from("<HH", data, 26)
        return _sized("image/webp", width & 0x3FFF, height & 0x3FFF, 0x3FFF)
    if chunk == b"VP8L":  # lossless: a signature byte, then 14-bit sizes minus one
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return _sized("image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 0x4000)
    if chunk == b"VP8X":  # extended: the canvas, 24-bit sizes minus one
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return _sized("image/webp", width, height, 2**24)
    return None


def _sized(media_type: str, width: int, height: int, limit: int) -> ImageInfo | None:
    """The answer, or ``None`` for an empty or out-of-range size (Pillow's to judge)."""
    if 0 < width <= limit and 0 < height <= limit:
        return ImageInfo(media_type, width, height)
    return None


# Parsers by the first two bytes of the file (each checks the rest of its signature).
_PARSERS: dict[bytes, Callable[[bytes], ImageInfo | None]] = {
    _PNG_SIGNATURE[:2]: _png,
    b"\xff\xd8": _jpeg,
    b"GI": _gif,
    b"BM": _bmp,
    b"RI": _webp,
}
