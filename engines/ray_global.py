"""Global stages on Ray, computed with Ray Data shuffles over a segment's intermediate files.

A :class:`ClusterStage` (exact, pHash, MinHash dedup) runs the three steps of its in-memory
reference, ``ClusterStage.decide``, distributed:

1. group keys: one task per shard reads the kept rows' ``key`` + ``global_columns`` and calls
   ``group_keys`` -> ``(key, group, _shard)``;
2. candidate pairs: hash-repartition by ``group``; each block pairs its groups with
   :func:`stages.base.candidate_pairs` (singleton groups, most of them, are dropped first);
3. verify: repartition the pairs by the left key's shard, attach the left side's global columns
   read from that shard's intermediate file (a column projection, no shuffle of the dataset),
   repartition by the right key's shard, attach the right side and call ``verify``.

Only the verified edges, the duplicate pairs, come back to the driver, where
:func:`stages.base.components` keeps the smallest key of every component, exactly as the reference.
Other global stages (top-fraction selection) collect ``key`` + their few ``global_columns`` of the
kept rows on the driver and call ``decide``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from mmcurate.engines.intermediate import columns_schema, kept_rows
from mmcurate.engines.run import RunContext
from mmcurate.engines.worker_state import ready
from mmcurate.stages.base import ClusterStage, GlobalStage, candidate_pairs, components, decisions

SHARD = "_shard"
PAIRS = pa.schema([("a", pa.string()), ("a_shard", pa.int64()), ("b", pa.string()), ("b_shard", pa.int64())])
EDGES = pa.schema([("a", pa.string()), ("b", pa.string())])


def shard_dataset(ids: list[int]) -> ray.data.Dataset:
    """One block per shard id: the seed of every per-shard Ray Data plan."""
    return ray.data.from_items([{"shard": i} for i in ids], override_num_blocks=max(1, len(ids)))


def global_decisions(ctx: RunContext, index: int) -> pa.Table:
    """The decision table of the global stage that ends segment ``index``."""
    stage = ctx.segments[index].global_stage
    if not ctx.reader.shards:  # an empty input: nothing to decide
        return decisions([], "")
    ids = [p.shard_id for p in ctx.reader.shards]
    kw = {"batch_format": "pyarrow", "batch_size": None}
    args = {"ctx": ctx, "segment": index, "stage": stage}
    if not isinstance(stage, ClusterStage):
        rows = shard_dataset(ids).map_batches(_kept_rows, fn_kwargs=args, **kw)
        stage.setup()
        return stage.decide(_collect(rows, columns_schema(ctx, index, stage)))
    partitions = max(1, min(len(ids), 2 * int(ray.cluster_resources().get("CPU", 1))))
    schema = columns_schema(ctx, index, stage)
    groups = shard_dataset(ids).map_batches(_group_keys, fn_kwargs=args, **kw)
    pairs = groups.repartition(partitions, keys=["group"]).map_batches(_pairs, fn_kwargs={"max_group_size": stage.max_group_size}, **kw)
    left = pairs.repartition(partitions, keys=["a_shard"]).map_batches(_attach_left, fn_kwargs={**args, "schema": schema}, **kw)
    edges = _collect(left.repartition(partitions, keys=["b_shard"]).map_batches(_verify, fn_kwargs={**args, "schema": schema}, **kw), EDGES)
    keys, keepers = components(np.array(edges.column("a").to_pylist(), dtype=object), np.array(edges.column("b").to_pylist(), dtype=object))
    return decisions(keys, stage.reason, keepers)


def _collect(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.select(schema.names) for t in parts]) if parts else schema.empty_table()


def _kept_rows(batch: pa.Table, ctx: RunContext, segment: int, stage: GlobalStage) -> pa.Table:
    return pa.concat_tables([kept_rows(ctx, segment, stage, i) for i in batch.column("shard").to_pylist()])


def _group_keys(batch: pa.Table, ctx: RunContext, segment: int, stage: ClusterStage) -> pa.Table:
    parts = []
    for shard_id in batch.column("shard").to_pylist():
        groups = ready(stage).group_keys(kept_rows(ctx, segment, stage, shard_id)).select(["key", "group"])
        parts.append(groups.append_column(SHARD, pa.array(np.full(groups.num_rows, shard_id), pa.int64())))
    return pa.concat_tables(parts)


def _pairs(batch: pa.Table, max_group_size: int) -> pa.Table:
    """Candidate pairs of the block's groups (whole groups: the block is a hash partition by group)."""
    counts = batch.group_by("group").aggregate([("key", "count")])
    batch = batch.filter(
        pc.is_in(batch.column("group"), value_set=counts.filter(pc.greater(counts.column("key_count"), 1)).column("group"))
    )
    left, right = candidate_pairs(batch.select(["key", "group"]), max_group_size)
    a, b = pa.array(left, pa.string()), pa.array(right, pa.string())
    shard = batch.column(SHARD)
    return pa.Table.from_arrays(
        [
            a,
            pc.take(shard, pc.index_in(a, value_set=batch.column("key"))),
            b,
            pc.take(shard, pc.index_in(b, value_set=batch.column("key"))),
        ],
        schema=PAIRS,
    )


def _side(ctx: RunContext, segment: int, stage: GlobalStage, shard_id: int, keys: pa.Array) -> pa.Table:
    """Global columns of ``keys`` (all in shard ``shard_id``), aligned with them."""
    rows = kept_rows(ctx, segment, stage, shard_id)
    return rows.select(list(stage.global_columns)).take(pc.index_in(keys, value_set=rows.column("key")))


def _attach_left(batch: pa.Table, ctx: RunContext, segment: int, stage: ClusterStage, schema: pa.Schema) -> pa.Table:
    """Unique pairs of the block with the left key's global columns as ``_a_<column>``."""
    out_schema = pa.schema(
        [PAIRS.field("a"), PAIRS.field("b"), PAIRS.field("b_shard"), *(f.with_name(f"_a_{f.name}") for f in schema if f.name != "key")]
    )
    parts = [out_schema.empty_table()]
    for shard_id in pc.unique(batch.column("a_shard")).to_pylist():
        pairs = batch.filter(pc.equal(batch.column("a_shard"), shard_id)).group_by(["a", "b", "b_shard"], use_threads=False).aggregate([])
        side = _side(ctx, segment, stage, shard_id, pairs.column("a"))
        parts.append(
            pa.Table.from_arrays([pairs.column("a"), pairs.column("b"), pairs.column("b_shard"), *side.columns], schema=out_schema)
        )
    return pa.concat_tables(parts)


def _verify(batch: pa.Table, ctx: RunContext, segment: int, stage: ClusterStage, schema: pa.Schema) -> pa.Table:
    """The block's pairs that ``stage.verify`` confirms, as ``(a, b)``."""
    columns = list(stage.global_columns)
    parts = [EDGES.empty_table()]
    for shard_id in pc.unique(batch.column("b_shard")).to_pylist():
        pairs = batch.filter(pc.equal(batch.column("b_shard"), shard_id))
        left = pairs.select([f"_a_{c}" for c in columns]).rename_columns(columns)
        right = _side(ctx, segment, stage, shard_id, pairs.column("b"))
        ok = pc.fill_null(ready(stage).verify(left, right), False)
        parts.append(pairs.select(["a", "b"]).filter(ok).cast(EDGES))
    return pa.concat_tables(parts)
