"""Engine-neutral pieces every runner uses: applying stages to a shard's rows, the rejects ledger
bookkeeping, global-stage decisions and per-shard stats from the ledger. Runners only move tables between
readers, these functions and writers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate import killpoints
from mmcurate.stages.base import Stage, set_column


@dataclass
class Segment:
    """Stages that run shard by shard, ended by the global stage whose decision needs every shard."""

    stages: list[Stage]
    start: int = 0  # pipeline position of the first stage
    global_stage: Stage | None = None
    applies: Stage | None = None  # the previous segment's global stage, whose decisions open this one

    @property
    def positions(self) -> range:
        """Pipeline positions of the segment's stages (the global stage last)."""
        return range(self.start, self.start + len(self.stages))


def segments(stages: list[Stage]) -> list[Segment]:
    """Cut the pipeline after each global stage."""
    result = [Segment([])]
    for position, stage in enumerate(stages):
        result[-1].stages.append(stage)
        if stage.is_global:
            result[-1].global_stage = stage
            result.append(Segment([], position + 1, applies=stage))
    return result


# The ledger: every row carries the pipeline position of the stage that rejected it (null while kept;
# READ_POSITION: the reader) and, per stage position, its share of that stage's seconds on the shard.
REJECTED_AT = "_rejected_at"
READ_POSITION = -1


def seconds_column(position: int) -> str:
    return f"_seconds_{position}"


def events_prefix(position: int) -> str:
    """Ledger columns ``_events_{position}_{name}``: counts of a stage's events (:meth:`Stage.events`)."""
    return f"_events_{position}_"


def _add_events(table: pa.Table, position: int, events: dict[str, int]) -> pa.Table:
    """Add a stage's event counts to its ledger columns (on the shard's first row)."""
    for name, count in events.items():
        column = events_prefix(position) + name
        previous = table.column(column).fill_null(0) if column in table.column_names else pa.array(np.zeros(table.num_rows, np.int64))
        table = set_column(table, column, pc.add(previous, pa.array((np.arange(table.num_rows) == 0) * count)), pa.int64())
    return table


def start_ledger(table: pa.Table) -> pa.Table:
    """A shard fresh from the reader: its rejected rows (malformed rows, failed img2dataset
    downloads...) are the reader's."""
    return mark_rejected(set_column(table, REJECTED_AT, pa.nulls(table.num_rows, pa.int16())), READ_POSITION)


def mark_rejected(table: pa.Table, position: int) -> pa.Table:
    """Set ``_rejected_at`` to ``position`` on the rows rejected since it was last set."""
    newly = pc.and_(pc.is_valid(table.column("reject_reason")), pc.is_null(table.column(REJECTED_AT)))
    return set_column(table, REJECTED_AT, pc.if_else(newly, pa.scalar(position, pa.int16()), table.column(REJECTED_AT)), pa.int16())


def _add_seconds(table: pa.Table, position: int, seconds: float, seen: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Share ``seconds`` among the rows a stage saw (``seen``), in the stage's seconds column."""
    name = seconds_column(position)
    n = int(pc.sum(seen).as_py() or 0)
    previous = table.column(name) if name in table.column_names else pa.array(np.zeros(table.num_rows))
    return set_column(table, name, pc.add(previous, pc.if_else(seen, seconds / max(n, 1), 0.0)), pa.float64())


def shard_stats(shard_id: int, table: pa.Table, stages: list[Stage]) -> dict:
    """A shard's stats from its ledger, for every engine: rows in, kept, and per stage (the reader
    first, then ``stages`` in pipeline order) the rows it saw, the rows it rejected by reason (by
    ``process`` or, for a global stage, by its decision), its seconds and its own entries
    (:meth:`Stage.shard_stats` of the rows it rejected)."""
    rejected = table.filter(pc.is_valid(table.column("reject_reason")))
    counts = rejected.group_by([REJECTED_AT, "reject_reason"]).aggregate([([], "count_all")]).to_pylist()
    by_position: dict[int, dict[str, int]] = {}
    for row in counts:
        by_position.setdefault(row[REJECTED_AT], {})[row["reject_reason"]] = row["count_all"]
    entries, gone = [], 0
    for position, stage in enumerate([None, *stages], start=READ_POSITION):
        reasons = dict(sorted(by_position.get(position, {}).items()))
        column = seconds_column(position)
        seconds = float(pc.sum(table.column(column)).as_py() or 0.0) if column in table.column_names else 0.0
        own = {} if stage is None else stage.shard_stats(rejected.filter(pc.equal(rejected.column(REJECTED_AT), position)))
        prefix = events_prefix(position)
        own |= {c.removeprefix(prefix): int(pc.sum(table.column(c)).as_py() or 0) for c in table.column_names if c.startswith(prefix)}
        entry = {"rows_in": table.num_rows - gone, "rejected": sum(reasons.values()), "reasons": reasons, "seconds": round(seconds, 4)}
        entries.append({"stage": "read" if stage is None else stage.label, **entry, **own})
        gone += sum(reasons.values())
    return {
        "shard": shard_id,
        "rows_in": table.num_rows,
        "kept": table.num_rows - rejected.num_rows,
        "rejected": rejected.num_rows,
        "stages": entries,
    }


def kept_mask(table: pa.Table) -> pa.ChunkedArray:
    return pc.is_null(table.column("reject_reason"))


# How a runner has a stage process a shard's kept rows: ``(stage, position, kept)`` to the processed
# rows, in order, and the stage's events (:meth:`Stage.events`).
Process = Callable[[Stage, int, pa.Table], tuple[pa.Table, dict[str, int]]]


def process_here(stage: Stage, position: int, kept: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """``stage.process`` on ``kept`` in this process, ``stage.batch_size`` rows per call, and the stage's events."""
    size = stage.batch_size or max(kept.num_rows, 1)
    parts = [stage.process(kept.slice(offset, size)) for offset in range(0, max(kept.num_rows, 1), size)]
    return pa.concat_tables(parts, promote_options="permissive"), stage.events()


def apply_stage(stage: Stage, table: pa.Table, position: int, process: Process = process_here) -> pa.Table:
    """Run ``stage`` (at pipeline ``position``) on the kept rows of ``table`` through ``process``; newly
    rejected rows get ``reject_stage`` and ``_rejected_at``, the rows it saw a share of its seconds.

    Rows rejected earlier skip the stage and keep their place after the kept ones.
    """
    start = time.perf_counter()
    mask = kept_mask(table)
    kept, done = table.filter(mask), table.filter(pc.invert(mask))
    # A global stage runs even on no rows, so that every shard has the columns its global step reads.
    if kept.num_rows == 0 and not stage.is_global:
        return table
    processed, events = process(stage, position, kept)
    if processed.num_rows != kept.num_rows or not processed.column("key").equals(kept.column("key")):
        raise RuntimeError(f"stage {stage.label} returned other rows than it was given")
    newly = pc.and_(pc.is_valid(processed.column("reject_reason")), pc.is_null(processed.column("reject_stage")))
    stage_col = pc.if_else(newly, pa.scalar(stage.label), processed.column("reject_stage"))
    processed = processed.set_column(processed.column_names.index("reject_stage"), "reject_stage", stage_col)
    table = mark_rejected(pa.concat_tables([processed, done], promote_options="permissive"), position)
    seen = pa.array(np.arange(table.num_rows) < kept.num_rows)
    killpoints.reached("stage")
    return _add_events(_add_seconds(table, position, time.perf_counter() - start, seen), position, events)


def apply_decisions(stage: Stage, position: int, table: pa.Table, decisions: pa.Table) -> pa.Table:
    """Reject the kept rows whose key a global stage's decision names (removal by key, never position);
    they count as rejected by the global stage at pipeline ``position``.

    ``duplicate_of`` names the kept copy: an earlier dedup's row that points at a key this decision
    removes as a duplicate is pointed on at that key's own kept copy, so chained dedups (captions, then
    images) never leave a pointer at a removed duplicate. The decision is global, so every shard
    re-points alike, whichever shard the kept copy lies in."""
    start = time.perf_counter()
    index = pc.index_in(table.column("key"), value_set=decisions.column("key"))
    kept = kept_mask(table)
    hit = pc.and_(pc.is_valid(index), kept)
    picked = {name: pc.take(decisions.column(name), index) for name in ("reject_reason", "duplicate_of")}
    previous = table.column("duplicate_of") if "duplicate_of" in table.column_names else pa.nulls(table.num_rows, pa.string())
    moved = pc.take(decisions.column("duplicate_of"), pc.index_in(previous, value_set=decisions.column("key")))
    previous = pc.if_else(pc.is_valid(moved), moved, previous)
    table = set_column(table, "reject_reason", pc.if_else(hit, picked["reject_reason"], table.column("reject_reason")))
    table = set_column(table, "reject_stage", pc.if_else(hit, pa.scalar(stage.label), table.column("reject_stage")))
    table = set_column(table, "duplicate_of", pc.if_else(hit, picked["duplicate_of"], previous))
    return _add_seconds(mark_rejected(table, position), position, time.perf_counter() - start, kept)


def run_segment(segment: Segment, table: pa.Table, decisions: pa.Table | None, process: Process = process_here) -> pa.Table:
    """Apply the previous global decision, then the segment's stages (through ``process``), to one shard's ledger."""
    if segment.applies is not None and decisions is not None:
        table = apply_decisions(segment.applies, segment.start - 1, table, decisions)
    for offset, stage in enumerate(segment.stages):
        table = apply_stage(stage, table, segment.start + offset, process)
    return table
