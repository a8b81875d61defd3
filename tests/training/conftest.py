"""Fixtures of the loader and training tests: the COCO photos as curated mmcurate outputs, a real run's output, tiny BLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.engines.local import run_local
from mmcurate.pipelines.config import parse_pipeline
from mmcurate.schemas import BY_NAME
from mmcurate.tests.support.capfilt import photo_table, write_tiny_blip
from mmcurate.tests.support.coco import coco_grounded_table
from mmcurate.tests.support.filters import write_dataset, write_tiny_clip
from mmcurate.tests.support.img2dataset_layout import write_img2dataset


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


CURATED_THRESHOLD = 0.6  # the capfilt threshold curated_output's run.json records: only 2/3 passes


@pytest.fixture(scope="session")
def curated_output(tmp_path_factory: pytest.TempPathFactory, curated: pa.Table) -> Path:
    """``curated`` as a 6-shard WebDataset output whose run.json records capfilt's threshold, :data:`CURATED_THRESHOLD`."""
    out = write_dataset(tmp_path_factory.mktemp("curated") / "out", curated, shards=6, output_format="webdataset")
    record = {"pipeline": {"stages": [{"capfilt": {}}]}, "shards": 6, "models": [{"stage": "capfilt", "threshold": CURATED_THRESHOLD}]}
    record["finished"] = "2026-12-01T00:00:00+00:00"  # a finished run: the loader reads no unfinished one
    (out / "run.json").write_text(json.dumps(record))
    return out


@pytest.fixture(scope="session")
def capfilt_output(tmp_path_factory: pytest.TempPathFactory, jpeg_photos: list[dict], photo_dir: Path, tiny_blip_models: dict) -> Path:
    """A real capfilt run over 8 photos (tiny BLIP captioner, tiny CLIP filter, threshold 0, ``mode: score``: every
    row is kept, some candidates pass and some do not), one photo without a web caption and one with a blank one."""
    root = tmp_path_factory.mktemp("capfilt")
    table = photo_table(jpeg_photos, photo_dir, 8)
    captions = table.column("caption").to_pylist()
    table = table.set_column(table.column_names.index("caption"), "caption", pa.array([captions[0], None, " ", *captions[3:]], pa.string()))
    (root / "clip").mkdir()
    capfilt = {"captioner": tiny_blip_models["captioner"], "filter_model": write_tiny_clip(root / "clip"), "num_captions": 3}
    stages = [{"capfilt": {**capfilt, "threshold": 0.0, "mode": "score", "caption_choice": "synthetic_first"}}]
    source = write_dataset(root / "src", table, shards=2)
    config = {"input": {"path": str(source)}, "output": {"path": str(root / "out")}, "workers": 1, "stages": stages}
    assert run_local(parse_pipeline(config), progress=False)["kept"] == 8
    return root / "out"


@pytest.fixture(scope="session")
def web_only_output(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """The COCO photos without capfilt's columns, as a 3-shard Parquet output."""
    return write_dataset(tmp_path_factory.mktemp("web_only") / "out", coco_grounded_table(photo_dir), shards=3, output_format="parquet")


@pytest.fixture(scope="session")
def tiny_blip_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"captioner": DIR, "itm": DIR}``: tiny random BLIP models saved as local folders."""
    return write_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="session")
def pipeline_output(tmp_path_factory: pytest.TempPathFactory, jpeg_photos: list[dict], photo_dir: Path, tiny_blip_models: dict) -> Path:
    """A real mmcurate run over 44 photos in img2dataset's layout (4 failed downloads, 7 without a
    caption): size filter, caption quality, exact dedup and capfilt (tiny BLIP, ``mode: score``),
    written as 4 WebDataset shards."""
    root = tmp_path_factory.mktemp("pipeline")
    source = write_img2dataset(root / "i2d", jpeg_photos, photo_dir, shards=4, rows=11)
    capfilt = {"captioner": tiny_blip_models["captioner"], "filter_model": tiny_blip_models["itm"], "num_captions": 2, "batch_size": 8}
    stages = [{"image_size": {"min_side": 200}}, {"caption_quality": {"min_words": 3}}, {"exact_dedup": {}}]
    # Every candidate passes and `caption` stays the web text, distinct per photo: the tiny random captioner's
    # synthetic captions are often identical, which leaves a contrastive loss nothing to learn.
    stages.append({"capfilt": {**capfilt, "mode": "score", "threshold": 0.0, "caption_choice": "web_first"}})
    config = {"input": {"path": str(source)}, "output": {"path": str(root / "out"), "rows_per_shard": 11}, "workers": 1, "stages": stages}
    summary = run_local(parse_pipeline(config), progress=False)
    assert summary["rows_in"] == 44 and 0 < summary["rejected"] < 44
    return root / "out"
