"""Global stages on Spark: Spark jobs over a segment's intermediate files.

A :class:`ClusterStage` (exact, pHash, MinHash dedup) runs the steps of ``ClusterStage.decide``:

1. explode: ``mapInArrow`` over shard ids calls ``group_keys`` on each shard's kept rows ->
   ``(key, group)`` rows (for MinHash one per LSH band);
2. group: distinct ``(group, key)``, group sizes and smallest keys; groups of at most
   ``max_group_size`` pair every two members (a self-join, ``a < b``), larger ones pair their
   smallest key with each other member: the rule of :func:`stages.base.candidate_pairs`;
3. verify: join the pairs with the kept rows' global columns on both keys; ``mapInArrow`` calls
   ``verify``;
4. connected components by iterative joins: every key starts with itself as label and takes the
   smallest label among its neighbours until no label changes; a component's label is then its
   smallest key, the one kept.

Only the decision, the keys to reject with the key they duplicate, is collected on the driver and
written as one Parquet file, as the local runner writes it. Other global stages (top-fraction
selection) collect ``key`` + their few ``global_columns`` of the kept rows and call ``decide``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
from mmcurate.dedup.cluster import ClusterStage
from mmcurate.engines.intermediate import columns_schema, kept_rows
from mmcurate.engines.run import RunContext
from mmcurate.engines.worker_state import ready
from mmcurate.stages.base import GlobalStage, decisions
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

EDGES = "a string, b string"


def shard_frame(spark: SparkSession, ids: list[int]) -> DataFrame:
    """A DataFrame of shard ids, one partition per shard."""
    return spark.createDataFrame(spark.sparkContext.parallelize([(i,) for i in ids], max(1, len(ids))), "shard long")


def global_decisions(spark: SparkSession, ctx: RunContext, index: int) -> pa.Table:
    """The decision table of the global stage that ends segment ``index``."""
    stage = ctx.segments[index].global_stage
    if not ctx.reader.shards:  # an empty input: nothing to decide
        return decisions([], "")
    shards = shard_frame(spark, [p.shard_id for p in ctx.reader.shards])
    schema = columns_schema(ctx, index, stage)
    carried = spark_arrow_schema(schema)
    rows = shards.mapInArrow(partial(_kept_rows, ctx, index, stage, carried), from_arrow_schema(carried))
    if not isinstance(stage, ClusterStage):
        stage.setup()
        return stage.decide(rows.toArrow().cast(schema))
    groups = shards.mapInArrow(partial(_group_keys, ctx, index, stage), "key string, group long")
    pairs = candidate_pairs(groups, stage.max_group_size)
    columns = list(stage.global_columns)
    left = rows.select(F.col("key").alias("a"), *(F.col(c).alias(f"a{c}") for c in columns))
    right = rows.select(F.col("key").alias("b"), *(F.col(c).alias(f"b{c}") for c in columns))
    edges = pairs.join(left, "a").join(right, "b").mapInArrow(partial(_verify, stage), EDGES)
    labels = components(edges)
    table = labels.filter(F.col("node") != F.col("label")).orderBy("node").toArrow()
    return decisions(table.column("node"), stage.reason, table.column("label"))


def candidate_pairs(groups: DataFrame, max_group_size: int) -> DataFrame:
    """Distinct ``(a, b)``, ``a < b``: the pairs :func:`stages.base.candidate_pairs` makes."""
    members = groups.select("group", "key").distinct()
    sizes = members.groupBy("group").agg(F.count("*").alias("n"), F.min("key").alias("first")).filter("n > 1")
    members = members.join(sizes, "group")
    small = members.filter(F.col("n") <= max_group_size).select("group", "key")
    pairs = (
        small.alias("l")
        .join(small.alias("r"), "group")
        .where(F.col("l.key") < F.col("r.key"))
        .select(F.col("l.key").alias("a"), F.col("r.key").alias("b"))
    )
    large = members.filter((F.col("n") > max_group_size) & (F.col("key") != F.col("first"))).select(
        F.col("first").alias("a"), F.col("key").alias("b")
    )
    return pairs.unionByName(large).distinct()


def components(edges: DataFrame) -> DataFrame:
    """``(node, label)``: every key of an edge with the smallest key of its connected component,
    by min-label propagation (one join and aggregation per round, until no label changes)."""
    edges = edges.localCheckpoint()
    both = edges.select(F.col("a").alias("src"), F.col("b").alias("dst")).unionByName(
        edges.select(F.col("b").alias("src"), F.col("a").alias("dst"))
    )
    labels = both.select(F.col("src").alias("node")).distinct().withColumn("label", F.col("node")).localCheckpoint()
    while True:
        offers = both.join(labels.withColumnRenamed("node", "src"), "src").select(F.col("dst").alias("node"), "label")
        update = offers.unionByName(labels).groupBy("node").agg(F.min("label").alias("label")).localCheckpoint()
        changed = update.join(labels.withColumnRenamed("label", "old"), "node").filter(F.col("label") != F.col("old")).count()
        labels = update
        if not changed:
            return labels


def spark_arrow_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the Arrow types Spark cannot take (fixed-size binary) widened (binary)."""
    return pa.schema([f.with_type(pa.binary()) if pa.types.is_fixed_size_binary(f.type) else f for f in schema])


def _kept_rows(ctx: RunContext, segment: int, stage: GlobalStage, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for shard_id in batch.column("shard").to_pylist():
            yield from kept_rows(ctx, segment, stage, shard_id).cast(schema).to_batches()


def _group_keys(ctx: RunContext, segment: int, stage: ClusterStage, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for shard_id in batch.column("shard").to_pylist():
            groups = ready(stage).group_keys(kept_rows(ctx, segment, stage, shard_id))
            yield from groups.select(["key", "group"]).cast(pa.schema([("key", pa.string()), ("group", pa.int64())])).to_batches()


def _verify(stage: ClusterStage, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    columns = list(stage.global_columns)
    for batch in batches:
        table = pa.Table.from_batches([batch])
        left = table.select([f"a{c}" for c in columns]).rename_columns(columns)
        right = table.select([f"b{c}" for c in columns]).rename_columns(columns)
        ok = pc.fill_null(ready(stage).verify(left, right), False)
        yield from table.select(["a", "b"]).filter(ok).to_batches()
