"""A run's totals from its ``_stats`` ledger: rows in, kept, rejected by stage and by reason (engines end a
run with it; ``mmcurate stats`` and ``mmcurate report`` show it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from mmcurate.errors import UsageError
from mmcurate.shards.layout import STATS, OutputDir, reading

_STATS_KEYS = ("stage", "rows_in", "rejected", "reasons", "seconds")
_COUNTS = ("rows_in", "kept", "rejected")


def read_stats(out: OutputDir, shard_id: int) -> dict:
    """A shard's ``_stats`` file (:func:`engines.core.shard_stats` wrote it), its shape checked: UsageError,
    one line naming the file, for one that is missing, not JSON, or holds a field of the wrong type."""
    path = out.stats_path(shard_id)
    with reading(out.fs, path):
        stats = out.read_json(path)
    problem = _stats_problem(stats)
    if problem:
        raise UsageError(f"{path}: damaged ({problem})")
    return stats


def _stats_problem(stats: object) -> str | None:
    """What is wrong with the shape of a parsed ``_stats`` file (None: nothing)."""
    if not isinstance(stats, dict):
        return "not a JSON object"
    for key in _COUNTS:
        if not _is_count(stats.get(key)):
            return f"{key} is {stats.get(key)!r}, not a count"
    if not isinstance(stats.get("stages"), list):
        return f"stages is {stats.get('stages')!r}, not a list"
    for entry in stats["stages"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("stage"), str):
            return f"stage entry {entry!r} names no stage"
        for key in ("rows_in", "rejected"):
            if not _is_count(entry.get(key)):
                return f"stage {entry['stage']}: {key} is {entry.get(key)!r}, not a count"
        reasons = entry.get("reasons")
        if not isinstance(reasons, dict) or not all(_is_count(n) for n in reasons.values()):
            return f"stage {entry['stage']}: reasons is {reasons!r}, not counts by reason"
        if not isinstance(entry.get("seconds"), int | float) or isinstance(entry.get("seconds"), bool):
            return f"stage {entry['stage']}: seconds is {entry.get('seconds')!r}, not a number"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def summarise(out: OutputDir, shard_ids: Iterable[int]) -> dict:
    """Totals over the ``_stats`` files of ``shard_ids`` that exist: rows in, kept, rejected by stage and by reason."""
    totals = {"shards": 0, "rows_in": 0, "kept": 0, "rejected": 0}
    by_stage: dict[str, dict] = {}
    for shard_id in shard_ids:
        if not out.exists(out.stats_path(shard_id)):
            continue
        stats = read_stats(out, shard_id)
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
