"""Caption MinHash + LSH throughput: mmcurate's minhash_dedup against datasketch (and rensa).

Corpus: the 1,000 real LAION captions and 795 COCO captions, perturbed (words replaced, inserted,
deleted; case and punctuation changed) into ``--docs`` documents. 128 permutations, word 3-grams,
threshold 0.8. Everything runs in this one process, one thread; shingling is included in every
signature figure. Rates are documents per CPU-second of this process (``time.process_time``), so
other work on the machine does not skew them; ratios are measured in the same run.

Then a whole command as a user runs it: ``mmcurate stage minhash_dedup`` with default options
(``--workers`` = CPU count) on ``--cli-docs`` captions in one Parquet file, timed in **wall seconds**
from process start to exit (interpreter start, imports, planning, reading, signatures, LSH and the
global step, writing the output in its default format, Parquet for captions, and the run's
bookkeeping), against datasketch ``MinHash.bulk`` on the same captions (shingling included,
signatures only, no LSH) in wall seconds in this process, in the same run. The command's CPU-seconds
(its processes together) are printed beside it; ``--output-format webdataset`` (tars) is timed too.

    python bench/minhash.py [--docs 100000] [--loop-docs 5000] [--cli-docs 200000] [--repeat 2]

Last measured (``--repeat 3``, this project's shared 2-core machine): per document, signatures + LSH 132k docs/s
against datasketch bulk 32.6k (4.0x) and bulk + MinHashLSH 15.0k (8.8x); the whole command 1.86 s against
``MinHash.bulk`` 6.02 s in the same run (3.24x; 2.28 s, 2.64x, with ``--output-format webdataset``).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate.dedup.minhash import SIGNATURE, MinhashDedup
from mmcurate.stages.base import reject

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # rensa (imported later): one core, like everything else here

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SHARD = 10_000
_STRIP = str.maketrans("", "", string.punctuation)


def corpus(n: int, seed: int = 0) -> list[str]:
    laion = [t for t in pq.read_table(DATA / "url_caption_samples" / "test_1000.parquet", columns=["TEXT"]).column("TEXT").to_pylist() if t]
    with open(DATA / "coco_captions" / "captions.tsv", newline="") as f:
        coco = [r["caption"] for r in csv.DictReader(f, delimiter="\t")]
    base = laion + coco
    vocab = [w for t in base for w in t.split()]
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = rng.choice(base).split()
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3, 4, 6))):
            op = rng.random()
            if op < 0.35:
                words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
            elif op < 0.7 and len(words) > 1:
                words[rng.randrange(len(words))] = rng.choice(vocab)
            elif len(words) > 1:
                words.pop(rng.randrange(len(words)))
        text = " ".join(words)
        docs.append(text.upper() if rng.random() < 0.05 else text + ("!" if rng.random() < 0.05 else ""))
    return docs


def py_shingles(text: str, n: int = 3) -> list[bytes]:
    """The same shingles in plain Python, as a datasketch or rensa user would write them."""
    words = text.lower().translate(_STRIP).split()
    if len(words) < n:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})


def best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return min(times), result


def ours(docs: list[str]) -> tuple[float, float, int]:
    stage = MinhashDedup()
    table = pa.table({"key": [f"{i:08d}" for i in range(len(docs))], "caption": docs})
    table = reject(table, np.zeros(len(docs), bool), "unused")
    start = time.process_time()
    parts = [stage.process(table.slice(i, SHARD)).select(["key", SIGNATURE]) for i in range(0, len(docs), SHARD)]
    signed = time.process_time()
    decision = stage.decide(pa.concat_tables(parts))
    return signed - start, time.process_time() - signed, decision.num_rows


def datasketch_loop(docs: list[str]) -> None:
    from datasketch import MinHash

    for d in docs:
        m = MinHash(num_perm=128)
        for s in py_shingles(d):
            m.update(s)


def datasketch_bulk(docs: list[str]) -> list:
    from datasketch import MinHash

    return MinHash.bulk([py_shingles(d) for d in docs], num_perm=128)


def datasketch_lsh(sigs: list) -> int:
    """MinHashLSH: query each document, then insert it; count those with a verified earlier match."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    removed = 0
    for i, m in enumerate(sigs):
        if any(sigs[j].jaccard(m) >= 0.8 for j in lsh.query(m)):
            removed += 1
        lsh.insert(i, m)
    return removed


def rensa_signatures(docs: list[str]) -> list:
    from rensa import RMinHash

    matrix = RMinHash.digest_matrix_from_token_sets([py_shingles(d) for d in docs], 128, 1)
    return matrix.to_rows()


def cli_run(docs: list[str], *options: str) -> tuple[float, float]:
    """(wall seconds, CPU-seconds of all its processes) of ``mmcurate stage minhash_dedup`` on ``docs``, default options."""
    with tempfile.TemporaryDirectory(prefix="mmcurate-bench-") as tmp:
        src = Path(tmp) / "captions.parquet"
        pq.write_table(pa.table({"url": [f"https://example.com/{i}.jpg" for i in range(len(docs))], "caption": docs}), src)
        cmd = [sys.executable, "-m", "mmcurate.cli", "stage", "minhash_dedup", "--input", str(src), "--output", f"{tmp}/out", *options]
        before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_CHILDREN)
        shutil.rmtree(f"{tmp}/out")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def wall_best(fn: Callable[[], object], repeat: int) -> float:
    """The best wall seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_document(args: argparse.Namespace) -> None:
    """The per-document figures (docs per CPU-second of this process) on ``args.docs`` documents."""
    docs = corpus(args.docs)
    n = len(docs)
    words = np.mean([len(d.split()) for d in docs])
    print(f"{n} documents (mean {words:.1f} words), 128 permutations, word 3-grams, threshold 0.8; docs per CPU-second")

    t_ours, (sig_s, lsh_s, removed) = best(lambda: ours(docs), args.repeat)
    t_loop, _ = best(lambda: datasketch_loop(docs[: args.loop_docs]), 1)
    t_bulk, sigs = best(lambda: datasketch_bulk(docs), args.repeat)
    t_lsh, ds_removed = best(lambda: datasketch_lsh(sigs), 1)
    t_rensa, _ = best(lambda: rensa_signatures(docs), args.repeat)

    rows = [
        ("mmcurate signatures (process, 10k-row shards)", n / sig_s),
        ("mmcurate LSH (decide: bands, pairs, verify, components)", n / lsh_s),
        ("mmcurate signatures + LSH", n / t_ours),
        ("datasketch MinHash per-document update loop", args.loop_docs / t_loop),
        ("datasketch MinHash.bulk", n / t_bulk),
        ("datasketch MinHashLSH query + insert", n / t_lsh),
        ("datasketch bulk + MinHashLSH", n / (t_bulk + t_lsh)),
        ("rensa RMinHash digest matrix + to_rows", n / t_rensa),
    ]
    for name, rate in rows:
        print(f"{name:58s} {rate:>10,.0f} docs/s")
    print(f"ratio mmcurate signatures+LSH / datasketch bulk+LSH: {(t_bulk + t_lsh) / t_ours:.1f}x")
    print(f"ratio mmcurate signatures+LSH / datasketch bulk alone: {t_bulk / t_ours:.1f}x")
    print(f"ratio mmcurate signatures / datasketch bulk: {t_bulk / sig_s:.1f}x; / rensa + to_rows: {t_rensa / sig_s:.1f}x")
    print(f"duplicates removed: mmcurate {removed}, datasketch LSH {ds_removed} ({100 * removed / n:.1f}% vs {100 * ds_removed / n:.1f}%)")


def main() -> None:
    pa.set_cpu_count(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000, help="documents for the per-document figures (0: skip them)")
    parser.add_argument("--loop-docs", type=int, default=5_000, help="documents for the slow per-document datasketch loop")
    parser.add_argument("--cli-docs", type=int, default=200_000, help="captions for the whole-command figure (0: skip it)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.docs:
        per_document(args)
    if args.cli_docs:
        cli_docs = corpus(args.cli_docs, seed=1)
        m = len(cli_docs)
        t_cli_bulk = wall_best(lambda: datasketch_bulk(cli_docs), args.repeat)
        print(f"\nwhole command on {m} captions, default options ({os.cpu_count()} workers), wall seconds from process start to exit")
        print(f"{'datasketch MinHash.bulk, signatures only (this process)':58s} {t_cli_bulk:6.2f} s {m / t_cli_bulk:>10,.0f} docs/s")
        for label, options in (("default output (Parquet)", ()), ("--output-format webdataset", ("--output-format", "webdataset"))):
            wall, cpu = min(cli_run(cli_docs, *options) for _ in range(args.repeat))
            print(f"{'mmcurate stage minhash_dedup, ' + label:58s} {wall:6.2f} s {m / wall:>10,.0f} docs/s ({cpu:.2f} CPU-s)")
            print(f"ratio whole command ({label}) / datasketch bulk, wall: {t_cli_bulk / wall:.2f}x")


if __name__ == "__main__":
    main()
