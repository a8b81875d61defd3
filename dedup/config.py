"""The one MinHash configuration shared by shingling, signatures, LSH banding and the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmcurate.options import bounded

# Candidate probability an LSH setting must reach for pairs exactly at the threshold.
LSH_RECALL = 0.99
# Permutations at most: a signature is 4 bytes per permutation per row (4 KiB at the cap).
MAX_PERM = 1024


@dataclass(frozen=True)
class MinhashConfig:
    """Caption near-duplicate detection.

    Captions are normalised (lower-cased, punctuation and symbols removed, whitespace collapsed),
    cut into ``ngram``-grams of words (or of characters, for scripts written without spaces); a
    caption shorter than ``ngram`` tokens is one shingle. Two captions are duplicates when the
    MinHash estimate of their shingle-set Jaccard similarity is at least ``threshold``. ``bands`` x
    ``rows`` LSH buckets are chosen, unless given, so that pairs at the threshold become candidates
    with probability >= 0.99 (the verification step then removes the false candidates).
    """

    threshold: float = bounded(0.8, gt=0, le=1)
    ngram: int = bounded(3, ge=1)
    tokens: Literal["word", "char"] = "word"
    lowercase: bool = True
    strip_punctuation: bool = True
    num_perm: int = bounded(128, ge=2, le=MAX_PERM)
    bands: int | None = bounded(None, ge=1)
    rows: int | None = bounded(None, ge=1)
    seed: int = bounded(1, ge=0)

    def __post_init__(self) -> None:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows must be between 1 and num_perm ({self.num_perm}), not {self.bands} x {self.rows}")

    @property
    def lsh(self) -> tuple[int, int]:
        """``(bands, rows)``: as set, or the most selective banding whose candidate probability at
        the threshold, ``1 - (1 - t**rows)**bands``, is at least 0.99."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        best = (self.num_perm, 1)
        for rows in range(1, self.num_perm + 1):
            bands = self.num_perm // rows
            if 1 - (1 - self.threshold**rows) ** bands >= LSH_RECALL:
                best = (bands, rows)
        return best
