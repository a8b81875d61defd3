"""Fixtures shared by every test folder. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmcurate.tests.support import DATA, img2dataset_layout

# No model hub is reachable: fail fast instead of waiting for a network time-out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``tests/data``: real public test data, each folder with its license and attribution."""
    return DATA


@pytest.fixture(scope="session")
def laion_sample(data_dir: Path) -> Path:
    """1,000 real LAION URL/caption rows (columns URL, TEXT)."""
    return data_dir / "url_caption_samples" / "test_1000.parquet"


@pytest.fixture(scope="session")
def photo_dir(data_dir: Path) -> Path:
    """53 CC-licensed / public-domain images with manifest.csv (sources, sizes, licenses, COCO captions)."""
    return data_dir / "images"


@pytest.fixture(scope="session")
def jpeg_photos(photo_dir: Path) -> list[dict]:
    """Manifest rows of the JPEG photos (sorted by file name)."""
    return img2dataset_layout.jpeg_photos(photo_dir)


@pytest.fixture(scope="session")
def img2dataset_output(tmp_path_factory: pytest.TempPathFactory, jpeg_photos: list[dict], photo_dir: Path) -> Path:
    """An img2dataset output (webdataset format) of 2 shards x 6 rows: 5 downloaded real photos and
    1 failed download each."""
    return img2dataset_layout.write_img2dataset(tmp_path_factory.mktemp("i2d") / "i2d", jpeg_photos, photo_dir)
