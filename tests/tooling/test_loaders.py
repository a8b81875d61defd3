"""Shards load as they are with open_clip's training data pipeline and Hugging Face datasets."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from mmcurate.engines.local import run_local
from mmcurate.pipelines.config import parse_pipeline


@pytest.fixture(scope="module")
def wds_output(img2dataset_output: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loaders") / "out"
    pipeline = parse_pipeline(
        {"input": {"path": str(img2dataset_output)}, "output": {"path": str(out), "rows_per_shard": 4}, "workers": 1, "stages": []}
    )
    run_local(pipeline, progress=False)
    return out


def test_sizes_json_counts_the_samples_of_each_tar(wds_output: Path):
    sizes = json.loads((wds_output / "shards" / "sizes.json").read_text())
    assert sorted(sizes) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(sizes.values()) == 10


def test_open_clip_training_pipeline_reads_the_tars(wds_output: Path):
    from open_clip_train.data import get_wds_dataset

    def preprocess(image):
        return torch.zeros(3, 8, 8) + image.size[0]

    def tokenizer(texts):
        return torch.tensor([[len(t)] for t in texts])

    args = Namespace(
        train_data=str(wds_output / "shards" / "{00000..00002}.tar"),
        val_data=None,
        train_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=5,
        workers=0,
        world_size=1,
        distributed=False,
    )
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    assert data.dataloader.num_samples == 10  # from shards/sizes.json: open_clip needs no --train-num-samples
    images, texts = next(iter(data.dataloader))
    assert images.shape == (5, 3, 8, 8) and texts.shape == (5, 1)


def test_hugging_face_datasets_loads_tars_and_meta(wds_output: Path, jpeg_photos: list[dict]):
    from datasets import load_dataset

    tars = load_dataset("webdataset", data_files=str(wds_output / "shards" / "*.tar"), split="train")
    assert len(tars) == 10
    assert {"jpg", "txt", "json"} <= set(tars.column_names)
    assert set(tars["txt"]) <= {p["caption_if_known"] for p in jpeg_photos} and tars[0]["txt"]
    meta = load_dataset("parquet", data_files=str(wds_output / "meta" / "*.parquet"), split="train")
    assert sorted(meta["key"]) == sorted(s["key"] for s in tars["json"])
