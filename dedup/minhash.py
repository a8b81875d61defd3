"""``minhash_dedup``: caption near-duplicates by MinHash LSH (see :class:`MinhashConfig`).

``process`` adds the internal ``_minhash`` signature column. Null, empty or punctuation-only
captions get no signature and are never deduplicated here: they carry no text to compare, and
dropping every caption-less sample as a copy of one another would remove distinct images
(``caption_quality`` is the stage that rejects them).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.dedup.config import MinhashConfig
from mmcurate.dedup.lsh import band_groups, from_arrow, signatures, similar, to_arrow
from mmcurate.dedup.shingles import shingle_hashes
from mmcurate.stages.base import Resources, set_column

SIGNATURE = "_minhash"


class MinhashDedup(ClusterStage):
    name = "minhash_dedup"
    Config = MinhashConfig
    resources = Resources(cpus=1)
    needs = ("caption",)
    global_columns = (SIGNATURE,)
    reason = "duplicate_caption"
    config: MinhashConfig

    def process(self, batch: pa.Table) -> pa.Table:
        hashes, counts = shingle_hashes(batch.column("caption"), self.config)
        matrix = signatures(hashes, counts, self.config)
        return set_column(batch, SIGNATURE, to_arrow(matrix, counts > 0))

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        column = table.column(SIGNATURE)
        found, start = [], 0
        for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:  # no copy of the signatures
            rows, groups, copies = self._chunk_groups(chunk)
            found.append((rows + start, groups, copies))
            start += len(chunk)
        if len(found) == 1:
            return found[0]
        return tuple(np.concatenate(parts) for parts in zip(*found)) if found else tuple(np.empty(0, np.int64) for _ in range(3))

    def _chunk_groups(self, column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if column.null_count == 0:
            return band_groups(from_arrow(column, self.config.num_perm), self.config)
        valid = np.asarray(pc.is_valid(column))
        if pa.types.is_fixed_size_binary(column.type):  # band the valid rows in place (no copy of the signatures)
            return band_groups(from_arrow(column, self.config.num_perm, nulls=True), self.config, valid)
        signed = np.flatnonzero(valid)
        rows, groups, copies = band_groups(from_arrow(column.take(signed), self.config.num_perm), self.config)
        return signed[rows], groups, copies

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        a, b = left.column(SIGNATURE), right.column(SIGNATURE)
        valid = np.asarray(pc.and_(pc.is_valid(a), pc.is_valid(b)), dtype=bool)
        if not valid.all():
            a, b = a.filter(valid), b.filter(valid)
        ok = np.zeros(len(valid), bool)
        n = self.config.num_perm
        ok[valid] = similar(from_arrow(a, n), from_arrow(b, n), self.config.threshold)
        return pa.array(ok, pa.bool_())
