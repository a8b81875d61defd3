"""MinHash signatures, LSH band groups and the signature similarity test, all vectorised.

Permutation i maps a shingle hash ``x`` to ``(a_i * x + b_i) mod 2**64`` (odd random ``a_i``);
the signature keeps, per permutation, the top 32 bits of the minimum over the caption's shingles.
Signatures are computed a whole batch at a time: captions sorted by shingle count, most first, a
block of them at a time, each shingle position folded in with one ``np.minimum`` over the block's
captions that have it (a prefix of the block).
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from mmcurate.dedup.config import MinhashConfig
from mmcurate.dedup.hashing import group_ids, mix64

# A signature is stored as num_perm little-endian uint32 in one fixed-size binary value: every
# engine carries binary (Spark has no unsigned ints; it hands fixed-size binary back as binary, which
# is read too), and taking fixed-size binary rows is ~5x faster than binary and ~50x than lists.
_SLOT = np.dtype("<u4")
_ROWS_PER_STEP = 256  # captions folded per numpy call: keeps the working set in cache
_ROWS_PER_BLOCK = 4096  # signatures banded per numpy call (2 MiB at 128 slots)


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
    order = np.argsort(-counts, kind="stable")[: np.count_nonzero(counts)]  # most shingles first
    with np.errstate(over="ignore"):
        for step in range(0, len(order), _ROWS_PER_STEP):
            rows = order[step : step + _ROWS_PER_STEP]
            first, size = starts[rows], counts[rows]
            acc = np.multiply.outer(hashes[first], a)
            acc += b
            tmp = np.empty_like(acc)
            # Shingle j of the block's captions with more than j: a prefix of the block.
            for j, k in enumerate(np.searchsorted(-size, -np.arange(1, size[0]), side="left"), start=1):
                np.multiply.outer(hashes[first[:k] + j], a, out=tmp[:k])
                tmp[:k] += b
                np.minimum(acc[:k], tmp[:k], out=acc[:k])
            out[rows] = acc >> np.uint64(32)
    return out


def to_arrow(matrix: np.ndarray, valid: np.ndarray) -> pa.Array:
    """The ``_minhash`` column: each row's signature as fixed-size binary, null where ``valid`` is false."""
    n, width = matrix.shape
    data = np.ascontiguousarray(matrix, dtype=_SLOT).tobytes()
    bitmap = pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.binary(width * _SLOT.itemsize), n, [bitmap, pa.py_buffer(data)], null_count=int(n - valid.sum()))


def from_arrow(column: pa.Array | pa.ChunkedArray, num_perm: int, nulls: bool = False) -> np.ndarray:
    """The uint32 signature matrix of a ``_minhash`` column without nulls, or with ``nulls`` (their
    rows hold anything) in a fixed-size binary column (no copy for one chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    size = num_perm * _SLOT.itemsize
    for chunk in chunks:
        fixed = pa.types.is_fixed_size_binary(chunk.type)
        if chunk.null_count and not (nulls and fixed):
            raise ValueError("_minhash signatures must not be null")
        if fixed:
            if chunk.type.byte_width != size:
                raise ValueError(f"_minhash signatures must all be {num_perm} slots")
            start, end = chunk.offset * size, (chunk.offset + len(chunk)) * size
        else:  # binary or large binary, as Spark returns it
            width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
            offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset : chunk.offset + len(chunk) + 1]
            if np.any(np.diff(offsets) != size):
                raise ValueError(f"_minhash signatures must all be {num_perm} slots")
            start, end = offsets[0], offsets[-1]
        data = np.frombuffer(chunk.buffers()[-1] or b"", np.uint8)[start:end]
        parts.append(data.view(_SLOT).reshape(len(chunk), num_perm))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty((0, num_perm), _SLOT)


def band_groups(matrix: np.ndarray, config: MinhashConfig, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, group, copy)`` for every row (or every ``valid`` row) and band: the int64 id of (band
    index, band values), and the row's id of its whole signature (of its band ids and the slots after
    the last band).

    Rows are hashed a block at a time (every band of a block while it is in cache); a band of an even
    number of slots is read as 64-bit pairs of slots, half the mixing rounds."""
    bands, rows = config.lsh
    n = len(matrix)
    width = bands * rows
    slots = matrix[:, :width]
    if rows % 2 == 0:
        slots, rows = slots.view(np.uint64), rows // 2
    salts = mix64(np.arange(bands, dtype=np.uint64))
    groups = np.empty((bands, n), np.int64)
    copy = np.empty(n, np.int64)
    for lo in range(0, n, _ROWS_PER_BLOCK):
        block = slots[lo : lo + _ROWS_PER_BLOCK].reshape(-1, bands, rows)
        h = salts
        for j in range(rows):
            h = mix64(h ^ block[:, :, j])
        groups[:, lo : lo + len(block)] = h.T.view(np.int64)
        rest = group_ids(bands, matrix[lo : lo + len(block), width:]).view(np.uint64)
        copy[lo : lo + len(block)] = mix64(np.bitwise_xor.reduce(h, axis=1) ^ rest).view(np.int64)
    if valid is None:
        return np.tile(np.arange(n), bands), groups.ravel(), np.tile(copy, bands)
    keep = np.flatnonzero(valid)
    return np.tile(keep, bands), groups[:, keep].ravel(), np.tile(copy[keep], bands)


def similar(left: np.ndarray, right: np.ndarray, threshold: float) -> np.ndarray:
    """Whether the estimated Jaccard similarity (fraction of equal slots) of aligned rows reaches ``threshold``."""
    needed = int(np.ceil(threshold * left.shape[1] - 1e-9))
    return np.count_nonzero(left == right, axis=1) >= needed
