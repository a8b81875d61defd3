"""Helpers of the training tests: whether a loss fell."""

from __future__ import annotations


def fell(losses: list[float], window: int = 5) -> tuple[float, float]:
    """(mean of the first ``window`` losses, mean of the last ``window``)."""
    assert len(losses) >= 4 * window, losses
    return sum(losses[:window]) / window, sum(losses[-window:]) / window
