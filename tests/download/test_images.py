"""The image path alone: resize modes as img2dataset's, formats and modes converted, guards."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mmcurate.download.config import DownloadConfig
from mmcurate.download.images import Encoded, process_image, resized_size


def decode(result: Encoded | str) -> Image.Image:
    assert isinstance(result, Encoded), result
    im = Image.open(io.BytesIO(result.data))
    assert im.size == (result.width, result.height)
    return im


@pytest.mark.parametrize(
    ("mode", "only_bigger", "source", "expected"),
    [
        ("keep_ratio", False, (640, 428), (383, 256)),
        ("keep_ratio", False, (100, 50), (512, 256)),  # upscaled
        ("keep_ratio", True, (100, 50), (100, 50)),
        ("keep_ratio_largest", False, (640, 428), (256, 171)),
        ("center_crop", False, (640, 428), (256, 256)),
        ("center_crop", True, (200, 100), (200, 100)),
        ("border", False, (640, 428), (256, 256)),
        ("border", True, (200, 100), (200, 100)),
        ("no", False, (640, 428), (640, 428)),
    ],
)
def test_resize_modes(mode, only_bigger, source, expected):
    im = Image.new("RGB", source, (200, 30, 30))
    data = io.BytesIO()
    im.save(data, "JPEG")
    result = process_image(data.getvalue(), DownloadConfig(resize_mode=mode, resize_only_if_bigger=only_bigger))
    assert decode(result).size == expected
    assert (result.original_width, result.original_height) == source


def test_resized_size_rounds_like_img2dataset():
    # albumentations' smallest_max_size / longest_max_size round each side.
    assert resized_size(500, 333, DownloadConfig()) == (384, 256)
    assert resized_size(333, 500, DownloadConfig(resize_mode="keep_ratio_largest")) == (170, 256)


def test_border_pads_with_white_and_centres():
    im = Image.new("RGB", (400, 200), (0, 0, 0))
    data = io.BytesIO()
    im.save(data, "PNG")
    out = decode(process_image(data.getvalue(), DownloadConfig(resize_mode="border", encode_format="png")))
    assert out.getpixel((128, 10)) == (255, 255, 255)  # padding above
    assert out.getpixel((128, 128)) == (0, 0, 0)  # the image in the middle


def test_formats_and_modes_become_rgb(images):
    cfg = DownloadConfig(encode_format="png")
    for name in ("jpeg", "png", "webp", "gif", "cmyk", "rgba", "exif", "grey", "palette"):
        out = decode(process_image(images[name], cfg))
        assert out.mode == "RGB", name


def test_animated_gif_keeps_the_first_frame(images):
    first = Image.open(io.BytesIO(images["gif"])).convert("RGB").resize((383, 256))
    out = decode(process_image(images["gif"], DownloadConfig(encode_format="png"))).convert("RGB")
    diff = sum(abs(a - b) for a, b in zip(first.resize((32, 21)).tobytes(), out.resize((32, 21)).tobytes(), strict=True))
    assert diff / (32 * 21 * 3) < 12


def test_exif_orientation_is_applied(images):
    result = process_image(images["exif"], DownloadConfig())
    assert (result.original_width, result.original_height, result.width, result.height) == (428, 640, 256, 383)


def test_draft_decoding_keeps_quality_close_to_full_decode(photo_dir):
    """A 2x-downscaled JPEG decoded in draft mode matches a full decode + resize closely."""
    photo = Image.open(photo_dir / "coco_000000062554.jpg").convert("RGB").resize((1280, 856))
    data = io.BytesIO()
    photo.save(data, "JPEG", quality=95)
    out = decode(process_image(data.getvalue(), DownloadConfig(encode_format="png"))).convert("RGB")
    reference = photo.resize(out.size, Image.Resampling.BOX)
    diff = sum(abs(a - b) for a, b in zip(out.tobytes(), reference.tobytes(), strict=True)) / len(out.tobytes())
    assert diff < 4


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty", "not_an_image"),
        ("html", "not_an_image"),
        ("garbage", "not_an_image"),
        ("truncated", "decode_error"),
        ("corrupt", "decode_error"),
        ("bomb", "decompression_bomb"),
    ],
)
def test_bad_bytes_get_their_reason(images, name, reason):
    assert process_image(images[name], DownloadConfig()) == reason


def test_a_thin_strip_is_not_upscaled_into_a_memory_bomb():
    data = io.BytesIO()
    Image.new("RGB", (1, 400_000), (0, 0, 0)).save(data, "PNG")
    assert process_image(data.getvalue(), DownloadConfig()) == "decompression_bomb"


def test_broken_exif_does_not_cost_the_image(images):
    jpeg = images["exif"]
    start = jpeg.index(b"Exif\x00\x00") + 6
    broken = jpeg[:start] + b"\xff" * 16 + jpeg[start + 16 :]  # garbage TIFF header inside APP1
    result = process_image(broken, DownloadConfig())
    assert isinstance(result, Encoded) and (result.original_width, result.original_height) == (640, 428)
