"""exact_dedup and phash_dedup through the real local runner, duplicates spread over shards."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mmcurate.cli import main
from mmcurate.tests.support.foundation import key_of, register


def read(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))], promote_options="permissive")


def test_exact_then_phash_across_shards(tmp_path: Path, i2d_copies: Path, photo_rows: list[dict]) -> None:
    out = tmp_path / "out"
    pipeline = {
        "input": {"path": str(i2d_copies), "format": "img2dataset"},
        "output": {"path": str(out), "format": "parquet", "rows_per_shard": 5},
        "workers": 1,
        "stages": ["exact_dedup", {"phash_dedup": {"max_distance": 4}}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(tmp_path / "p.yaml"), "--no-progress"]) == 0

    kept, rejects = read(out / "shards"), read(out / "rejects")
    shard_of = {
        k: int(p.stem)
        for folder in ("shards", "rejects")
        for p in (out / folder).glob("*.parquet")
        for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()
    }
    assert len(shard_of) == kept.num_rows + rejects.num_rows == len(photo_rows)  # rows in = kept + rejected
    assert len(set(shard_of.values())) == 5
    summary = sum(1 for _ in (out / "_stats").glob("*.json"))
    assert summary == 5

    sha = {r["key"]: hashlib.sha256(r["image"]).hexdigest() for r in kept.to_pylist()}
    by_key = {r["key"]: r for r in rejects.to_pylist()}
    by_reason: dict[str, list[dict]] = {}
    for r in by_key.values():
        by_reason.setdefault(r["reject_reason"], []).append(r)
    identical = sum(1 for r in photo_rows if r["kind"].startswith("copy"))
    # The broken image never reaches the dedup stages: the reader checks ingested images.
    assert {k: len(v) for k, v in by_reason.items()} == {"duplicate_image": identical, "near_duplicate_image": 4, "decode_error": 1}
    crossed = 0
    for r in by_reason["duplicate_image"]:
        assert r["reject_stage"] == "exact_dedup"
        assert r["duplicate_of"] in sha and r["sha256"] == sha[r["duplicate_of"]]  # a kept row with the same bytes
        assert r["key"] > r["duplicate_of"]
        crossed += shard_of[r["key"]] != shard_of[r["duplicate_of"]]
    assert crossed >= 1
    assert all(r["sha256"] for r in by_reason["duplicate_image"])  # computed where img2dataset left it out
    for r in by_reason["near_duplicate_image"]:
        assert r["reject_stage"] == "phash_dedup" and r["duplicate_of"] in sha and r["phash"] is not None
        assert (
            r["caption"].split()[1] == next(k for k in kept.to_pylist() if k["key"] == r["duplicate_of"])["caption"].split()[1]
        )  # same photo
    assert by_reason["decode_error"][0]["reject_stage"] == "read"
    # One sample of each photo is kept, and nothing else.
    assert sorted(int(c.split()[1]) for c in kept.column("caption").to_pylist()) == list(range(10))
    assert kept.column("duplicate_of").null_count == kept.num_rows


def test_minhash_across_shards(tmp_path: Path, caption_corpus: dict) -> None:
    """Caption near-duplicates found across shards of a URL list; every removed row names a kept one."""
    docs = caption_corpus["docs"]
    source = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"URL": [f"https://example.com/{i}.jpg" for i in range(len(docs))], "TEXT": docs}), source)
    out = tmp_path / "out"
    pipeline = {
        "input": {"path": str(source), "url_col": "URL", "caption_col": "TEXT"},
        "output": {"path": str(out), "format": "parquet", "rows_per_shard": 400},
        "workers": 1,
        "stages": ["minhash_dedup"],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(tmp_path / "p.yaml"), "--no-progress"]) == 0
    kept, rejects = read(out / "shards"), read(out / "rejects")
    assert kept.num_rows + rejects.num_rows == len(docs)
    assert "_minhash" not in kept.column_names and "_minhash" not in rejects.column_names
    assert set(rejects.column("reject_reason").to_pylist()) == {"duplicate_caption"}
    assert set(rejects.column("duplicate_of").to_pylist()) <= set(kept.column("key").to_pylist())
    # Against exact-Jaccard truth: >= 95% of the surplus copies go (planted ones lie 1,000+ rows, so
    # several shards, after their sources), no duplicate set loses every row, <= 1% of distinct rows go.
    comp = caption_corpus["components"]
    rows = [int(u.rsplit("/", 1)[1].split(".")[0]) for u in rejects.column("url").to_pylist()]
    removed = np.bincount([comp[i] for i in rows], minlength=len(docs))
    sizes = np.bincount(comp, minlength=len(docs))
    assert np.all(removed[sizes > 1] < sizes[sizes > 1])
    assert removed[sizes == 1].sum() <= 0.01 * (sizes == 1).sum()
    assert np.minimum(removed, np.maximum(sizes - 1, 0)).sum() >= 0.95 * (sizes - 1).clip(0).sum()


def test_chained_dedups_point_at_the_kept_copy(tmp_path: Path, monkeypatch) -> None:
    """Exact caption dedup keeps b of {b, c}; minhash then removes b as a near-duplicate of a. c's
    duplicate_of follows b on to a, the copy that is kept (b's own pointer), not the removed b."""
    register(monkeypatch)
    a, b, c = sorted(range(3), key=lambda row: key_of("urls.csv", row))  # rows by key: the smallest key of a cluster is kept
    text = "a brown dog runs across the green field today"
    captions = {a: f"{text} again", b: text, c: text, 3: "something else entirely"}
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        csv.writer(f).writerows([("url", "caption"), *((f"http://a/{i}.jpg", captions[i]) for i in range(4))])
    out = tmp_path / "out"
    pipeline = {
        "input": {"path": "urls.csv"},
        "output": {"path": str(out), "rows_per_shard": 2},
        "workers": 1,
        "stages": ["caption_dedup", {"minhash_dedup": {"ngram": 1}}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(tmp_path / "p.yaml"), "--no-progress"]) == 0
    kept, rejects = read(out / "shards"), read(out / "rejects")
    found = {r["key"]: (r["reject_stage"], r["duplicate_of"]) for r in rejects.to_pylist()}
    ka, kb, kc = (key_of("urls.csv", row) for row in (a, b, c))
    assert found == {kb: ("minhash_dedup", ka), kc: ("caption_dedup", ka)}
    assert set(kept.column("key").to_pylist()) == {ka, key_of("urls.csv", 3)}
