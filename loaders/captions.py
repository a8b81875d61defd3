"""Which caption a training sample gets: the web caption, a synthetic one capfilt kept, or a seeded mix of both."""

from __future__ import annotations

import hashlib
from typing import Any

from mmcurate.captioning.capfilt import passes
from mmcurate.errors import UsageError
from mmcurate.shards.layout import OutputDir, detect_layout

WEB, SYNTHETIC = "web", "synthetic"


def check_choice(choice: str | float) -> str | float:
    """``web``, ``synthetic`` or p in [0, 1] (the probability of taking the synthetic caption); UsageError otherwise."""
    if choice in (WEB, SYNTHETIC):
        return choice
    if isinstance(choice, (int, float)) and not isinstance(choice, bool) and 0.0 <= choice <= 1.0:
        return float(choice)
    raise UsageError(f"caption must be 'web', 'synthetic' or a probability in [0, 1], not {choice!r}")


def capfilt_threshold(out: OutputDir) -> float:
    """The threshold of the capfilt run that wrote ``out``'s ``captions``, as its ``run.json`` records it
    (``models``): this output's run, or the run of the mmcurate output it read, and so on back. The
    last capfilt of a run wins (it rewrote ``captions``). UsageError when no run on the way records one."""
    origin, seen = out.root, set()
    while out.root not in seen:
        seen.add(out.root)
        record = out.run_record()
        if record is None:
            break
        thresholds = [m.get("threshold") for m in record.get("models") or () if m.get("stage") == "capfilt"]
        if thresholds and isinstance(thresholds[-1], (int, float)):
            return float(thresholds[-1])
        source = (record["pipeline"].get("input") or {}).get("path")
        if not isinstance(source, str):
            break
        out = OutputDir.open(source)
        if not out.fs.isdir(out.root) or detect_layout(out.fs, out.root) != "mmcurate":
            break
    raise UsageError(
        f"{origin}: no run.json records the capfilt threshold of its 'captions' column, so which synthetic captions"
        " capfilt kept is unknown; use caption='web' or run capfilt again"
    )


def draw(seed: int, key: str, epoch: int) -> float:
    """A number in [0, 1) fixed by the seed, the key and the epoch (the same in every worker and rank)."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def web_caption(row: dict[str, Any]) -> str | None:
    """The source caption, None when blank: capfilt's ``web`` candidate when capfilt ran (``caption`` then
    holds its pick, which may be synthetic), else ``caption``."""
    candidates = row.get("captions")
    if candidates is None:
        text = row.get("caption")
    else:
        text = next((c["text"] for c in candidates if c["source"] == WEB), None)
    return text if text and text.strip() else None


def synthetic_caption(row: dict[str, Any], threshold: float) -> str | None:
    """The highest-scoring synthetic candidate of ``captions`` that passed capfilt's filter (score at least
    ``threshold``); None when the row has none."""
    kept = [c for c in row.get("captions") or () if c["source"] == SYNTHETIC and passes(c["score"], threshold)]
    return max(kept, key=lambda c: c["score"])["text"] if kept else None


def choose(row: dict[str, Any], choice: str | float, seed: int, epoch: int, threshold: float | None) -> tuple[str, str] | None:
    """(caption, its source) of a row for ``choice``, or None when the row has no caption to give:

    - ``web``: the web caption only;
    - ``synthetic``: the best kept synthetic caption, else the web caption;
    - p: the synthetic caption when the seeded draw is below p, else the web caption; a row with only
      one of the two gets that one.

    ``threshold`` is capfilt's (:func:`capfilt_threshold`); unused for ``web``.
    """
    web = web_caption(row)
    if choice == WEB:
        return (web, WEB) if web is not None else None
    assert threshold is not None, "a synthetic caption needs capfilt's threshold"
    synthetic = synthetic_caption(row, threshold)
    want_synthetic = choice == SYNTHETIC or draw(seed, row["key"], epoch) < choice
    if synthetic is not None and (want_synthetic or web is None):
        return synthetic, SYNTHETIC
    return (web, WEB) if web is not None else None
