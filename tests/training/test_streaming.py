"""CuratedDataset streams its shards: a batch of rows in memory, not a shard (Arrow and Python memory
both measured), with the sample sequence of reading each shard whole and shuffling it."""

from __future__ import annotations

import gc
import io
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcurate.loaders import CuratedDataset
from mmcurate.shards.writers import ParquetWriter
from mmcurate.tests.support.filters import write_dataset

ROWS = 2048


def noise_png(rng: np.random.Generator) -> bytes:
    """A 64 x 64 PNG of noise: 12 KB that no compression shrinks."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def one_large_shard(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2,048-row shard of noise images (25 MB) as a Parquet output in 64 row groups and as a WebDataset output."""
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "key": [f"k{i:04d}" for i in range(ROWS)],
            "caption": [f"caption {i}" for i in range(ROWS)],
            "image": pa.array([noise_png(rng) for _ in range(ROWS)], pa.binary()),
            "image_format": ["png"] * ROWS,
            "clip_score": pa.array([None if i % 5 == 0 else (i * 37 % 100) / 100 for i in range(ROWS)], pa.float32()),
            "reject_reason": pa.nulls(ROWS, pa.string()),
        }
    )
    root = tmp_path_factory.mktemp("large")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ParquetWriter, "row_group_bytes", table.nbytes // 64)
        parquet = write_dataset(root / "parquet", table, shards=1, output_format="parquet")
    assert pq.ParquetFile(parquet / "shards" / "00000.parquet").metadata.num_row_groups >= 64
    return {"parquet": parquet, "webdataset": write_dataset(root / "webdataset", table, shards=1, output_format="webdataset")}


def whole_shard_sequence(dataset: CuratedDataset, out: Path, least: float | None = None) -> list[str]:
    """The keys as the loader gave them when it read each shard whole: per shard of ``my_shards``, the
    rows with ``clip_score >= least``, shuffled with one rng per epoch when ``shuffle``."""
    rng = random.Random(f"{dataset.seed}:{dataset.epoch}:rows")
    folder = out / "meta" if (out / "meta").exists() else out / "shards"
    keys = []
    for shard in dataset.my_shards():
        rows = pq.read_table(folder / f"{shard:05d}.parquet", columns=["key", "clip_score"]).to_pylist()
        kept = [r["key"] for r in rows if least is None or (r["clip_score"] is not None and r["clip_score"] >= least)]
        if dataset.shuffle:
            rng.shuffle(kept)
        keys += kept
    return keys


def one_pass(dataset: CuratedDataset) -> tuple[list[str], int, int]:
    """The keys of one pass, and the most Arrow memory (sampled at each sample) and Python memory it held."""
    gc.collect()
    base, arrow, keys = pa.total_allocated_bytes(), 0, []
    tracemalloc.start()
    try:
        for sample in dataset:
            arrow = max(arrow, pa.total_allocated_bytes() - base)
            keys.append(sample["key"])
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return keys, arrow, python


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_shard_streams_through_a_batch_of_memory(fmt: str, one_large_shard: dict[str, Path]) -> None:
    out = one_large_shard[fmt]
    shard = sum(f.stat().st_size for f in (out / "shards").iterdir())
    assert shard > 25e6

    dataset = CuratedDataset(str(out), min={"clip_score": 0.3}, transform=lambda image: 0)
    keys, arrow, python = one_pass(dataset)
    assert keys == whole_shard_sequence(dataset, out, least=0.3) and len(keys) > ROWS // 2
    assert arrow < shard / 8 and python < shard / 8

    small = CuratedDataset(str(out), shuffle=True, shuffle_buffer=32, seed=1, transform=lambda image: 0)
    keys, arrow, python = one_pass(small)
    assert arrow < shard / 8 and python < shard / 8
    assert sorted(keys) == whole_shard_sequence(dataset, out) and keys != sorted(keys)
    assert one_pass(small)[0] == keys
    small.set_epoch(1)
    assert one_pass(small)[0] != keys

    whole = CuratedDataset(str(out), shuffle=True, seed=1, transform=lambda image: 0)  # the buffer holds the shard
    keys, _, python = one_pass(whole)
    assert keys == whole_shard_sequence(whole, out)
    assert python > shard / 2  # what the probe sees when a shard is held


def test_the_sample_sequence_is_that_of_whole_shards(curated_output: Path) -> None:
    """Six shards over two ranks, shuffled, with a score bound, two epochs: the keys in the same order."""
    for rank in range(2):
        for shuffle in (False, True):
            dataset = CuratedDataset(str(curated_output), rank=rank, world_size=2, shuffle=shuffle, seed=7, min={"clip_score": 0.2})
            for epoch in range(2):
                dataset.set_epoch(epoch)
                keys = [s["key"] for s in dataset]
                assert keys == whole_shard_sequence(dataset, curated_output, least=0.2) and keys
