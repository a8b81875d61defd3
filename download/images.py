"""Decode, check, resize and re-encode one downloaded image with Pillow (thread-safe, GIL released).

Resize modes follow img2dataset's: ``keep_ratio`` scales the smaller side to ``image_size``,
``center_crop`` then crops the centre square, ``keep_ratio_largest`` scales the larger side,
``border`` then pads to a white square, ``no`` keeps the size. JPEGs are decoded in draft mode at the
smallest 1/2, 1/4 or 1/8 scale that still covers the target size; downscaling then averages
areas (Pillow's BOX filter, as img2dataset's INTER_AREA) and upscaling uses Lanczos.
EXIF orientation is applied; palette, greyscale, CMYK and alpha images become RGB
(alpha composited on white); animated images keep their first frame.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from mmcurate.download.config import DownloadConfig
from mmcurate.shards.image_check import STORED_FORMATS, decode_with

ENCODE_FORMATS = {ext: name for name, ext in STORED_FORMATS.items()}  # Pillow's format name by extension

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Encoded:
    """A stored image and what is known of its source."""

    data: bytes
    format: str
    width: int
    height: int
    original_width: int
    original_height: int


def process_image(data: bytes, opts: DownloadConfig) -> Encoded | str:
    """Decode ``data`` and return the re-encoded image, or a rejection reason (the checks of
    :mod:`mmcurate.shards.image_check`, which ingested images pass too, and the size filters)."""
    return decode_with(data, opts.max_pixels, lambda im: _process(im, opts))


def _process(im: Image.Image, opts: DownloadConfig) -> Encoded | str:
    orientation = _orientation(im)
    swapped = orientation in (5, 6, 7, 8)
    width, height = (im.height, im.width) if swapped else im.size
    reason = _check_size(width, height, opts)
    if reason:
        return reason
    target = resized_size(width, height, opts)
    if target is not None and target[0] * target[1] > opts.max_pixels:
        return "decompression_bomb"  # e.g. a 1 x 100000 strip scaled to 256 px on its short side
    if target is not None and im.format == "JPEG":
        tw, th = target
        im.draft("RGB", (th, tw) if swapped else (tw, th))
    im.load()
    im = to_rgb(im)
    if target is not None:
        tw, th = target
        size = (th, tw) if swapped else (tw, th)
        if size != im.size:
            # img2dataset's defaults: area averaging (BOX) down, Lanczos up.
            im = im.resize(size, Image.Resampling.LANCZOS if size[0] > im.size[0] else Image.Resampling.BOX)
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    if target is not None:
        im = _crop_or_pad(im, opts.resize_mode, opts.image_size)
    out = io.BytesIO()
    fmt = ENCODE_FORMATS[opts.encode_format]
    if fmt == "PNG":
        im.save(out, fmt, compress_level=opts.encode_quality)
    else:
        im.save(out, fmt, quality=opts.encode_quality)
    return Encoded(out.getvalue(), opts.encode_format, im.width, im.height, width, height)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable: broken EXIF must not cost the image)."""
    if "exif" not in im.info and im.format != "TIFF":
        return 1
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- Pillow raises many types on malformed EXIF
        return 1
    return value if isinstance(value, int) else 1


def _check_size(width: int, height: int, opts: DownloadConfig) -> str | None:
    if min(width, height) < opts.min_image_size:
        return "image_too_small"
    if opts.max_image_area is not None and width * height > opts.max_image_area:
        return "image_area_too_large"
    if opts.max_aspect_ratio is not None and max(width, height) / min(width, height) > opts.max_aspect_ratio:
        return "aspect_ratio_too_large"
    return None


def resized_size(width: int, height: int, opts: DownloadConfig) -> tuple[int, int] | None:
    """The size before any crop or pad (img2dataset's rounding), or None when the resize step is skipped."""
    if opts.resize_mode == "no":
        return None
    side = min(width, height) if opts.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
    if opts.resize_only_if_bigger and side <= opts.image_size:
        return None
    scale = opts.image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _crop_or_pad(im: Image.Image, mode: str, size: int) -> Image.Image:
    if mode == "center_crop" and (im.width > size or im.height > size):
        w, h = min(im.width, size), min(im.height, size)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        return im.crop((left, top, left + w, top + h))
    if mode == "border" and (im.width < size or im.height < size):
        canvas = Image.new("RGB", (max(im.width, size), max(im.height, size)), (255, 255, 255))
        canvas.paste(im, ((canvas.width - im.width) // 2, (canvas.height - im.height) // 2))
        return canvas
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (palette, greyscale, CMYK, 16-bit inputs)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode.startswith("I"):
        im = im.convert("I").point(lambda v: v / 256).convert("L")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")
