"""Fixtures of the foundation tests: small URL lists."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="session")
def url_rows(laion_sample: Path) -> list[dict]:
    """The first 40 LAION rows as ``{"URL", "TEXT"}`` dicts."""
    return pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 40).to_pylist()
