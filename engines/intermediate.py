"""What is read from a segment's intermediate files (``OUT/_work/segN/ID.arrow``): by its global
step, the kept rows' ``key`` + global columns of one shard and their Arrow types; by the next
segment, the shard's rows without the global step's internal state."""

from __future__ import annotations

import pyarrow as pa

from mmcurate.engines.core import kept_mask
from mmcurate.engines.run import RunContext
from mmcurate.stages.base import Stage


def kept_rows(ctx: RunContext, segment: int, stage: Stage, shard_id: int, keys_only: bool = False) -> pa.Table:
    """``key`` + ``stage.global_columns`` (or ``key`` alone) of the kept rows of one shard."""
    columns = [] if keys_only else list(stage.global_columns)
    table = ctx.out.read_scratch(ctx.intermediate_path(segment, shard_id), ["key", "reject_reason", *columns])
    if table.column("reject_reason").null_count < table.num_rows:  # some rows were rejected (no copy of the columns otherwise)
        table = table.filter(kept_mask(table))
    return table.select(["key", *columns])


def columns_schema(ctx: RunContext, segment: int, stage: Stage) -> pa.Schema:
    """Arrow types of ``key`` + ``stage.global_columns``, from an intermediate file's footer."""
    schema = ctx.out.scratch_schema(ctx.intermediate_path(segment, ctx.reader.shards[0].shard_id))
    return pa.schema([schema.field(n) for n in ("key", *stage.global_columns)])


def next_segment_rows(ctx: RunContext, segment: int, shard_id: int) -> pa.Table:
    """The rows of one shard as ``segment`` left them, less the internal global columns (``_*``, such
    as MinHash signatures) of the global stage that ended it: its decision has replaced them."""
    internal = {c for c in ctx.segments[segment].global_stage.global_columns if c.startswith("_")}
    table = ctx.out.read_scratch(ctx.intermediate_path(segment, shard_id))
    return table.select([name for name in table.column_names if name not in internal])
