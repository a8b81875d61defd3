"""The ClusterStage global step (candidate pairs, components) against plain-Python references, and exact dedup alone."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.dedup.exact import ExactDedup
from mmcurate.dedup.graph import argsort64, unique_inverse
from mmcurate.stages.base import reject


def reference_pairs(keys: list[str], groups: list[int], max_group_size: int) -> list[tuple[str, str]]:
    members: dict[int, set[str]] = defaultdict(set)
    for k, g in zip(keys, groups, strict=True):
        members[g].add(k)
    pairs = set()
    for group in members.values():
        ordered = sorted(group)
        if len(ordered) > max_group_size:
            pairs |= {(ordered[0], b) for b in ordered[1:]}
        else:
            pairs |= {(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :]}
    return sorted(pairs)


def reference_components(pairs: list[tuple[str, str]]) -> dict[str, str]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {k: find(k) for k in parent if find(k) != k}


class Fixed(ClusterStage):
    """Candidate groups as given; ``verify`` confirms every pair and records it (column ``k`` is the key)."""

    name = "t_fixed"
    global_columns = ("k",)

    def __init__(self, keys: list[str], groups: list[int], max_group_size: int) -> None:
        super().__init__()
        self.groups = pa.table({"key": pa.array(keys, pa.string()), "group": pa.array(groups, pa.int64())})
        self.max_group_size = max_group_size
        self.asked: list[tuple[str, str]] = []

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        rows = pa.compute.index_in(self.groups.column("key"), value_set=table.column("key"))
        return rows.to_numpy(), self.groups.column("group").to_numpy()

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        pairs = zip(left.column("k").to_pylist(), right.column("k").to_pylist(), strict=True)
        self.asked += [(min(a, b), max(a, b)) for a, b in pairs]
        return pa.array(np.ones(left.num_rows, bool))


def pairs_and_components(keys: list[str], groups: list[int], max_group_size: int) -> tuple[list[tuple[str, str]], pa.Table]:
    """The pairs the global step verifies, and its decision."""
    stage = Fixed(keys, groups, max_group_size)
    distinct = sorted(set(keys))
    decision = stage.decide(pa.table({"key": pa.array(distinct, pa.string()), "k": pa.array(distinct, pa.string())}))
    return sorted(stage.asked), decision


@pytest.mark.parametrize("seed", range(30))
def test_pairs_and_components_match_references(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 60)
    keys = [f"k{rng.randint(0, 40):03d}" for _ in range(n)]
    groups = [rng.randint(-(2**63), 2**63 - 1) if rng.random() < 0.3 else rng.randint(0, 6) for _ in range(n)]
    max_group_size = rng.choice([2, 4, 1000])
    pairs, decision = pairs_and_components(keys, groups, max_group_size)
    expected = reference_pairs(keys, groups, max_group_size)
    assert pairs == expected
    dups = decision.column("key").to_pylist()
    assert dict(zip(dups, decision.column("duplicate_of").to_pylist(), strict=True)) == reference_components(expected)
    assert dups == sorted(dups)


@pytest.mark.parametrize("kind", ["ids", "hashes", "equal_high_bits"])
def test_argsort64_is_a_stable_argsort(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    for n in (0, 1, 2, 7, 100, 5000):
        if kind == "ids":
            values = rng.integers(0, 50, n)
        elif kind == "hashes":
            values = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
        else:  # hash values whose high bits are equal but low bits differ: the runs sorted by value afterwards
            values = rng.choice([-3, 1, 2], n) * 2**50 + rng.integers(0, 4, n) * rng.choice([1, 2**20], n)
        values = values.astype(np.int64)
        order, ordered = argsort64(values)
        assert np.array_equal(order, np.argsort(values, kind="stable")) and np.array_equal(ordered, values[order])
        distinct, inverse = unique_inverse(values)
        expected, expected_inverse = np.unique(values, return_inverse=True)
        assert np.array_equal(distinct, expected) and np.array_equal(inverse, expected_inverse)


def test_large_groups_pair_with_their_smallest_key() -> None:
    keys = [f"{i:05d}" for i in range(3000)]
    pairs, decision = pairs_and_components(keys[::-1], [7] * 3000, 1000)
    assert pairs == [("00000", k) for k in keys[1:]]
    assert set(decision.column("duplicate_of").to_pylist()) == {"00000"} and decision.num_rows == 2999


class Valued(ClusterStage):
    """Rows of value ``v`` in groups ``v // 4`` and ``100 + v % 3``; pairs within 1 verify. With
    ``copies``, rows of one value are named copies (``group_rows``' third array)."""

    name = "t_valued"
    global_columns = ("v",)

    def __init__(self, copies: bool) -> None:
        super().__init__()
        self.copies = copies
        self.asked = 0

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, ...]:
        v = table.column("v").to_numpy()
        rows, groups = np.tile(np.arange(len(v)), 2), np.r_[v // 4, 100 + v % 3]
        return (rows, groups, np.r_[v, v]) if self.copies else (rows, groups)

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        self.asked += left.num_rows
        return pa.array(np.abs(left.column("v").to_numpy() - right.column("v").to_numpy()) <= 1)


@pytest.mark.parametrize("seed", range(10))
def test_copies_pair_with_their_first_and_decide_the_same(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.randint(0, 30) for _ in range(rng.randint(0, 200))]
    keys = [f"k{i:04d}" for i in rng.sample(range(10_000), len(values))]
    table = pa.table({"key": pa.array(keys, pa.string()), "v": pa.array(values, pa.int64())})
    plain, copies = Valued(copies=False), Valued(copies=True)
    assert copies.decide(table).equals(plain.decide(table))
    assert copies.asked <= plain.asked


def test_exact_dedup_hashes_missing_digests_and_keeps_the_smallest_key() -> None:
    images = [b"one", b"two", b"one", None, b"two"]
    digests = [hashlib.sha256(b"one").hexdigest(), None, None, None, "not-a-hex-digest"]
    table = reject(
        pa.table({"key": ["e", "d", "c", "b", "a"], "image": pa.array(images, pa.binary()), "sha256": pa.array(digests, pa.string())}),
        np.zeros(5, bool),
        "x",
    )
    stage = ExactDedup()
    processed = stage.process(table)
    assert processed.column("sha256").to_pylist()[1:3] == [hashlib.sha256(b"two").hexdigest(), hashlib.sha256(b"one").hexdigest()]
    assert processed.column("reject_reason").to_pylist() == [None, None, None, "image_missing", None]
    kept = processed.filter(pa.compute.is_null(processed.column("reject_reason")))
    decision = stage.decide(kept.select(["key", "sha256"]))
    assert decision.to_pylist() == [{"key": "e", "reject_reason": "duplicate_image", "duplicate_of": "c"}]


@pytest.mark.parametrize(("parts", "maps"), [(3, 4), (7, 2)])
def test_the_step_over_shards_and_partitions_equals_decide(caption_corpus: dict, parts: int, maps: int) -> None:
    """The phases as an engine runs them (rows spread over shards, pieces over partitions) decide as
    ``decide`` does on the whole table."""
    from mmcurate.dedup.cluster import ClusterStep, InMemory, run_step
    from mmcurate.dedup.minhash import SIGNATURE, MinhashDedup

    stage = MinhashDedup.from_params({"threshold": 0.6})
    captions = pa.table({"key": caption_corpus["keys"], "caption": pa.array(caption_corpus["docs"], pa.string())})
    table = stage.process(reject(captions, np.zeros(captions.num_rows, bool), "x")).select(["key", SIGNATURE])
    shards = [table.slice(i, 97) for i in range(0, table.num_rows, 97)]

    def rows(shard_id: int, keys_only: bool = False) -> pa.Table:
        return shards[shard_id].select(["key"]) if keys_only else shards[shard_id]

    decision = run_step(ClusterStep(stage, rows, table.schema, parts), list(range(len(shards))), InMemory(), maps)
    assert decision.num_rows > 300 and decision.equals(stage.decide(table))
