"""The same CPU pipelines on the local, Ray and Spark engines, in one run, on the same cores.

Pipelines: ``per-shard`` = caption_quality + language (fastText: a stage with setup(), an actor on
Ray); ``with-dedup`` = the same + minhash_dedup (a global stage: Ray shuffles / Spark joins, then a
second segment). Input: ``--rows`` caption-only rows made from the real LAION and COCO captions and
English sentences: each row joins the start of one real caption to the end of another, so rows are
distinct; 10 % are real sentences in other languages (for the language filter) and ``--dup-rate``
are copies of other rows with up to two words replaced: near duplicates.

Each pipeline runs on two inputs, ``--rows`` and ``--scale`` times as many. Engine start-up
(``ray.init``, the Spark session) is timed apart and excluded. Throughput is the extra rows of the
larger input over the extra seconds it took: what every run pays once, whatever its size (worker
processes and actor pools starting, fastText loading, Ray Data planning), cancels out and is shown
apart as the per-run cost. ``end-to-end`` compares whole runs on the larger input, everything included.

    python bench/engines.py [--rows 150000] [--scale 3] [--dup-rate 0.15] [--workers 2] [--engines local,ray,spark]
        [--pipelines per-shard,with-dedup] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate.engines import run_pipeline
from mmcurate.pipelines.config import parse_pipeline

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
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
    parser.add_argument("--rows", type=int, default=150_000, help="rows of the smaller input")
    parser.add_argument("--scale", type=int, default=3, help="the larger input has rows x scale rows")
    parser.add_argument("--dup-rate", type=float, default=0.15, help="fraction of rows that are perturbed copies")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", default="local,ray,spark")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="which of: " + ", ".join(PIPELINES))
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine, pipeline and input; the median counts")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmcurate-bench-engines-"))
    try:
        sizes = (args.rows, args.rows * args.scale)
        inputs = {n: _write_input(work / f"captions-{n}.parquet", captions(n, args.dup_rate), args.rows_per_shard) for n in sizes}
        engines = args.engines.split(",")
        pipelines = {name: PIPELINES[name] for name in args.pipelines.split(",")}
        startups, handles = {}, []
        for engine in engines:
            start = time.perf_counter()
            handles.append(_start(engine, args.workers))
            startups[engine] = time.perf_counter() - start
        # Engines take turns, run after run, so that a slower or busier spell of the machine falls
        # on all of them; the median run counts.
        times: dict[tuple[str, str, int], list[float]] = {}
        kept: dict[tuple[str, int], set[int]] = {}
        for attempt in range(args.repeat):
            for n, input_path in inputs.items():
                for name, stages in pipelines.items():
                    for engine in engines:
                        out = work / f"{engine}-{name}-{n}-{attempt}"
                        start = time.perf_counter()
                        pipeline = _pipeline(input_path, out, stages, engine, args.workers, args.rows_per_shard)
                        summary = run_pipeline(pipeline, progress=False)
                        times.setdefault((name, engine, n), []).append(time.perf_counter() - start)
                        kept.setdefault((name, n), set()).add(summary["kept"])
                        shutil.rmtree(out)
        for handle in handles:
            if handle is not None:
                getattr(handle, "shutdown", getattr(handle, "stop", None))()
        _report(args, sizes, engines, list(pipelines), startups, times, kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_input(path: Path, docs: list[str], rows_per_shard: int) -> Path:
    table = pa.table({"url": [f"https://example.com/{i}.jpg" for i in range(len(docs))], "caption": docs})
    pq.write_table(table, path, row_group_size=rows_per_shard)
    return path


def _report(
    args: argparse.Namespace, sizes: tuple[int, int], engines: list[str], pipelines: list[str], startups: dict, times: dict, kept: dict
) -> None:
    """Per pipeline and engine: median run times on both inputs; throughput = extra rows / extra
    seconds (what every run pays once, whatever its size, cancels out) and that per-run cost."""
    small, large = sizes
    print(
        f"caption rows: {small} and {large} ({args.dup_rate:.0%} near duplicates, {args.rows_per_shard} rows per shard), "
        f"{args.workers} workers, median of {args.repeat} runs, engines taking turns"
    )
    print("engine start-up (excluded): " + ", ".join(f"{e} {s:.1f} s" for e, s in startups.items()))
    print(f"{'pipeline':11} {'engine':7} {'run s':>13} {'throughput':>12} {'vs ' + engines[0]:>9} {'per-run s':>10} {'end-to-end':>11}")
    for name in pipelines:
        medians = {e: [statistics.median(times[(name, e, n)]) for n in sizes] for e in engines}
        rates = {e: (large - small) / (t_large - t_small) for e, (t_small, t_large) in medians.items()}
        for engine, (t_small, t_large) in medians.items():
            rate, base = rates[engine], engines[0]
            print(
                f"{name:11} {engine:7} {t_small:6.1f} {t_large:6.1f} {rate:8.0f} r/s {rate / rates[base]:8.2f}x "
                f"{t_small - small / rate:10.1f} "
                f"{medians[base][1] / t_large:10.2f}x"
            )
        agree = all(len(kept[(name, n)]) == 1 for n in sizes)
        print(f"{name:11} {'same kept rows on every engine' if agree else 'ENGINES DISAGREE on kept rows'}")


if __name__ == "__main__":
    main()
