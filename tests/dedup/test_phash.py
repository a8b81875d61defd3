"""pHash dedup: resized and re-encoded copies of real photos are caught, different photos are not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from mmcurate.dedup.phash import PhashDedup, chunks
from mmcurate.stages.base import reject


def encode(data: bytes, size: int, fmt: str, quality: int = 80) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, fmt, quality=quality)
        return buf.getvalue()


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(photo_dir.iterdir()) if p.suffix in (".jpg", ".png")]


def table(images: list[bytes | None]) -> pa.Table:
    keys = [f"{i:04d}" for i in range(len(images))]
    return reject(pa.table({"key": keys, "image": pa.array(images, pa.binary())}), np.zeros(len(images), bool), "x")


def test_copies_are_caught_and_distinct_photos_kept(photos: list[bytes]) -> None:
    copies = [
        (i, encode(photos[i], size, fmt, q))
        for i in range(0, len(photos), 3)
        for size, fmt, q in ((128, "JPEG", 60), (300, "WEBP", 50), (512, "PNG", 0))
    ]
    stage = PhashDedup()
    processed = stage.process(table(photos + [c for _, c in copies]))
    assert processed.column("reject_reason").null_count == processed.num_rows
    decision = stage.decide(processed.select(["key", "phash"]))
    removed = dict(zip(decision.column("key").to_pylist(), decision.column("duplicate_of").to_pylist(), strict=True))
    expected = {f"{len(photos) + n:04d}": f"{i:04d}" for n, (i, _) in enumerate(copies)}
    assert removed == expected
    assert set(decision.column("reject_reason").to_pylist()) == {"near_duplicate_image"}


def test_missing_and_broken_images_are_rejected(photos: list[bytes]) -> None:
    processed = PhashDedup().process(table([photos[0], None, b"\x89PNG\r\n\x1a\n truncated", photos[0][:200]]))
    assert processed.column("reject_reason").to_pylist() == [None, "image_missing", "undecodable_image", "undecodable_image"]
    assert processed.column("phash").to_pylist()[1:] == [None, None, None]


@pytest.mark.parametrize("max_distance", [0, 2, 4, 7])
def test_pigeonhole_groups_find_every_pair_within_the_distance(max_distance: int) -> None:
    """Random hashes and copies with up to ``max_distance`` flipped bits: every such pair is a candidate and verified,
    and no pair farther apart."""
    rng = np.random.default_rng(max_distance)
    base = rng.integers(0, 2**64, 200, dtype=np.uint64)
    flips = [rng.choice(64, rng.integers(0, max_distance + 2), replace=False) for _ in base]
    near = np.array([b ^ np.uint64(sum(1 << int(f) for f in fl)) for b, fl in zip(base, flips, strict=True)], np.uint64)
    values = np.concatenate([base, near]).view(np.int64)
    keys = [f"{i:04d}" for i in range(len(values))]
    stage = PhashDedup.from_params({"max_distance": max_distance})
    t = pa.table({"key": keys, "phash": pa.array(values, pa.int64())})
    decision = stage.decide(t)
    duplicate_of = dict(zip(decision.column("key").to_pylist(), decision.column("duplicate_of").to_pylist(), strict=True))
    for i, fl in enumerate(flips):  # random hashes lie ~32 bits apart: a copy can only match its own original
        assert (duplicate_of.get(keys[i + len(base)]) == keys[i]) == (len(fl) <= max_distance)
    assert sum(w for _, w in chunks(max_distance)) == 64


def test_verify_treats_missing_hashes_as_distinct() -> None:
    stage = PhashDedup()
    a = pa.table({"phash": pa.array([1, None, 5], pa.int64())})
    b = pa.table({"phash": pa.array([3, 1, None], pa.int64())})
    assert pc.fill_null(stage.verify(a, b), False).to_pylist() == [True, False, False]
