"""mmcurate.loaders.CuratedDataset: the split across ranks and workers, caption choice, grounding
targets as the exports write them, score bounds at load time, fsspec URLs, usage errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from mmcurate.errors import UsageError
from mmcurate.exports import FORMATS, ExportOptions, export
from mmcurate.loaders import CuratedDataset
from mmcurate.tests.support.filters import write_dataset


def size(image) -> tuple[int, int]:
    return image.size


def keys_seen(dataset: CuratedDataset, workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda sample: sample["key"])
    return list(loader)


def test_two_workers_on_two_ranks_see_every_sample_exactly_once(curated_output: Path, curated: pa.Table) -> None:
    every = sorted(curated.column("key").to_pylist())
    for shuffle in (False, True):
        seen = []
        for rank in range(2):
            dataset = CuratedDataset(str(curated_output), rank=rank, world_size=2, shuffle=shuffle, transform=lambda im: 0)
            seen += keys_seen(dataset, workers=2)
        counts = Counter(seen)
        assert sorted(counts) == every and set(counts.values()) == {1}


def test_each_reader_gets_its_own_shards(curated_output: Path) -> None:
    parts = [CuratedDataset(str(curated_output), rank=r, world_size=4).my_shards() for r in range(4)]
    assert sorted(s for part in parts for s in part) == list(range(6)) and all(parts)
    dataset = CuratedDataset(str(curated_output), rank=0, world_size=1, shuffle=True, seed=3)
    orders = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        orders.append(dataset.my_shards())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(6)) and orders[0] != orders[1]


def test_images_decode_and_transform_applies(curated_output: Path, curated: pa.Table) -> None:
    sizes = dict(zip(curated.column("key").to_pylist(), zip(curated.column("width").to_pylist(), curated.column("height").to_pylist())))
    sample = next(iter(CuratedDataset(str(curated_output))))
    assert sample["image"].mode == "RGB" and sample["image"].size == sizes[sample["key"]]
    dataset = CuratedDataset(str(curated_output), transform=lambda im: torch.tensor(im.size))
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 2) and [tuple(s.tolist()) for s in batch["image"]] == [sizes[k] for k in batch["key"]]


def test_web_and_synthetic_captions(curated_output: Path, curated: pa.Table) -> None:
    web = {s["key"]: s for s in CuratedDataset(str(curated_output), transform=size)}
    assert len(web) == curated.num_rows
    assert all(s["caption"] == f"web alt-text of {k}" and s["caption_source"] == "web" for k, s in web.items())
    synthetic = {s["key"]: s["caption"] for s in CuratedDataset(str(curated_output), caption="synthetic", transform=size)}
    for i, key in enumerate(curated.column("key").to_pylist()):  # the higher-scoring one: 2/3 beats 0.5
        assert synthetic[key] == (f"first synthetic caption of {key}" if i % 3 == 2 else f"second synthetic caption of {key}")


def test_caption_mix_is_seeded_per_key_and_epoch(curated_output: Path) -> None:
    def sources(p: float, seed: int = 0, epoch: int = 0) -> dict[str, str]:
        dataset = CuratedDataset(str(curated_output), caption=p, seed=seed, transform=size)
        dataset.set_epoch(epoch)
        return {s["key"]: s["caption_source"] for s in dataset}

    mix = sources(0.5)
    share = sum(v == "synthetic" for v in mix.values()) / len(mix)
    assert 0.2 < share < 0.8
    assert sources(0.5) == mix  # deterministic
    assert sources(0.5, epoch=1) != mix and sources(0.5, seed=1) != mix
    assert set(sources(0.0).values()) == {"web"} and set(sources(1.0).values()) == {"synthetic"}
    high = sources(0.8)
    assert all(high[k] == "synthetic" for k, v in mix.items() if v == "synthetic")  # one draw per key: a larger p only adds


def test_web_only_output_without_capfilt(web_only_output: Path, curated: pa.Table) -> None:
    samples = list(CuratedDataset(str(web_only_output), transform=size))
    captions = dict(zip(curated.column("key").to_pylist(), curated.column("caption").to_pylist()))
    assert len(samples) == curated.num_rows and all(s["caption"] == captions[s["key"]] for s in samples)
    with pytest.raises(UsageError, match="captions"):
        CuratedDataset(str(web_only_output), caption=0.8)


def written(fmt: str, dest: Path) -> dict[str, dict]:
    """What ``mmcurate export FMT`` wrote for each key, by the names of the loader's fields."""
    if fmt == "grit":
        rows = pa.concat_tables([pq.read_table(p) for p in sorted(dest.glob("*.parquet"))]).to_pylist()
        return {r["key"]: {"target": r["caption"], "noun_chunks": r["noun_chunks"], "ref_exps": r["ref_exps"]} for r in rows}
    if fmt == "llava":
        entries = json.loads((dest / "llava.json").read_text())
        return {e["id"]: {"prompt": e["conversations"][0]["value"], "target": e["conversations"][1]["value"]} for e in entries}
    lines = [json.loads(line) for p in sorted(dest.glob("*.jsonl")) for line in p.read_text().splitlines()]
    return {line["key"]: {"target": line["text"], **({"prompt": line["prompt"]} if "prompt" in line else {})} for line in lines}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_grounding_targets_are_what_the_export_writes(fmt: str, curated_output: Path, tmp_path: Path) -> None:
    export(fmt, str(curated_output), str(tmp_path / fmt), ExportOptions(seed=5))
    expected = written(fmt, tmp_path / fmt)
    least = FORMATS[fmt].min_boxes  # the export skips rows with fewer boxes
    dataset = CuratedDataset(str(curated_output), grounding=fmt, seed=5, min={"num_boxes": least} if least else None, transform=size)
    got = {s["key"]: {k: v for k, v in s.items() if k not in ("key", "image", "caption", "caption_source")} for s in dataset}
    assert got == expected and len(got) >= 20
    assert any(e.get("noun_chunks") or "<" in e["target"] or "[[" in e["target"] for e in got.values()) == (fmt != "llava")


def test_grounding_skips_rows_without_a_caption_as_the_export_does(curated: pa.Table, tmp_path: Path) -> None:
    captions = curated.column("caption").to_pylist()
    table = curated.set_column(curated.column_names.index("caption"), "caption", pa.array([None, *captions[1:]], pa.string()))
    out = write_dataset(tmp_path / "out", table, shards=2)
    assert export("kosmos2", str(out), str(tmp_path / "export"), ExportOptions(min_boxes=0))["skipped"] == {"caption_missing": 1}
    keys = {s["key"] for s in CuratedDataset(str(out), grounding="kosmos2", transform=size)}
    assert keys == set(table.column("key").to_pylist()[1:])


def test_grounding_skips_the_rows_the_export_skips_and_says_so(curated: pa.Table, tmp_path: Path, caplog) -> None:
    rows = curated.to_pylist()
    grounded = [i for i, r in enumerate(rows) if r["num_boxes"]]
    boxless = [i for i, r in enumerate(rows) if not r["num_boxes"]]
    rows[grounded[0]]["caption"] = "a caption rewritten after its spans were taken"  # span_mismatch, but for llava
    rows[grounded[1]]["caption"] += " <image> [[1,2,3,4]] <|im_end|> <ref>"  # reserved_markup, but for grit
    rows[boxless[0]]["caption"] = "<patch_index_0001> " + rows[boxless[0]]["caption"]  # reserved_markup for kosmos2, florence2
    out = write_dataset(tmp_path / "out", pa.Table.from_pylist(rows, schema=curated.schema), shards=3)
    for fmt in FORMATS:
        caplog.clear()
        record = export(fmt, str(out), str(tmp_path / fmt), ExportOptions(min_boxes=0, seed=5))
        expected = written(fmt, tmp_path / fmt)
        dataset = CuratedDataset(str(out), grounding=fmt, seed=5, transform=size)
        got = {s["key"]: {k: v for k, v in s.items() if k not in ("key", "image", "caption", "caption_source")} for s in dataset}
        assert got == expected and len(got) == len(rows) - sum(record["skipped"].values()), fmt
        markup = {"grit": 0, "kosmos2": 2, "florence2": 2}.get(fmt, 1)
        reasons = {"span_mismatch": int(FORMATS[fmt].grounded), "reserved_markup": markup}
        assert record["skipped"] == {reason: n for reason, n in reasons.items() if n}, fmt
        warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        assert all(f"{reason}: {n}" in warned for reason, n in record["skipped"].items()), (fmt, warned)
        if fmt == "florence2":  # a row without a box: its plain caption, as training.md says
            assert all(got[rows[i]["key"]]["target"] == rows[i]["caption"] for i in boxless[1:])


def test_llava_targets_need_no_grounding_column(curated: pa.Table, tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "out", curated.drop_columns(["grounding"]), shards=2)
    samples = list(CuratedDataset(str(out), grounding="llava", transform=size))
    assert len(samples) == curated.num_rows and all(s["prompt"].startswith("<image>\n") for s in samples)
    with pytest.raises(UsageError, match="no 'grounding' column, which grit targets"):
        CuratedDataset(str(out), grounding="grit")


def test_score_bounds_select_at_load_time(curated_output: Path, curated: pa.Table) -> None:
    rows = curated.select(["key", "clip_score"]).to_pylist()
    dataset = CuratedDataset(str(curated_output), min={"clip_score": 0.3}, max={"clip_score": 0.8}, columns=["clip_score"], transform=size)
    got = {s["key"]: s["clip_score"] for s in dataset}
    expected = {r["key"] for r in rows if r["clip_score"] is not None and 0.3 <= r["clip_score"] <= 0.8}
    assert set(got) == expected and 0 < len(expected) < len(rows)
    assert all(0.3 <= v <= 0.8 for v in got.values())


def test_reads_an_fsspec_url(curated_output: Path, curated: pa.Table) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(curated_output), "/loaders-test/out", recursive=True)
    try:
        keys = [s["key"] for s in CuratedDataset("memory://loaders-test/out", transform=size)]
    finally:
        fs.rm("/loaders-test", recursive=True)
    assert sorted(keys) == sorted(curated.column("key").to_pylist())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"caption": "best"}, "caption must be"),
        ({"caption": 1.5}, "caption must be"),
        ({"grounding": "coco"}, "grounding must be one of kosmos2, qwen-vl, qwen2-vl, cogvlm, florence2, grit, llava"),
        ({"shuffle_buffer": 0}, "shuffle_buffer must be at least 1"),
        ({"min": {"aesthetic": 5.0}}, "no 'aesthetic' column"),
        ({"columns": ["nope"]}, "no 'nope' column"),
    ],
)
def test_bad_options_are_usage_errors(options: dict, message: str, curated_output: Path) -> None:
    with pytest.raises(UsageError, match=message):
        CuratedDataset(str(curated_output), **options)


def test_a_folder_that_is_not_an_output(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an mmcurate output"):
        CuratedDataset(str(tmp_path))
