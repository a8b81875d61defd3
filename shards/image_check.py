"""Whether bytes are an image Pillow can decode: one check for downloaded and for ingested images.

Reasons: ``not_an_image`` (no image signature Pillow knows), ``decode_error`` (an image that does
not decode: truncated, corrupt), ``decompression_bomb`` (more than ``max_pixels``, read from the
header before any decoding), and for :func:`check_image` ``unsupported_format`` (an image of a
format outputs do not store, such as GIF, BMP or TIFF).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import TypeVar

from PIL import Image

MAX_PIXELS = 89_478_485  # Pillow's own default limit
# The formats outputs store (``schemas.IMAGE_EXTENSIONS``) by Pillow's name, as their extensions.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Our own pixel limit (checked from the header) replaces Pillow's global warning.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# What Pillow raises on malformed data, besides its own error types.
T = TypeVar("T")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError, ZeroDivisionError, MemoryError)


def looks_like_image(data: bytes) -> bool:
    """Whether ``data`` starts with the signature of a common image format."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image | str:
    """``data`` opened (its header read, nothing decoded yet), or the reason it cannot be."""
    if not data:
        return "not_an_image"
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return "decompression_bomb"
    except (Image.UnidentifiedImageError, *DECODE_ERRORS):
        return "decode_error" if looks_like_image(data) else "not_an_image"
    width, height = im.size
    reason = "decode_error" if width < 1 or height < 1 else "decompression_bomb" if width * height > max_pixels else None
    if reason:
        im.close()
        return reason
    return im


def decode_with(data: bytes, max_pixels: int, work: Callable[[Image.Image], T]) -> T | str:
    """``work`` applied to the opened image, or the reason ``data`` does not open or decode (see ``open_image``)."""
    im = open_image(data, max_pixels)
    if isinstance(im, str):
        return im
    try:
        return work(im)
    except Image.DecompressionBombError:
        return "decompression_bomb"
    except DECODE_ERRORS:
        return "decode_error"
    finally:
        im.close()


def _load(im: Image.Image) -> tuple[str | None]:
    """Decode the image; return its format (Pillow's name)."""
    if im.format == "JPEG":
        im.draft("RGB", (1, 1))
    im.load()
    return (im.format,)


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, None] | tuple[None, str]:
    """``(extension, None)`` when ``data`` decodes to an image of at most ``max_pixels`` in a format
    outputs store (the extension names the format of the bytes, whatever they were called), else
    ``(None, reason)``.

    JPEGs decode in draft mode (1/8 scale), which still reads every byte, so a truncated file fails.
    """
    found = decode_with(data, max_pixels, _load)
    if isinstance(found, str):
        return None, found
    ext = STORED_FORMATS.get(found[0] or "")
    return (ext, None) if ext else (None, "unsupported_format")
