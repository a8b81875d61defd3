"""The cluster-graph numerics of the dedup stages' global step (:mod:`dedup.cluster`): candidate
pairs from shared groups, verification in slices, connected components keeping the smallest key.
Pure functions of numpy and Arrow arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.dedup.hashing import mix64

if TYPE_CHECKING:
    from mmcurate.dedup.cluster import ClusterStage

VERIFY_BATCH = 65_536  # candidate pairs handed to one verify() call: bounds memory, stays in cache


def argsort64(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable argsort of int64 ``values``, and the values in that order, by one ``np.sort`` of the
    values packed with their index (several times faster than ``np.argsort``): small non-negative
    values (ids) whole; others (hashes) by their high bits, the rare runs of equal high bits but
    different values then ordered by value."""
    n = len(values)
    bits = max(1, (n - 1).bit_length())
    index = np.arange(n, dtype=np.int64)
    mask = np.int64((1 << bits) - 1)
    if n and values.min() >= 0 and int(values.max()) < 1 << (63 - bits):
        packed = values << np.int64(bits)
        packed |= index
        packed.sort()  # in place, like the operations after it: no new array each (fresh pages cost more than the sort)
        np.bitwise_and(packed, mask, out=index)
        packed >>= np.int64(bits)
        return index, packed
    if bits > 40:
        order = np.argsort(values, kind="stable")
        return order, values[order]
    packed = values & ~mask
    packed |= index
    packed.sort()
    order = np.bitwise_and(packed, mask, out=index)
    ordered = values[order]
    high = packed
    high >>= np.int64(bits)
    mixed = (high[1:] == high[:-1]) & (ordered[1:] != ordered[:-1])
    if mixed.any():
        runs = np.unique(high[1:][mixed])
        at = np.concatenate([np.arange(lo, hi) for lo, hi in zip(np.searchsorted(high, runs), np.searchsorted(high, runs, "right"))])
        order[at] = order[at][np.lexsort((order[at], ordered[at]))]
        ordered[at] = values[order[at]]
    return order, ordered


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Where each run of equal values of sorted ``ordered`` starts."""
    return np.r_[True, ordered[1:] != ordered[:-1]] if len(ordered) else np.empty(0, bool)


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` of int64 values (inverse as int64), by :func:`argsort64`."""
    order, ordered = argsort64(values)
    new = _run_starts(ordered)
    inverse = np.empty(len(values), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def shared_groups(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of groups with two or more members, ordered by group, and each one's group number
    (0, 1, ... in group order). Most groups are singletons: they are dropped before any pairing."""
    order, ordered = argsort64(group)
    same = ordered[1:] == ordered[:-1]
    shared = np.zeros(len(group), bool)
    shared[1:] |= same
    shared[:-1] |= same
    starts = np.r_[True, ~same][shared] if len(group) else np.empty(0, bool)
    return order[shared], np.cumsum(starts) - 1


def first_copies(run: np.ndarray, codes: np.ndarray, copy: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(run, codes)`` (group numbers, member codes) with one member per ``copy`` id, its smallest
    code, and ``(first, other)``: each left-out member's code and that smallest one of its copy id.
    Every member of a copy id must be in every group of it (copies are in the same groups), so the
    smallest code is the same in each group."""
    order, ordered = argsort64(copy)
    new = _run_starts(ordered)
    smallest = np.empty(len(copy), np.int64)
    if len(copy):
        smallest[order] = np.minimum.reduceat(codes[order], np.flatnonzero(new))[np.cumsum(new) - 1]
    alone = codes == smallest
    other, first = sorted_distinct(codes[~alone], smallest[~alone])  # each code has one smallest
    return run[alone], codes[alone], first, other


def member_pairs(
    run: np.ndarray, codes: np.ndarray, max_group_size: int, center: Callable[[np.ndarray], int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``(a, b)``, ``a < b``, of non-negative int ``codes`` sharing a ``run`` (group number):
    every pair in groups of up to ``max_group_size`` members, and in larger groups each member with
    the group's ``center`` (of its member codes; by default the smallest code)."""
    run, codes = sorted_distinct(run, codes)
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else np.empty(0, np.int64)
    lengths = np.diff(np.r_[starts, len(run)])
    # Groups with the same members (copies share every LSH band) give the same pairs: expand one of
    # them. Member sets are compared by a 64-bit fingerprint (a collision is ~2**-64 per pair of groups).
    fingerprint = np.add.reduceat(mix64(codes), starts) ^ mix64(lengths) if len(starts) else np.empty(0, np.uint64)
    first = np.zeros(len(starts), bool)
    first[np.unique(fingerprint, return_index=True)[1]] = True
    run, codes = run[np.repeat(first, lengths)], codes[np.repeat(first, lengths)]
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else np.empty(0, np.int64)
    lengths = np.diff(np.r_[starts, len(run)])
    if center is not None:  # move each large group's center to its first place
        for start, length in zip(starts[lengths > max_group_size], lengths[lengths > max_group_size], strict=True):
            members = codes[start : start + length]
            at = start + int(np.flatnonzero(members == center(members))[0])
            codes[start], codes[at] = codes[at], codes[start]
    sizes = np.repeat(lengths, lengths)
    position = np.arange(len(run)) - np.repeat(starts, lengths)
    # Members pair with every later member; in a large group only the first member pairs, with all.
    partners = np.where(sizes > max_group_size, np.where(position == 0, sizes - 1, 0), sizes - 1 - position)
    left = np.repeat(codes, partners)
    offset = np.arange(len(left)) - np.repeat(np.cumsum(partners) - partners, partners)
    right = codes[np.repeat(np.arange(len(codes)) + 1, partners) + offset]
    return sorted_distinct(np.minimum(left, right), np.maximum(left, right))


def sorted_distinct(major: np.ndarray, minor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(major, minor)`` pairs of non-negative ints, sorted: one sort of the pairs packed
    into int64, much faster than lexsort or np.unique."""
    span = int(minor.max()) + 1 if len(minor) else 1
    if len(major) and int(major.max()) >= np.iinfo(np.int64).max // span:
        raise ValueError("too many candidate rows to pack into int64")
    packed = np.sort(major.astype(np.int64) * span + minor)
    packed = packed[np.r_[True, packed[1:] != packed[:-1]]] if len(packed) else packed
    return packed // span, packed % span


def _key_codes(keys: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """The distinct keys in sorted order, and each key's index among them (code order = key order)."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    distinct = pc.unique(keys)
    distinct = distinct.take(pc.sort_indices(distinct))
    return distinct, pc.index_in(keys, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64)


def verify_aligned(stage: ClusterStage, left: pa.Table, right: pa.Table) -> np.ndarray:
    """``stage.verify`` on the aligned rows of ``left`` and ``right``, in slices of ``VERIFY_BATCH``
    pairs; an undecided (null) pair is not a duplicate."""
    ok = np.zeros(left.num_rows, bool)
    for i in range(0, left.num_rows, VERIFY_BATCH):
        verdict = stage.verify(left.slice(i, VERIFY_BATCH), right.slice(i, VERIFY_BATCH))
        ok[i : i + VERIFY_BATCH] = np.asarray(pc.fill_null(verdict, False), dtype=bool)
    return ok


def components(left: pa.Array, right: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Connected components of the edges ``(left[i], right[i])`` (string keys): every key but the
    smallest of its component, in key order, and that smallest key."""
    keys, codes = _key_codes(pa.concat_arrays([left.cast(pa.string()), right.cast(pa.string())]))
    dups, keepers = _component_codes(len(keys), codes[: len(left)], codes[len(left) :])
    return keys.take(pa.array(dups, pa.int64())), keys.take(pa.array(keepers, pa.int64()))


def _component_codes(n: int, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`components` on key codes ``0..n-1`` (code order = key order): ``(duplicates, their keepers)``.

    Each code points to a smaller or equal code of its component; every round hooks the two roots
    of each edge to the smaller one, then makes every code point at its root, until the edges'
    ends share roots: each component's root is then its smallest code. A few rounds for the star-like
    components of duplicates, and no scipy import."""
    root = np.arange(n)
    while True:
        a, b = root[left], root[right]
        apart = a != b
        if not apart.any():
            break
        a, b = a[apart], b[apart]
        low = np.minimum(a, b)
        np.minimum.at(root, a, low)
        np.minimum.at(root, b, low)
        while True:
            up = root[root]
            if np.array_equal(up, root):
                break
            root = up
    dups = np.flatnonzero(root != np.arange(n))
    return dups, root[dups]
