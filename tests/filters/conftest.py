"""Fixtures of the filter tests: real photos as an mmcurate dataset, a tiny open_clip model, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.tests.support.filters import write_dataset, write_tiny_clip


@pytest.fixture(scope="session")
def photos(photo_dir: Path) -> pa.Table:
    """The 53 images as kept rows: image bytes, sizes from the manifest, known captions (else null)."""
    with open(photo_dir / "manifest.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    n = len(rows)
    int32 = pa.int32()
    return pa.table(
        {
            "key": [r["file"].rsplit(".", 1)[0] for r in rows],
            "url": [f"https://photos.example.org/{r['file']}" for r in rows],
            "caption": [r["caption_if_known"] or None for r in rows],
            "image": [(photo_dir / r["file"]).read_bytes() for r in rows],
            "image_format": ["png" if r["format"] == "PNG" else "jpg" for r in rows],
            "width": pa.array([int(r["width"]) for r in rows], int32),
            "height": pa.array([int(r["height"]) for r in rows], int32),
            "original_width": pa.array([int(r["width"]) for r in rows], int32),
            "original_height": pa.array([int(r["height"]) for r in rows], int32),
            "status": ["ok"] * n,
            "reject_stage": pa.nulls(n, pa.string()),
            "reject_reason": pa.nulls(n, pa.string()),
        }
    )


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory, photos: pa.Table) -> Path:
    """The photos as a 2-shard mmcurate dataset (input format ``mmcurate``)."""
    return write_dataset(tmp_path_factory.mktemp("photos") / "dataset", photos)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny randomly initialised open_clip ViT saved as a local folder: ``local-dir:PATH``."""
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
