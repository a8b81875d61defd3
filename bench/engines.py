"""The same CPU pipelines on the local, Ray and Spark engines, in one run, on the same cores.

Pipelines: ``per-shard`` = caption_quality + language (fastText: a stage with setup(), an actor on
Ray); ``with-dedup`` = the same + minhash_dedup (a global stage: Ray shuffles / Spark joins, then a
second segment). Input: ``--rows`` caption-only rows made from the real LAION and COCO captions and
English sentences: each row joins the start of one real caption to the end of another, so rows are
distinct; 10 % are real sentences in other languages (for the language filter) and ``--dup-rate``
are copies of other rows with up to two words replaced: near duplicates.

Engine start-up (``ray.init``, the Spark session) is timed apart and excluded from the throughput;
everything else (worker processes, actors, global step, writes) is included.

    python bench/engines.py [--rows 150000] [--dup-rate 0.15] [--workers 2] [--engines local,ray,spark] [--repeat 1]
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
PIPELINES = {
    "per-shard": ["caption_quality", "language"],  # no global stage: shards stream through
    "with-dedup": ["caption_quality", "language", "minhash_dedup"],  # + a global step and a second segment
}


def captions(n: int, dup_rate: float, seed: int = 0) -> list[str]:
    """``n`` captions spliced from real English ones (distinct), 10 % real sentences in 29 other
    languages, and ``dup_rate`` of them copies of other rows with up to two words replaced."""
    texts = [t for t in pq.read_table(DATA / "url_caption_samples" / "test_1000.parquet", columns=["TEXT"]).column("TEXT").to_pylist() if t]
    with open(DATA / "coco_captions" / "captions.tsv", newline="") as f:
        texts += [r["caption"] for r in csv.DictReader(f, delimiter="\t")]
    with open(DATA / "langid" / "sentences.tsv", newline="") as f:
        sentences = list(csv.DictReader(f, delimiter="\t"))
    texts += [r["text"] for r in sentences if r["lang_iso639_1"] == "en"]
    foreign = [r["text"].split() for r in sentences if r["lang_iso639_1"] != "en"]
    base = [t.split() for t in texts if len(t.split()) >= 4]
    rng = random.Random(seed)
    rows = [rng.choice(foreign) for _ in range(n // 10)]
    for _ in range(n - len(rows) - int(n * dup_rate)):
        a, b = rng.choice(base), rng.choice(base)
        rows.append(a[: rng.randint(2, len(a) - 1)] + b[rng.randint(1, len(b) - 2) :])
    for _ in range(int(n * dup_rate)):
        words = list(rng.choice(rows))
        for _ in range(rng.choice((0, 1, 1, 2))):  # a word replaced, or none: stays above the threshold
            words[rng.randrange(len(words))] = rng.choice(rng.choice(base))
        rows.append(words)
    rng.shuffle(rows)
    return [" ".join(words) for words in rows]


def _pipeline(input_path: Path, out: Path, stages: list, engine: str, workers: int, rows_per_shard: int):
    return parse_pipeline(
        {
            "input": {"path": str(input_path)},
            "output": {"path": str(out), "format": "parquet", "rows_per_shard": rows_per_shard},
            "stages": stages,
            "engine": engine,
            "workers": workers,
        }
    )


def _start(engine: str, workers: int) -> object | None:
    """Start the engine (timed apart); return what to stop afterwards."""
    if engine == "ray":
        import ray
        from mmcurate.engines.ray_runner import connect

        connect(workers, object_store_memory=1 << 30)
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
    parser.add_argument("--repeat", type=int, default=1, help="runs per engine and pipeline; the fastest counts (later runs find warm workers)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmcurate-bench-engines-"))
    try:
        docs = captions(args.rows, args.dup_rate)
        input_path = work / "captions.parquet"
        pq.write_table(
            pa.table({"url": [f"https://example.com/{i}.jpg" for i in range(len(docs))], "caption": docs}),
            input_path,
            row_group_size=args.rows_per_shard,
        )
        results: dict[str, dict[str, tuple[float, int]]] = {name: {} for name in PIPELINES}
        startups = {}
        for engine in args.engines.split(","):
            start = time.perf_counter()
            handle = _start(engine, args.workers)
            startups[engine] = time.perf_counter() - start
            for name, stages in PIPELINES.items():
                for attempt in range(args.repeat):
                    out = work / f"{engine}-{name}-{attempt}"
                    start = time.perf_counter()
                    summary = run_pipeline(_pipeline(input_path, out, stages, engine, args.workers, args.rows_per_shard), progress=False)
                    elapsed = time.perf_counter() - start
                    shutil.rmtree(out)
                    if engine not in results[name] or elapsed < results[name][engine][0]:
                        results[name][engine] = (elapsed, summary["kept"])
            if handle is not None:
                getattr(handle, "shutdown", getattr(handle, "stop", None))()
        print(
            f"{args.rows} caption rows ({args.dup_rate:.0%} near duplicates), {-(-args.rows // args.rows_per_shard)} shards, "
            f"{args.workers} workers, best of {args.repeat}"
        )
        print("engine start-up (excluded below): " + ", ".join(f"{e} {s:.1f} s" for e, s in startups.items()))
        print(f"{'pipeline':11} {'engine':7} {'run s':>7} {'rows/s':>8} {'vs local':>9} {'kept':>7}")
        for name, by_engine in results.items():
            base = by_engine.get("local", (0.0, 0))[0]
            for engine, (elapsed, kept) in by_engine.items():
                ratio = f"{base / elapsed:.2f}x" if base else "-"
                print(f"{name:11} {engine:7} {elapsed:7.1f} {args.rows / elapsed:8.0f} {ratio:>9} {kept:7}")
            agree = len({kept for _, kept in by_engine.values()}) == 1
            print(f"{name:11} {'same kept rows on every engine' if agree else 'ENGINES DISAGREE on kept rows'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
