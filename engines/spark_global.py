"""Global stages on Spark.

A :class:`ClusterStage` (exact, pHash, MinHash dedup) runs the phases of its global step
(:mod:`dedup.cluster`) as RDD tasks: a phase task's pieces are ``(partition, piece)`` records, and
``partitionBy`` on the partition number routes piece ``p`` of every task to partition ``p`` of the
next phase, one Spark shuffle per phase. Only the verified edges come back to the driver.

Other global stages (top-fraction selection) collect ``key`` + their few ``global_columns`` of the
kept rows and call ``decide``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
from pyspark import RDD
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from mmcurate.dedup.cluster import ClusterStage, ClusterStep, run_step
from mmcurate.engines.intermediate import columns_schema, kept_rows
from mmcurate.engines.run import RunContext
from mmcurate.engines.worker_state import run_phase
from mmcurate.stages.base import Stage, decisions


def shard_frame(spark: SparkSession, ids: list[int]) -> DataFrame:
    """A DataFrame of shard ids, one partition per shard."""
    return spark.createDataFrame(spark.sparkContext.parallelize([(i,) for i in ids], max(1, len(ids))), "shard long")


def global_decisions(spark: SparkSession, ctx: RunContext, index: int) -> pa.Table:
    """The decision table of the global stage that ends segment ``index``."""
    stage = ctx.segments[index].global_stage
    if not ctx.reader.shards:  # an empty input: nothing to decide
        return decisions([], "")
    ids = [p.shard_id for p in ctx.reader.shards]
    schema = columns_schema(ctx, index, stage)
    if not isinstance(stage, ClusterStage):
        carried = spark_arrow_schema(schema)
        rows = shard_frame(spark, ids).mapInArrow(partial(_kept_rows, ctx, index, stage, carried), from_arrow_schema(carried))
        return ctx.global_stage(index).decide(rows.toArrow().cast(schema))
    cpus = spark.sparkContext.defaultParallelism
    step = ClusterStep(stage, partial(kept_rows, ctx, index, stage), schema, max(1, min(len(ids), 2 * cpus)))
    return run_step(step, ids, SparkExchange(spark, ctx, index), maps=4 * cpus)


class SparkExchange:
    """The :class:`dedup.cluster.Exchange` of Spark: pieces are ``(partition, piece)`` records of an
    RDD partitioned by their partition number."""

    def __init__(self, spark: SparkSession, ctx: RunContext, segment: int) -> None:
        self.context = spark.sparkContext
        self.run = partial(run_phase, ctx, segment)  # a phase with the segment's global stage set up in the worker

    def scatter(self, step: ClusterStep, phase: str, inputs: list[tuple]) -> RDD:
        tasks = self.context.parallelize(inputs, len(inputs))
        run = self.run
        return tasks.flatMap(lambda args: enumerate(run(step, phase, *args))).partitionBy(step.parts, _partition)

    def exchange(self, step: ClusterStep, phase: str, pieces: RDD) -> RDD:
        run = self.run
        pieces = pieces.mapPartitions(lambda records: enumerate(run(step, phase, *(piece for _, piece in records))))
        return pieces.partitionBy(step.parts, _partition)

    def gather(self, step: ClusterStep, phase: str, pieces: RDD) -> list:
        run = self.run
        return pieces.mapPartitions(lambda records: [run(step, phase, *(piece for _, piece in records))]).collect()


def _partition(part: int) -> int:
    return part


def spark_arrow_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the Arrow types Spark cannot take (fixed-size binary) widened (binary)."""
    return pa.schema([f.with_type(pa.binary()) if pa.types.is_fixed_size_binary(f.type) else f for f in schema])


def _kept_rows(
    ctx: RunContext, segment: int, stage: Stage, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for shard_id in batch.column("shard").to_pylist():
            yield from kept_rows(ctx, segment, stage, shard_id).cast(schema).to_batches()
