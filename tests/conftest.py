"""Fixtures shared by every test folder. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
