"""A run's totals from its ``_stats`` ledger: rows in, kept, rejected by stage and by reason (engines end a
run with it; ``mmcurate stats`` and ``mmcurate report`` show it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from mmcurate.shards.layout import STATS, OutputDir

_STATS_KEYS = ("stage", "rows_in", "rejected", "reasons", "seconds")


def summarise(out: OutputDir, shard_ids: Iterable[int]) -> dict:
    """Totals over the ``_stats`` files of ``shard_ids`` that exist: rows in, kept, rejected by stage and by reason."""
    totals = {"shards": 0, "rows_in": 0, "kept": 0, "rejected": 0}
    by_stage: dict[str, dict] = {}
    for shard_id in shard_ids:
        path = out.stats_path(shard_id)
        if not out.exists(path):
            continue
        stats = out.read_json(path)
        totals["shards"] += 1
        for key in ("rows_in", "kept", "rejected"):
            totals[key] += stats[key]
        for entry in stats["stages"]:
            agg = by_stage.setdefault(entry["stage"], {"rows_in": 0, "rejected": 0, "reasons": Counter(), "seconds": 0.0})
            agg["rows_in"] += entry["rows_in"]
            agg["rejected"] += entry["rejected"]
            agg["reasons"].update(entry["reasons"])
            agg["seconds"] += entry["seconds"]
            for name, value in entry.items():  # a stage's own integer entries (oom_halvings, hosts_tripped): summed
                if name not in _STATS_KEYS and isinstance(value, int):
                    agg[name] = agg.get(name, 0) + value
    for agg in by_stage.values():
        agg["reasons"] = dict(agg["reasons"].most_common())
        agg["seconds"] = round(agg["seconds"], 3)
    return {**totals, "stages": by_stage}


def output_summary(out: OutputDir) -> dict:
    """:func:`summarise` over an output's shards: those its ``run.json`` plans, or the ``_stats`` files present without one."""
    record = out.run_record()
    return summarise(out, range(record["shards"]) if record else out.shard_ids(STATS))


def rate(rows: int, seconds: float) -> str:
    """Rows per second, formatted (``-`` without time): the progress lines and the summary table show it."""
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"
