"""The same CPU pipeline on the local, Ray and Spark engines, in one run, on the same cores.

Pipeline: caption_quality + language (fastText, a stage with setup(): an actor on Ray) +
minhash_dedup (a global stage: Ray shuffles / Spark joins) over ``--rows`` caption-only rows made
from the real LAION, COCO and multilingual (langid) sentences: each row joins the start of one real
caption to the end of another, so rows are distinct, and ``--dup-rate`` of them are perturbed
copies of earlier rows (as in bench/minhash.py), so there are near duplicates. Engine start-up (``ray.init``, the Spark session) is timed apart and excluded from
the throughput; everything else (worker processes, actors, global step, writes) is included.

    python bench/engines.py [--rows 150000] [--dup-rate 0.15] [--workers 2] [--engines local,ray,spark]
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate.engines import run_pipeline
from mmcurate.pipelines.config import parse_pipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGES = ["caption_quality", "language", "minhash_dedup"]


def captions(n: int, dup_rate: float, seed: int = 0) -> list[str]:
    """``n`` captions spliced from real ones (distinct), ``dup_rate`` of them perturbed copies."""
    laion = pq.read_table(DATA / "url_caption_samples" / "test_1000.parquet", columns=["TEXT"]).column("TEXT").to_pylist()
    texts = [t for t in laion if t]
    for name, column in (("coco_captions/captions.tsv", "caption"), ("langid/sentences.tsv", "text")):
        with open(DATA / name, newline="") as f:
            texts += [r[column] for r in csv.DictReader(f, delimiter="\t")]
    base = [t.split() for t in texts if len(t.split()) >= 4]
    rng = random.Random(seed)
    rows = []
    for _ in range(n - int(n * dup_rate)):
        a, b = rng.choice(base), rng.choice(base)
        rows.append(a[: rng.randint(2, len(a) - 1)] + b[rng.randint(1, len(b) - 2) :])
    for _ in range(int(n * dup_rate)):
        words = list(rng.choice(rows))
        for _ in range(rng.choice((0, 1, 1, 2))):  # a word replaced, or none: stays above the threshold
            words[rng.randrange(len(words))] = rng.choice(rng.choice(base))
        rows.append(words)
    rng.shuffle(rows)
    return [" ".join(words) for words in rows]


def _pipeline(input_path: Path, out: Path, engine: str, workers: int, rows_per_shard: int):
    return parse_pipeline({
        "input": {"path": str(input_path)},
        "output": {"path": str(out), "format": "parquet", "rows_per_shard": rows_per_shard},
        "stages": STAGES,
        "engine": engine,
        "workers": workers,
    })


def _start(engine: str, workers: int) -> object | None:
    """Start the engine (timed apart); return what to stop afterwards."""
    if engine == "ray":
        import ray

        ray.init(num_cpus=workers, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
        return ray
    if engine == "spark":
        from mmcurate.engines.spark_runner import session

        return session(workers)[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--dup-rate", type=float, default=0.15, help="fraction of rows that are perturbed copies")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", default="local,ray,spark")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmcurate-bench-engines-"))
    try:
        docs = captions(args.rows, args.dup_rate)
        input_path = work / "captions.parquet"
        pq.write_table(pa.table({"url": [f"https://example.com/{i}.jpg" for i in range(len(docs))], "caption": docs}), input_path, row_group_size=args.rows_per_shard)
        results = {}
        for engine in args.engines.split(","):
            start = time.perf_counter()
            handle = _start(engine, args.workers)
            startup = time.perf_counter() - start
            start = time.perf_counter()
            summary = run_pipeline(_pipeline(input_path, work / engine, engine, args.workers, args.rows_per_shard), progress=False)
            elapsed = time.perf_counter() - start
            if handle is not None:
                getattr(handle, "shutdown", getattr(handle, "stop", None))()
            results[engine] = (startup, elapsed, summary["kept"])
        print(f"{args.rows} caption rows, {args.rows // args.rows_per_shard} shards, {args.workers} workers; stages: {', '.join(STAGES)}")
        print(f"{'engine':8} {'start-up s':>10} {'run s':>8} {'rows/s':>9} {'vs local':>9} {'kept':>8}")
        base = results.get("local", (0, 0, 0))[1]
        for engine, (startup, elapsed, kept) in results.items():
            ratio = f"{base / elapsed:.2f}x" if base else "-"
            print(f"{engine:8} {startup:10.1f} {elapsed:8.1f} {args.rows / elapsed:9.0f} {ratio:>9} {kept:8}")
        kept = {r[2] for r in results.values()}
        print("same kept rows on every engine" if len(kept) == 1 else f"ENGINES DISAGREE on kept rows: {kept}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
