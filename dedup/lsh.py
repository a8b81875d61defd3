"""MinHash signatures, LSH band groups and the signature similarity test, all vectorised.

Permutation i maps a shingle hash ``x`` to ``(a_i * x + b_i) mod 2**64`` (odd random ``a_i``);
the signature keeps, per permutation, the top 32 bits of the minimum over the caption's shingles.
Signatures are computed a whole batch at a time: captions are grouped by shingle count and each
shingle position is folded in with one ``np.minimum`` over every caption of the group.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.dedup.config import MinhashConfig
from mmcurate.dedup.hashing import group_ids

SIGNATURE_TYPE = pa.list_(pa.int32())  # uint32 values stored as their signed bit pattern (Spark has no unsigned)
_ROWS_PER_STEP = 1024  # captions folded per numpy call: keeps the working set in cache


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` uint64 parameters of the ``num_perm`` hash permutations."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True)
    return a, b


def signatures(hashes: np.ndarray, counts: np.ndarray, config: MinhashConfig) -> np.ndarray:
    """uint32 signature matrix, one row per caption (rows of captions without shingles are unset)."""
    a, b = permutations(config.num_perm, config.seed)
    out = np.zeros((len(counts), config.num_perm), np.uint32)
    starts = np.cumsum(counts) - counts
    order = np.argsort(counts, kind="stable")
    cuts = np.flatnonzero(np.diff(counts[order])) + 1
    with np.errstate(over="ignore"):
        for group in np.split(order, cuts):
            size = counts[group[0]] if len(group) else 0
            for step in range(0, len(group) if size else 0, _ROWS_PER_STEP):
                rows = group[step : step + _ROWS_PER_STEP]
                first = starts[rows]
                acc = np.multiply.outer(hashes[first], a)
                acc += b
                tmp = np.empty_like(acc)
                for j in range(1, size):
                    np.multiply.outer(hashes[first + j], a, out=tmp)
                    tmp += b
                    np.minimum(acc, tmp, out=acc)
                out[rows] = acc >> np.uint64(32)
    return out


def to_arrow(matrix: np.ndarray, valid: np.ndarray) -> pa.Array:
    """The ``_minhash`` column: one list<int32> per row, null where ``valid`` is false."""
    n, width = matrix.shape
    values = pa.array(matrix.view(np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=SIGNATURE_TYPE, mask=pa.array(~valid))


def from_arrow(column: pa.Array | pa.ChunkedArray, num_perm: int) -> np.ndarray:
    """The uint32 signature matrix of a ``_minhash`` column without nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if len(values) != len(column) * num_perm:
        raise ValueError(f"_minhash signatures are not all of length {num_perm}")
    return values.astype(np.int32, copy=False).view(np.uint32).reshape(len(column), num_perm)


def band_groups(matrix: np.ndarray, config: MinhashConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(row, group)`` for every row and band: the int64 id of (band index, band values)."""
    bands, rows = config.lsh
    groups = [group_ids(band, matrix[:, band * rows : (band + 1) * rows]) for band in range(bands)]
    return np.tile(np.arange(len(matrix)), bands), np.concatenate(groups) if groups else np.empty(0, np.int64)


def similar(left: np.ndarray, right: np.ndarray, threshold: float) -> np.ndarray:
    """Whether the estimated Jaccard similarity (fraction of equal slots) of aligned rows reaches ``threshold``."""
    needed = int(np.ceil(threshold * left.shape[1] - 1e-9))
    return (left == right).sum(axis=1) >= needed
