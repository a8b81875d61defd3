"""Engine-neutral pieces every runner uses: applying stages to a shard's rows, the rejects ledger
bookkeeping, global-stage decisions and per-shard stats. Runners only move tables between
readers, these functions and writers.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.stages.base import GlobalStage, Stage


@dataclass
class Segment:
    """Stages that run shard by shard, ended by the global stage whose decision needs every shard."""

    stages: list[Stage]
    global_stage: GlobalStage | None = None
    applies: GlobalStage | None = None  # the previous segment's global stage, whose decisions open this one


def segments(stages: list[Stage]) -> list[Segment]:
    """Cut the pipeline after each global stage."""
    result = [Segment([])]
    for stage in stages:
        result[-1].stages.append(stage)
        if isinstance(stage, GlobalStage):
            result[-1].global_stage = stage
            result.append(Segment([], applies=stage))
    return result


@dataclass
class ShardStats:
    """Row accounting of one shard: rows in, kept, rejected by stage and reason, seconds per stage."""

    shard: int
    rows_in: int = 0
    stages: list[dict] = field(default_factory=list)

    def record(self, stage: str, rows_in: int, reasons: Counter, seconds: float, extra: dict | None = None) -> None:
        """Add a stage's line; ``extra`` holds the stage's own entries (:meth:`Stage.shard_stats`)."""
        self.stages.append(
            {"stage": stage, "rows_in": rows_in, "rejected": sum(reasons.values()), "reasons": dict(sorted(reasons.items())), "seconds": round(seconds, 4), **(extra or {})}
        )

    def as_dict(self, kept: int) -> dict:
        rejected = sum(s["rejected"] for s in self.stages)
        return {"shard": self.shard, "rows_in": self.rows_in, "kept": kept, "rejected": rejected, "stages": self.stages}

    @classmethod
    def from_dict(cls, data: dict) -> ShardStats:
        return cls(data["shard"], data["rows_in"], list(data["stages"]))


def kept_mask(table: pa.Table) -> pa.ChunkedArray:
    return pc.is_null(table.column("reject_reason"))


def record_read(table: pa.Table, stats: ShardStats) -> None:
    """Count the rows the reader rejected (malformed rows, failed img2dataset downloads...)."""
    stats.rows_in = table.num_rows
    reasons = Counter(r for r in table.column("reject_reason").to_pylist() if r is not None)
    stats.record("read", table.num_rows, reasons, 0.0)


def apply_stage(stage: Stage, table: pa.Table, stats: ShardStats) -> pa.Table:
    """Run ``stage`` on the kept rows of ``table``; newly rejected rows get ``reject_stage``.

    Rows rejected earlier skip the stage and keep their place after the kept ones.
    """
    start = time.perf_counter()
    mask = kept_mask(table)
    kept, done = table.filter(mask), table.filter(pc.invert(mask))
    # A global stage runs even on no rows, so that every shard has the columns its global step reads.
    if kept.num_rows == 0 and not isinstance(stage, GlobalStage):
        stats.record(stage.name, 0, Counter(), 0.0, stage.shard_stats(kept))
        return table
    parts = []
    size = stage.batch_size or max(kept.num_rows, 1)
    for offset in range(0, max(kept.num_rows, 1), size):
        batch = kept.slice(offset, size)
        result = stage.process(batch)
        if result.num_rows != batch.num_rows or not result.column("key").equals(batch.column("key")):
            raise RuntimeError(f"stage {stage.name} returned other rows than it was given")
        parts.append(result)
    processed = pa.concat_tables(parts, promote_options="permissive")
    newly = pc.and_(pc.is_valid(processed.column("reject_reason")), pc.is_null(processed.column("reject_stage")))
    stage_col = pc.if_else(newly, pa.scalar(stage.name), processed.column("reject_stage"))
    processed = processed.set_column(processed.column_names.index("reject_stage"), "reject_stage", stage_col)
    rejected = processed.filter(newly)
    reasons = Counter(rejected.column("reject_reason").to_pylist())
    stats.record(stage.name, kept.num_rows, reasons, time.perf_counter() - start, stage.shard_stats(rejected))
    return pa.concat_tables([processed, done], promote_options="permissive")


def apply_decisions(stage: GlobalStage, table: pa.Table, decisions: pa.Table, stats: ShardStats) -> pa.Table:
    """Reject the kept rows whose key a global stage's decision names (removal by key, never position)."""
    start = time.perf_counter()
    index = pc.index_in(table.column("key"), value_set=decisions.column("key"))
    kept = kept_mask(table)
    hit = pc.and_(pc.is_valid(index), kept)
    picked = {name: pc.take(decisions.column(name), index) for name in ("reject_reason", "duplicate_of")}
    columns = {
        "reject_reason": pc.if_else(hit, picked["reject_reason"], table.column("reject_reason")),
        "reject_stage": pc.if_else(hit, pa.scalar(stage.name), table.column("reject_stage")),
        "duplicate_of": pc.if_else(hit, picked["duplicate_of"], table.column("duplicate_of") if "duplicate_of" in table.column_names else pa.nulls(table.num_rows, pa.string())),
    }
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    reasons = Counter(table.filter(hit).column("reject_reason").to_pylist())
    # The decision belongs to the global stage's accounting: add it to that stage's entry.
    for entry in reversed(stats.stages):
        if entry["stage"] == stage.name:
            entry["rejected"] += sum(reasons.values())
            merged = Counter(entry["reasons"]) + reasons
            entry["reasons"] = dict(sorted(merged.items()))
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 4)
            break
    else:
        stats.record(stage.name, int(pc.sum(kept).as_py() or 0), reasons, time.perf_counter() - start)
    return table


def run_segment(segment: Segment, table: pa.Table, stats: ShardStats, decisions: pa.Table | None) -> pa.Table:
    """Apply the previous global decision, then the segment's stages, to one shard."""
    if segment.applies is not None and decisions is not None:
        table = apply_decisions(segment.applies, table, decisions, stats)
    for stage in segment.stages:
        table = apply_stage(stage, table, stats)
    return table

