"""Exact-Jaccard ground truth for the dedup tests, written independently of the stage."""

from __future__ import annotations

import unicodedata
from collections import defaultdict

THRESHOLD = 0.8


def reference_shingles(text: str | None, n: int = 3) -> frozenset[str]:
    """Plain-Python word n-grams of the normalised caption (the stage's definition, written independently)."""
    text = "".join(ch for ch in (text or "").lower() if unicodedata.category(ch)[0] not in "PS")
    words = text.split()
    if not words:
        return frozenset()
    if len(words) < n:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def duplicate_components(docs: list[str | None], threshold: float) -> list[int]:
    """Component id per doc of the graph of pairs with exact Jaccard >= threshold."""
    sets = [reference_shingles(d) for d in docs]
    index: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            index[sh].append(i)
    parent = list(range(len(docs)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, s in enumerate(sets):
        for j in {j for sh in s for j in index[sh] if j > i}:
            if jaccard(s, sets[j]) >= threshold:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(docs))]
