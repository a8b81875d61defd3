"""``exact_dedup``: byte-identical images, across every shard of the run.

Rows are grouped by a 64-bit hash of their image's sha256 (the ``sha256`` column that
download and the img2dataset reader set, computed here from ``image`` where it is missing) and
confirmed by the full digest. Of each set of identical images the smallest key is kept.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.dedup.hashing import string_hashes
from mmcurate.stages.base import Resources, reject, set_column


class ExactDedup(ClusterStage):
    name = "exact_dedup"
    resources = Resources(cpus=1)
    needs = ("sha256",)
    adds = ("sha256",)
    global_columns = ("sha256",)
    reason = "duplicate_image"

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        digests = batch.column("sha256").to_pylist() if "sha256" in batch.column_names else [None] * n
        images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * n
        digests = [
            d if d else (hashlib.sha256(img).hexdigest() if img is not None else None) for d, img in zip(digests, images, strict=True)
        ]
        batch = set_column(batch, "sha256", pa.array(digests, pa.string()))
        return reject(batch, pc.is_null(batch.column("sha256")), "image_missing")

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(np.asarray(pc.is_valid(table.column("sha256"))))
        return rows, string_hashes(table.column("sha256").take(rows)).view(np.int64)

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        return pc.equal(left.column("sha256"), right.column("sha256"))
