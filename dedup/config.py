"""The one MinHash configuration shared by shingling, signatures, LSH banding and the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Candidate probability an LSH setting must reach for pairs exactly at the threshold.
LSH_RECALL = 0.99


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

    threshold: float = 0.8
    ngram: int = 3
    tokens: Literal["word", "char"] = "word"
    lowercase: bool = True
    strip_punctuation: bool = True
    num_perm: int = 128
    bands: int | None = None
    rows: int | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {self.threshold}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be at least 1, not {self.ngram}")
        if self.tokens not in ("word", "char"):
            raise ValueError(f"tokens must be word or char, not {self.tokens!r}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be at least 2, not {self.num_perm}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
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
