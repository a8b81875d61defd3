"""The base class of the dedup stages: candidate groups, verified pairs, connected components."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.dedup.graph import _component_codes, _pair_codes, _verify_rows
from mmcurate.stages.base import GlobalStage, decisions


class ClusterStage(GlobalStage):
    """A global stage that removes near-duplicates: candidate groups, verified pairs, components.

    Subclasses implement ``group_keys`` (which rows may be duplicates: exact hash, LSH band buckets,
    pHash chunks) and, where candidates need checking, ``verify``. ``decide`` below is the in-memory
    reference; the Ray and Spark engines run the same three steps distributed and must agree with it.
    In every connected component of verified pairs the smallest key is kept and the others are
    rejected with ``reason`` and ``duplicate_of`` = that key.
    """

    reason: ClassVar[str] = "duplicate"
    max_group_size: ClassVar[int] = 1000  # candidate groups larger than this pair only with their smallest key

    def group_keys(self, table: pa.Table) -> pa.Table:
        """``(key string, group int64)`` rows: rows sharing a group are candidate duplicates."""
        raise NotImplementedError

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        """For aligned rows of ``left`` and ``right`` (``global_columns``), whether each pair is a duplicate."""
        return pa.array(np.ones(left.num_rows, dtype=bool))

    def decide(self, table: pa.Table) -> pa.Table:
        # candidate_pairs -> verified_edges -> components, on integer key codes rather than strings.
        keys, left, right = _pair_codes(self.group_keys(table), self.max_group_size)
        rows = pc.index_in(keys, value_set=table.column("key")).to_numpy(zero_copy_only=False)
        ok = _verify_rows(self, table, rows[left], rows[right])
        dups, keepers = _component_codes(len(keys), left[ok], right[ok])
        return decisions(keys.take(pa.array(dups)), self.reason, keys.take(pa.array(keepers)))
