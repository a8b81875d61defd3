"""Caption normalisation and shingle hashing, vectorised over an Arrow string array.

Each shingle is a byte span of the normalised text (n consecutive tokens). Its 64-bit hash is a
hash of the span's UTF-8 bytes (:func:`~mmcurate.dedup.hashing.span_hashes`), computed for every
span at once: no Python loop per caption, and the same text hashes the same in every process and
engine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.dedup.config import MinhashConfig
from mmcurate.dedup.hashing import span_hashes

_SPACE = 0x20


def normalise(texts: pa.Array | pa.ChunkedArray, config: MinhashConfig) -> pa.Array:
    """Lower-case, drop punctuation and symbols, collapse whitespace; nulls become ''."""
    texts = texts.cast(pa.string())
    if config.lowercase:
        texts = pc.utf8_lower(texts)
    if config.strip_punctuation:
        texts = pc.replace_substring_regex(texts, r"[\p{P}\p{S}]+", "")
    texts = pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts)), " ")  # faster than a regex
    texts = pc.fill_null(texts, "")
    return texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts


def shingle_hashes(texts: pa.Array | pa.ChunkedArray, config: MinhashConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, counts)``: uint64 hashes of every caption's shingles, caption after caption, and
    the number of shingles of each caption (0 for a null or empty one)."""
    text = normalise(texts, config).cast(pa.large_string())
    n = len(text)
    offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset : text.offset + n + 1]
    data = np.frombuffer(text.buffers()[2] or b"", np.uint8)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    starts, ends = _token_spans(data, offsets, config.tokens)
    ntok = np.diff(np.searchsorted(starts, offsets))
    doc = np.repeat(np.arange(n), ntok)
    first = (np.cumsum(ntok) - ntok)[doc]
    last = first + ntok[doc] - 1
    index = np.arange(len(starts))
    k = config.ngram - 1
    is_start = (index + k <= last) | ((index == first) & (ntok[doc] <= k))
    span_end = ends[np.minimum(index + k, last)[is_start]]
    span_start = starts[is_start]
    counts = np.bincount(doc[is_start], minlength=n)
    return span_hashes(data, span_start, span_end), counts


def _token_spans(data: np.ndarray, offsets: np.ndarray, tokens: str) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte of every token: words between single spaces, or UTF-8 characters."""
    doc_start = np.zeros(len(data) + 1, bool)
    doc_start[offsets] = True
    if tokens == "char":
        starts = np.flatnonzero((data & 0xC0) != 0x80)
        ends = np.append(starts[1:], len(data))
        return starts, ends
    word = data != _SPACE
    start = word.copy()
    start[1:] &= ~word[:-1] | doc_start[1:-1]
    end = word.copy()
    end[:-1] &= ~word[1:] | doc_start[1:-1]
    return np.flatnonzero(start), np.flatnonzero(end) + 1
