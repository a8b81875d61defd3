"""Vectorised 64-bit mixing shared by the dedup stages (group ids, shingle hashes)."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def group_ids(part: int, columns: np.ndarray) -> np.ndarray:
    """int64 group id per row of ``columns`` (uint64, shape rows or rows x k), salted by ``part``
    (band or chunk index) so equal values in different parts never share a group."""
    columns = np.asarray(columns, np.uint64)
    if columns.ndim == 1:
        columns = columns[:, None]
    h = np.full(columns.shape[0], mix64(np.uint64(part)), np.uint64)
    for j in range(columns.shape[1]):
        h = mix64(h ^ columns[:, j])
    return h.view(np.int64)
