"""Fixtures of the foundation tests: an img2dataset output built from real photos, small URL lists."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # foundation_support, for tests and spawned workers

from foundation_support import write_img2dataset


@pytest.fixture(scope="session")
def jpeg_photos(photo_dir: Path) -> list[dict]:
    """Manifest rows of the JPEG photos (sorted by file name)."""
    with open(photo_dir / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["format"] == "JPEG"]
    return sorted(rows, key=lambda r: r["file"])


@pytest.fixture(scope="session")
def i2d_dir(tmp_path_factory, jpeg_photos: list[dict], photo_dir: Path) -> Path:
    """An img2dataset output of 2 shards x 6 rows (5 downloaded real photos + 1 failure each)."""
    return write_img2dataset(tmp_path_factory.mktemp("i2d") / "i2d", jpeg_photos, photo_dir)


@pytest.fixture(scope="session")
def url_rows(laion_sample: Path) -> list[dict]:
    """The first 40 LAION rows as ``{"URL", "TEXT"}`` dicts."""
    return pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 40).to_pylist()
