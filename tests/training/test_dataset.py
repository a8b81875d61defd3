"""mmcurate.loaders.CuratedDataset: the split across ranks and workers, caption choice, grounding
targets as the exports write them, score bounds at load time, fsspec URLs, usage errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from mmcurate.engines.local import run_local
from mmcurate.errors import UsageError
from mmcurate.exports import FORMATS, ExportOptions, export
from mmcurate.loaders import CuratedDataset
from mmcurate.pipelines.config import parse_pipeline
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


def stored_rows(out: Path) -> dict[str, dict]:
    return {r["key"]: r for path in sorted((out / "meta").glob("*.parquet")) for r in pq.read_table(path).to_pylist()}


def chosen(out: Path, caption: str | float) -> dict[str, tuple[str, str]]:
    return {s["key"]: (s["caption"], s["caption_source"]) for s in CuratedDataset(str(out), caption=caption, transform=size)}


def test_web_and_synthetic_captions(curated_output: Path, curated: pa.Table) -> None:
    web = {s["key"]: s for s in CuratedDataset(str(curated_output), transform=size)}
    assert len(web) == curated.num_rows
    assert all(s["caption"] == f"web alt-text of {k}" and s["caption_source"] == "web" for k, s in web.items())
    synthetic = chosen(curated_output, "synthetic")
    for i, key in enumerate(curated.column("key").to_pylist()):  # only 2/3 passes the recorded 0.6; 0.5, 1/3 and 0 do not
        expected = (f"first synthetic caption of {key}", "synthetic") if i % 3 == 2 else (f"web alt-text of {key}", "web")
        assert synthetic[key] == expected


def test_caption_mix_is_seeded_per_key_and_epoch(curated_output: Path, curated: pa.Table) -> None:
    def sources(p: float, seed: int = 0, epoch: int = 0) -> dict[str, str]:
        dataset = CuratedDataset(str(curated_output), caption=p, seed=seed, transform=size)
        dataset.set_epoch(epoch)
        return {s["key"]: s["caption_source"] for s in dataset}

    keys = curated.column("key").to_pylist()
    kept = {k for i, k in enumerate(keys) if i % 3 == 2}  # the rows with a synthetic caption that passed capfilt
    mix = sources(0.5)
    assert all(mix[k] == "web" for k in keys if k not in kept)
    share = sum(mix[k] == "synthetic" for k in kept) / len(kept)
    assert 0.2 < share < 0.8
    assert sources(0.5) == mix  # deterministic
    assert sources(0.5, epoch=1) != mix and sources(0.5, seed=1) != mix
    assert set(sources(0.0).values()) == {"web"} and {k for k, v in sources(1.0).items() if v == "synthetic"} == kept
    high = sources(0.8)
    assert all(high[k] == "synthetic" for k, v in mix.items() if v == "synthetic")  # one draw per key: a larger p only adds


def test_captions_follow_the_decisions_of_a_real_capfilt_run(capfilt_output: Path, caplog: pytest.LogCaptureFixture) -> None:
    [model] = json.loads((capfilt_output / "run.json").read_text())["models"]
    rows = stored_rows(capfilt_output)
    web = {k: next((c["text"] for c in r["captions"] if c["source"] == "web"), None) for k, r in rows.items()}
    passed = {k: [c for c in r["captions"] if c["source"] == "synthetic" and c["score"] >= model["threshold"]] for k, r in rows.items()}
    best = {k: max(cands, key=lambda c: c["score"])["text"] for k, cands in passed.items() if cands}
    # The run holds every case: rows whose best synthetic caption failed the filter, rows without a web
    # caption (null, blank) whose stored `caption` is capfilt's synthetic pick, one without any caption to give.
    synthetic_scores = {k: max(c["score"] for c in r["captions"] if c["source"] == "synthetic") for k, r in rows.items()}
    assert any(synthetic_scores[k] < model["threshold"] and web[k] for k in rows)
    only_synthetic = [k for k in rows if web[k] is None and k in best]
    assert only_synthetic and all(rows[k]["caption"] == best[k] for k in only_synthetic)
    assert [k for k in rows if web[k] is None and k not in best]
    assert 0 < len(best) < len(rows)

    with caplog.at_level("WARNING", logger="mmcurate.loaders.dataset"):
        assert chosen(capfilt_output, "web") == {k: (text, "web") for k, text in web.items() if text is not None}
    assert sum(int(n) for n in re.findall(r"no_web_caption: (\d+)", caplog.text)) == 2  # a warning per shard counts them
    synthetic = {k: (best[k], "synthetic") if k in best else (web[k], "web") for k in rows if k in best or web[k]}
    assert chosen(capfilt_output, "synthetic") == synthetic == chosen(capfilt_output, 1.0)
    only_web = {k: (web[k], "web") if web[k] else (best[k], "synthetic") for k in synthetic}  # a row with one of the two gets it
    assert chosen(capfilt_output, 0.0) == only_web
    mixed = chosen(capfilt_output, 0.5)
    assert set(mixed) == set(synthetic) and all(mixed[k] in (synthetic[k], only_web[k]) for k in mixed)


def test_the_threshold_comes_from_the_run_that_ran_capfilt(capfilt_output: Path, curated: pa.Table, tmp_path: Path) -> None:
    config = {"input": {"path": str(capfilt_output)}, "output": {"path": str(tmp_path / "next")}, "workers": 1}
    assert run_local(parse_pipeline({**config, "stages": [{"exact_dedup": {}}]}), progress=False)["kept"] == 8
    assert json.loads((tmp_path / "next" / "run.json").read_text())["models"] == []
    assert chosen(tmp_path / "next", "synthetic") == chosen(capfilt_output, "synthetic")
    unrecorded = write_dataset(tmp_path / "unrecorded", curated, shards=1)  # a captions column, no run.json
    with pytest.raises(UsageError, match="no run.json records the capfilt threshold"):
        CuratedDataset(str(unrecorded), caption=0.5)
    assert len(list(CuratedDataset(str(unrecorded), transform=size))) == curated.num_rows


def test_an_output_without_images_is_refused(curated: pa.Table, tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "captions_only", curated.drop_columns(["image", "image_format"]), shards=1)
    with pytest.raises(UsageError, match="holds no images"):
        CuratedDataset(str(out))


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
        ({"min": {"caption": 3}}, "min/max bound numeric columns; 'caption' holds string"),
        ({"max": {"clip_score": "0.5"}}, "min/max bounds are numbers, not '0.5'"),
        ({"columns": ["nope"]}, "no 'nope' column"),
    ],
)
def test_bad_options_are_usage_errors(options: dict, message: str, curated_output: Path) -> None:
    with pytest.raises(UsageError, match=message):
        CuratedDataset(str(curated_output), **options)


def test_a_folder_that_is_not_an_output(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an mmcurate output"):
        CuratedDataset(str(tmp_path))
