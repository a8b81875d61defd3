"""MinHash caption dedup: shingling, signature quality, banding, and recall/precision on real captions."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mmcurate.dedup.config import MinhashConfig
from mmcurate.dedup.lsh import from_arrow, permutations, signatures
from mmcurate.dedup.minhash import SIGNATURE, MinhashDedup
from mmcurate.dedup.shingles import normalise, shingle_hashes
from mmcurate.errors import UsageError
from mmcurate.stages.base import reject
from mmcurate.tests.support.dedup import THRESHOLD, jaccard, reference_shingles


def run_stage(stage: MinhashDedup, keys: list[str], docs: list[str | None], batch: int = 10_000) -> pa.Table:
    """process() in batches of ``batch`` rows (as shards), then decide() over all of them."""
    table = pa.table({"key": pa.array(keys, pa.string()), "caption": pa.array(docs, pa.string())})
    table = reject(table, np.zeros(len(keys), bool), "unused")
    parts = [stage.process(table.slice(i, batch)) for i in range(0, table.num_rows, batch)]
    return stage.decide(pa.concat_tables(parts).select(["key", SIGNATURE]))


def test_normalise_and_shingles_match_the_reference() -> None:
    docs = ["Hello, World! The QUICK brown fox.", "two words", "x", "", None, "...", "Ünïcode – dash\u00a0nbsp  spaces", "a b c d"]
    cfg = MinhashConfig()
    assert normalise(pa.array(docs), cfg).to_pylist() == [
        "hello world the quick brown fox",
        "two words",
        "x",
        "",
        "",
        "",
        "ünïcode dash nbsp spaces",
        "a b c d",
    ]
    hashes, counts = shingle_hashes(pa.array(docs), cfg)
    assert counts.tolist() == [len(reference_shingles(d)) for d in docs] == [4, 1, 1, 0, 0, 0, 2, 2]
    # A caption's shingle hashes do not depend on the rest of the batch.
    alone = np.concatenate([shingle_hashes(pa.array([d]), cfg)[0] for d in docs])
    assert np.array_equal(hashes, alone)
    _, char_counts = shingle_hashes(pa.array(["日本語のテキスト", "ab"]), MinhashConfig(tokens="char", ngram=5))
    assert char_counts.tolist() == [4, 1]


def test_signatures_are_the_minimum_of_each_permutation() -> None:
    cfg = MinhashConfig(num_perm=16)
    hashes, counts = shingle_hashes(pa.array(["the quick brown fox jumps", "over the lazy dog", "x"]), cfg)
    matrix = signatures(hashes, counts, cfg)
    a, b = permutations(16, cfg.seed)
    starts = np.cumsum(counts) - counts
    for row, (start, count) in enumerate(zip(starts, counts, strict=True)):
        with np.errstate(over="ignore"):
            expected = (np.multiply.outer(hashes[start : start + count], a) + b).min(axis=0) >> np.uint64(32)
        assert np.array_equal(matrix[row], expected.astype(np.uint32))


def test_estimates_are_unbiased_with_the_expected_error(caption_corpus: dict) -> None:
    """On real caption pairs over the whole similarity range, the estimate errs like 128-slot MinHash should."""
    rng = random.Random(1)
    base = [d for d in caption_corpus["docs"] if d and len(d.split()) >= 6]
    vocab = [w for d in base for w in d.split()]
    left, right = [], []
    for _ in range(1500):
        words = rng.choice(base).split()
        edited = list(words)
        for _ in range(rng.randint(0, 3)):
            edited.insert(rng.randrange(len(edited) + 1), rng.choice(vocab))
        left.append(" ".join(words))
        right.append(" ".join(edited))
    exact = np.array([jaccard(reference_shingles(x), reference_shingles(y)) for x, y in zip(left, right, strict=True)])
    cfg = MinhashConfig()
    est = (signatures(*shingle_hashes(pa.array(left), cfg), cfg) == signatures(*shingle_hashes(pa.array(right), cfg), cfg)).mean(axis=1)
    theory = np.sqrt(np.mean(exact * (1 - exact) / cfg.num_perm))
    assert abs(np.mean(est - exact)) < 0.005
    assert np.sqrt(np.mean((est - exact) ** 2)) < 1.15 * theory


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_banding_keeps_pairs_at_the_threshold(threshold: float) -> None:
    cfg = MinhashConfig(threshold=threshold)
    bands, rows = cfg.lsh
    assert bands * rows <= cfg.num_perm
    assert 1 - (1 - threshold**rows) ** bands >= 0.99
    assert 1 - (1 - threshold ** (rows + 1)) ** (cfg.num_perm // (rows + 1)) < 0.99  # the most selective such banding


def test_config_is_validated() -> None:
    with pytest.raises(UsageError, match="threshold"):
        MinhashDedup.from_params({"threshold": 1.5})
    with pytest.raises(UsageError, match="bands"):
        MinhashDedup.from_params({"bands": 20})
    with pytest.raises(UsageError, match="bands x rows"):
        MinhashDedup.from_params({"bands": 20, "rows": 8})
    assert MinhashDedup.from_params({"bands": "16", "rows": "8"}).config.lsh == (16, 8)


def test_recall_and_precision_on_real_captions(caption_corpus: dict) -> None:
    """Planted copies are removed (recall >= 0.95 of surplus duplicates) while distinct captions,
    COCO paraphrases of one image included, are kept (<= 1% removed). Ground truth: exact Jaccard."""
    docs, keys, comp = caption_corpus["docs"], caption_corpus["keys"], caption_corpus["components"]
    decision = run_stage(MinhashDedup(), keys, docs, batch=700)
    removed = dict(zip(decision.column("key").to_pylist(), decision.column("duplicate_of").to_pylist(), strict=True))
    assert set(decision.column("reject_reason").to_pylist()) == {"duplicate_caption"}
    position = {k: i for i, k in enumerate(keys)}
    sizes = np.bincount(comp, minlength=len(docs))
    surplus = int(sum(s - 1 for s in sizes if s > 1))
    removed_by_comp = np.bincount([comp[position[k]] for k in removed], minlength=len(docs))
    recall = np.minimum(removed_by_comp, np.maximum(sizes - 1, 0)).sum() / surplus
    distinct = [i for i in range(len(docs)) if sizes[comp[i]] == 1 and reference_shingles(docs[i])]
    false_removals = [i for i in distinct if keys[i] in removed]
    assert surplus >= 300
    assert recall >= 0.95, recall
    assert len(false_removals) <= 0.01 * len(distinct), [docs[i] for i in false_removals]
    for key, keeper in removed.items():  # each removed caption points at a kept one, never at itself
        assert keeper not in removed and keeper != key
    # Hard negatives: no COCO caption is removed as a copy of another caption of the same image
    # unless the two really share >= THRESHOLD of their shingles.
    for key, keeper in removed.items():
        i, j = position[key], position[keeper]
        if caption_corpus["kinds"][i] == "coco" and caption_corpus["images"][i] == caption_corpus["images"][j]:
            assert comp[i] == comp[j]
    assert THRESHOLD == MinhashDedup().config.threshold


def test_planted_copies_point_at_their_source(caption_corpus: dict) -> None:
    docs, keys = caption_corpus["docs"], caption_corpus["keys"]
    decision = run_stage(MinhashDedup(), keys, docs)
    removed = dict(zip(decision.column("key").to_pylist(), decision.column("duplicate_of").to_pylist(), strict=True))
    text = dict(zip(keys, docs, strict=True))
    for key, keeper in removed.items():
        assert jaccard(reference_shingles(text[key]), reference_shingles(text[keeper])) >= 0.5


def test_empty_captions_are_not_deduplicated() -> None:
    stage = MinhashDedup()
    docs = [None, "", "!!!", None, "   ", "a red car", "A red car."]
    processed = stage.process(
        reject(
            pa.table({"key": [str(i) for i in range(len(docs))], "caption": pa.array(docs, pa.string())}), np.zeros(len(docs), bool), "x"
        )
    )
    assert processed.column(SIGNATURE).null_count == 5
    assert processed.column("reject_reason").null_count == len(docs)
    decision = stage.decide(processed.select(["key", SIGNATURE]))
    assert decision.column("key").to_pylist() == ["6"] and decision.column("duplicate_of").to_pylist() == ["5"]


def test_decision_does_not_depend_on_shards_or_row_order(caption_corpus: dict) -> None:
    docs, keys = caption_corpus["docs"], caption_corpus["keys"]
    order = list(range(len(docs)))
    random.Random(5).shuffle(order)
    one = run_stage(MinhashDedup(), keys, docs)
    other = run_stage(MinhashDedup(), [keys[i] for i in order], [docs[i] for i in order], batch=333)
    assert one.equals(other)


def test_signature_column_round_trips() -> None:
    stage = MinhashDedup(MinhashConfig(num_perm=32))
    captions = ["one two three four", None, "five six seven", "eight"]
    processed = stage.process(reject(pa.table({"key": ["a", "b", "c", "d"], "caption": captions}), np.zeros(4, bool), "x"))
    column = processed.column(SIGNATURE)
    assert column.type == pa.binary(128) and pc.binary_length(column).to_pylist() == [128, None, 128, 128]
    cfg = stage.config
    expected = signatures(*shingle_hashes(pa.array([c for c in captions if c]), cfg), cfg)
    chunked = pa.chunked_array([column.slice(0, 1), column.slice(2, 2)])  # sliced chunks, as after a filter
    assert np.array_equal(from_arrow(chunked, 32), expected)
    assert np.array_equal(from_arrow(chunked.cast(pa.binary()), 32), expected)  # as Spark hands it back
    with pytest.raises(ValueError):
        from_arrow(column, 32)  # a null signature
