"""``phash_dedup``: perceptual near-duplicate images (re-encoded, resized, recompressed copies).

``process`` stores each image's 64-bit DCT perceptual hash (imagehash's pHash of the image decoded
at >= 128 px) in ``phash``. Two images are duplicates when their hashes differ in at most
``max_distance`` bits. Candidates come from the pigeonhole principle: split the 64 bits into
``max_distance + 1`` chunks; hashes within that distance agree on at least one whole chunk, so
every (chunk index, chunk value) is a group and no pair within the distance is missed.

Measured on 53 real photos: JPEG/WebP/PNG copies resized to 128-512 px lie 0-2 bits from the
original; distinct photos 20 or more. Expected candidate pairs grow as
``n**2 / 2 * (d + 1) / 2**(64 / (d + 1))``: keep ``max_distance`` small on large collections.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.dedup.hashing import group_ids
from mmcurate.options import bounded
from mmcurate.stages.base import Resources, reject, set_column

_DECODE_SIZE = (128, 128)  # JPEG draft decode: 4x the 32 px pHash input, stable and fast


@dataclass
class PhashConfig:
    """``max_distance``: largest Hamming distance (bits of 64) between duplicates' pHashes."""

    max_distance: int = bounded(4, ge=0, le=31)


def phash(data: bytes) -> int:
    """The signed 64-bit pHash of encoded image ``data`` (raises on undecodable bytes)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", _DECODE_SIZE)
        bits = imagehash.phash(im).hash.reshape(-1)
    return int(np.packbits(bits).view(">i8")[0])


def chunks(max_distance: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of the ``max_distance + 1`` near-equal bit chunks of a 64-bit hash."""
    n = max_distance + 1
    widths = [64 // n + (i < 64 % n) for i in range(n)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


class PhashDedup(ClusterStage):
    name = "phash_dedup"
    Config = PhashConfig
    resources = Resources(cpus=1)
    needs = ("image",)
    adds = ("phash",)
    global_columns = ("phash",)
    reason = "near_duplicate_image"
    config: PhashConfig

    def process(self, batch: pa.Table) -> pa.Table:
        hashes: list[int | None] = []
        reasons: list[str | None] = []
        for data in batch.column("image").to_pylist():
            value, reason = None, None
            if data is None:
                reason = "image_missing"
            else:
                try:
                    value = phash(data)
                except Exception:  # noqa: BLE001 -- any decoder failure on untrusted bytes is this row's result
                    reason = "undecodable_image"
            hashes.append(value)
            reasons.append(reason)
        batch = set_column(batch, "phash", pa.array(hashes, pa.int64()))
        return reject(batch, pc.is_valid(pa.array(reasons, pa.string())), pa.array(reasons, pa.string()))

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        hashed = np.flatnonzero(np.asarray(pc.is_valid(table.column("phash"))))
        bits = table.column("phash").take(hashed).to_numpy().view(np.uint64)
        parts = chunks(self.config.max_distance)
        groups = [group_ids(i, (bits >> np.uint64(shift)) & np.uint64((1 << width) - 1)) for i, (shift, width) in enumerate(parts)]
        return np.tile(hashed, len(parts)), np.concatenate(groups)

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        a, b = (pc.fill_null(t.column("phash"), 0).to_numpy().view(np.uint64) for t in (left, right))
        distance = np.bitwise_count(a ^ b)
        valid = pc.and_(pc.is_valid(left.column("phash")), pc.is_valid(right.column("phash")))
        return pc.and_(valid, pa.array(distance <= self.config.max_distance))
