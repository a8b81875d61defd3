"""Fixtures shared by every test folder. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # img2dataset_layout, shared by the test folders

import img2dataset_layout  # noqa: E402

# No model hub is reachable: fail fast instead of waiting for a network time-out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repo (real test data with its licenses)."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def laion_sample(shared_data: Path) -> Path:
    """1,000 real LAION URL/caption rows (columns URL, TEXT)."""
    return shared_data / "url_caption_samples" / "test_1000.parquet"


@pytest.fixture(scope="session")
def photo_dir(shared_data: Path) -> Path:
    """53 real CC-licensed / public-domain photos with manifest.csv and COCO captions."""
    return shared_data / "images"


@pytest.fixture(scope="session")
def jpeg_photos(photo_dir: Path) -> list[dict]:
    """Manifest rows of the JPEG photos (sorted by file name)."""
    return img2dataset_layout.jpeg_photos(photo_dir)


@pytest.fixture(scope="session")
def img2dataset_output(tmp_path_factory: pytest.TempPathFactory, jpeg_photos: list[dict], photo_dir: Path) -> Path:
    """An img2dataset output (webdataset format) of 2 shards x 6 rows: 5 downloaded real photos and
    1 failed download each."""
    return img2dataset_layout.write_img2dataset(tmp_path_factory.mktemp("i2d") / "i2d", jpeg_photos, photo_dir)
