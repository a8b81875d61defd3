"""A run's summary (:func:`shards.summary.summarise`) as the lines ``mmcurate run`` and ``mmcurate stats`` print."""

from __future__ import annotations

from mmcurate.shards.summary import rate


def summary_lines(summary: dict, out: str) -> list[str]:
    """The totals, then a table: per stage rows in, rejected, rows left, seconds (the stage's own time,
    over all workers), rows/s and the top reasons."""
    header = ("stage", "rows in", "rejected", "left", "seconds", "rows/s", "reasons")
    rows = []
    for name, stage in summary["stages"].items():
        reasons = ", ".join(f"{r} {n}" for r, n in list(stage["reasons"].items())[:3]) + (", ..." if len(stage["reasons"]) > 3 else "")
        left = stage["rows_in"] - stage["rejected"]
        speed = rate(stage["rows_in"], stage["seconds"])
        rows.append((name, str(stage["rows_in"]), str(stage["rejected"]), str(left), f"{stage['seconds']:.2f}", speed, reasons))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    cells = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))) for r in [header, *rows]
    ]
    totals = f"{summary['rows_in']} rows in {summary['shards']} shards: {summary['kept']} kept, {summary['rejected']} rejected -> {out}"
    return [totals, *(f"  {line}  {r[-1]}".rstrip() for line, r in zip(cells, [header, *rows], strict=True))]
