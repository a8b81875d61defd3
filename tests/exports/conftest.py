"""Fixtures of the export tests: the COCO photos grounded with COCO's own boxes, as mmcurate outputs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.tests.support.coco import coco_grounded_table
from mmcurate.tests.support.filters import write_dataset


@pytest.fixture(scope="session")
def grounded(photo_dir: Path) -> pa.Table:
    return coco_grounded_table(photo_dir)


@pytest.fixture(scope="session")
def grounded_output(tmp_path_factory: pytest.TempPathFactory, grounded: pa.Table) -> Path:
    """The grounded photos as a 3-shard WebDataset mmcurate output."""
    return write_dataset(tmp_path_factory.mktemp("grounded") / "out", grounded, shards=3, output_format="webdataset")
