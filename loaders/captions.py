"""Which caption a training sample gets: the web caption, a synthetic one, or a seeded mix of both."""

from __future__ import annotations

import hashlib
from typing import Any

from mmcurate.errors import UsageError

WEB, SYNTHETIC = "web", "synthetic"


def check_choice(choice: str | float) -> str | float:
    """``web``, ``synthetic`` or p in [0, 1] (the probability of taking the synthetic caption); UsageError otherwise."""
    if choice in (WEB, SYNTHETIC):
        return choice
    if isinstance(choice, (int, float)) and not isinstance(choice, bool) and 0.0 <= choice <= 1.0:
        return float(choice)
    raise UsageError(f"caption must be 'web', 'synthetic' or a probability in [0, 1], not {choice!r}")


def draw(seed: int, key: str, epoch: int) -> float:
    """A number in [0, 1) fixed by the seed, the key and the epoch (the same in every worker and rank)."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def web_caption(row: dict[str, Any]) -> str | None:
    """The source caption: capfilt's ``web`` candidate when it ran (``caption`` may hold its pick), else ``caption``."""
    for cand in row.get("captions") or ():
        if cand["source"] == WEB:
            return cand["text"]
    return row.get("caption")


def synthetic_caption(row: dict[str, Any]) -> str | None:
    """The highest-scoring synthetic candidate of ``captions`` (None when the row has none)."""
    synthetic = [c for c in row.get("captions") or () if c["source"] == SYNTHETIC]
    if not synthetic:
        return None
    return max(synthetic, key=lambda c: float("-inf") if c["score"] is None else c["score"])["text"]


def choose(row: dict[str, Any], choice: str | float, seed: int, epoch: int) -> tuple[str | None, str]:
    """(caption, its source) of a row for ``choice``; a row without a synthetic caption gets its web caption."""
    want_synthetic = choice == SYNTHETIC or (not isinstance(choice, str) and draw(seed, row["key"], epoch) < choice)
    if want_synthetic and (text := synthetic_caption(row)) is not None:
        return text, SYNTHETIC
    return web_caption(row), WEB
