"""Fixtures of the loader and training tests: the COCO photos as curated mmcurate outputs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.schemas import BY_NAME
from mmcurate.tests.support.coco import coco_grounded_table
from mmcurate.tests.support.filters import write_dataset


@pytest.fixture(scope="session")
def curated(photo_dir: Path) -> pa.Table:
    """The 36 grounded COCO photos with capfilt's ``captions`` (a web candidate that differs from the
    grounded ``caption``, two scored synthetic ones) and a ``clip_score`` (null on every seventh row)."""
    table = coco_grounded_table(photo_dir)
    captions, scores = [], []
    for i, key in enumerate(table.column("key").to_pylist()):
        captions.append(
            [
                {"text": f"web alt-text of {key}", "source": "web", "score": 0.6},
                {"text": f"first synthetic caption of {key}", "source": "synthetic", "score": (i % 3) / 3},
                {"text": f"second synthetic caption of {key}", "source": "synthetic", "score": 0.5},
            ]
        )
        scores.append(None if i % 7 == 0 else (i * 37 % 100) / 100)
    table = table.append_column("captions", pa.array(captions, BY_NAME["captions"].type))
    return table.append_column("clip_score", pa.array(scores, pa.float32()))


@pytest.fixture(scope="session")
def curated_output(tmp_path_factory: pytest.TempPathFactory, curated: pa.Table) -> Path:
    """``curated`` as a 6-shard WebDataset output."""
    return write_dataset(tmp_path_factory.mktemp("curated") / "out", curated, shards=6, output_format="webdataset")


@pytest.fixture(scope="session")
def web_only_output(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """The COCO photos without capfilt's columns, as a 3-shard Parquet output."""
    return write_dataset(tmp_path_factory.mktemp("web_only") / "out", coco_grounded_table(photo_dir), shards=3, output_format="parquet")
