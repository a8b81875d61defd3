"""WebDataset tar writing throughput: mmcurate's tar writer against tarfile and webdataset's TarWriter.

Rows: caption-only samples (key, url, caption and the ledger columns, as a caption dedup writes them),
captions drawn from the real LAION and COCO captions of ``tests/data``. Each writer makes one tar
in memory per ``--rows``-row shard: mmcurate's column-wise writer (``shards.writers.tar_bytes``),
the member-by-member ``tarfile`` loop it replaced (the same bytes), and ``webdataset.TarWriter``
(the library's own writer, fed the same dicts). Rates are samples per CPU-second of this process
(best of ``--repeat``); ratios are measured in the same run.

    python bench/writers.py [--rows 10000] [--shards 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate.schemas import NOT_IN_JSON
from mmcurate.shards.writers import tar_bytes

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def shard(rows: int, seed: int) -> pa.Table:
    texts = pq.read_table(DATA / "url_caption_samples" / "test_1000.parquet", columns=["TEXT"]).column("TEXT").to_pylist()
    with open(DATA / "coco_captions" / "captions.tsv", newline="") as f:
        texts += [r["caption"] for r in csv.DictReader(f, delimiter="\t")]
    captions = [texts[(seed * rows + i) % len(texts)] for i in range(rows)]
    nulls = pa.nulls(rows, pa.string())
    return pa.table(
        {
            "key": [f"{seed:05d}{i:011d}" for i in range(rows)],
            "url": [f"https://example.com/{seed}/{i}.jpg" for i in range(rows)],
            "caption": captions,
            "reject_stage": nulls,
            "reject_reason": nulls,
            "duplicate_of": nulls,
        }
    )


def tarfile_loop(table: pa.Table) -> bytes:
    """The writer mmcurate had: tarfile members one by one, json.dumps per row."""
    buf = io.BytesIO()
    rows = table.select([c for c in table.column_names if c not in NOT_IN_JSON]).to_pylist()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, caption, row in zip(table.column("key").to_pylist(), table.column("caption").to_pylist(), rows, strict=True):
            for name, data in (
                (f"{key}.txt", (caption or "").encode()),
                (f"{key}.json", json.dumps({"key": key, **row}, ensure_ascii=False).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def webdataset_writer(table: pa.Table) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    rows = table.select([c for c in table.column_names if c not in NOT_IN_JSON]).to_pylist()
    with wds.TarWriter(buf) as sink:
        for key, caption, row in zip(table.column("key").to_pylist(), table.column("caption").to_pylist(), rows, strict=True):
            sink.write({"__key__": key, "txt": caption or "", "json": {"key": key, **row}})
    return buf.getvalue()


def rate(write: Callable[[pa.Table], bytes], shards: list[pa.Table], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for table in shards:
            write(table)
        best = min(best, time.process_time() - start)
    return sum(t.num_rows for t in shards) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows per shard (mmcurate's default)")
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pa.set_cpu_count(1)
    shards = [shard(args.rows, s) for s in range(args.shards)]
    assert all(tar_bytes(t) == tarfile_loop(t) for t in shards[:1]), "the writers disagree"
    print(f"{args.shards} shards x {args.rows} caption-only rows; samples per CPU-second (best of {args.repeat})")
    ours = rate(tar_bytes, shards, args.repeat)
    peers = {"tarfile member loop (mmcurate's previous writer)": rate(tarfile_loop, shards, args.repeat)}
    peers["webdataset TarWriter"] = rate(webdataset_writer, shards, args.repeat)
    print(f"{'mmcurate tar_bytes (column-wise)':52s} {ours:>10,.0f} samples/s")
    for name, value in peers.items():
        print(f"{name:52s} {value:>10,.0f} samples/s   ratio mmcurate / this: {ours / value:.1f}x")


if __name__ == "__main__":
    main()
