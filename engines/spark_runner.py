"""The Spark engine: shards are Spark tasks; global stages are Spark jobs (see :mod:`spark_global`).

Each segment is one ``mapInArrow`` over a DataFrame of shard ids, one partition per shard. The
Python worker runs the shard through the same stage objects and the same per-shard function as
the local runner (:func:`engines.local.process_shard`): read, stages, write per shard id, so the
files, stats and done markers are the local runner's. A shard's rows stay in the Python worker;
only ``(shard, rows)`` goes back through Spark. Stages are set up once per Python worker process.

Uses the active SparkSession (``spark-submit`` creates it: see ``jobs/spark_job.py``), or starts
``local[workers]``. Model stages (:mod:`mmcurate.stages.model`) are refused: they run on the local
or Ray engine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial

import pyarrow as pa
from pyspark.sql import SparkSession

from mmcurate.engines.local import process_shard
from mmcurate.engines.progress import SegmentProgress, ShardDone, global_step
from mmcurate.engines.run import RunContext, finish_run, start_run
from mmcurate.engines.spark_global import global_decisions, shard_frame
from mmcurate.engines.worker_state import worker_context
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import Pipeline
from mmcurate.pipelines.registry import stage_class
from mmcurate.stages.model import ModelStage

DONE_SCHEMA = "shard long, done string"  # done: the shard's ShardDone, encoded


def run_spark(pipeline: Pipeline, progress: bool = True) -> dict:
    """Run ``pipeline`` on Spark and return the run summary."""
    models = [spec.name for spec in pipeline.stages if issubclass(stage_class(spec.name), ModelStage)]
    if models:
        raise UsageError(f"stage {models[0]} runs a model: use --engine local or ray (Spark runs CPU stages only)")
    ctx = start_run(pipeline, "spark")
    if ctx.finished:
        return finish_run(ctx)
    spark, started = session(pipeline.workers)
    try:
        for index in range(len(ctx.segments)):
            todo = [p.shard_id for p in ctx.pending(index)]
            kept = _run_segment(spark, ctx, index, todo, progress) if todo else 0
            if ctx.needs_global(index):
                rows = kept if len(todo) == len(ctx.reader.shards) else None  # None: some shards ran before a resume
                with global_step(ctx.global_stage(index).label, rows, progress) as rejected:
                    decision = global_decisions(spark, ctx, index)
                    rejected.append(decision.num_rows)
                ctx.write_decision(index, decision)
    finally:
        if started:
            spark.stop()
    return finish_run(ctx)


def session(workers: int) -> tuple[SparkSession, bool]:
    """The active SparkSession, or a new ``local[workers]`` one; whether this call started it."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    # Python workers run this interpreter (the one mmcurate is installed in), not whatever `python3`
    # comes first on PATH; PySpark reads the variable when it starts the context.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # A local session needs no network: without SPARK_LOCAL_IP Spark binds its driver and block manager
    # to the host's first non-loopback address (and warns about it). An address the user set is kept.
    local_ip = os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (
        SparkSession.builder.master(f"local[{workers}]")
        .appName("mmcurate")
        .config("spark.driver.host", local_ip)  # also where this process launched Spark's JVM before the variable was set
        .config("spark.driver.bindAddress", local_ip)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(max(2, 2 * workers)))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


def _run_segment(spark: SparkSession, ctx: RunContext, index: int, todo: list[int], progress: bool) -> int:
    """One job over the shards, all at once (``toLocalIterator`` would run a job per shard, one after
    another); the progress bar counts finished shards from Spark's status tracker. Returns their rows still kept."""
    done = shard_frame(spark, todo).mapInArrow(partial(_process, ctx, index), DONE_SCHEMA)
    label = f"segment {index + 1}/{len(ctx.segments)}" if len(ctx.segments) > 1 else "shards"
    bar = SegmentProgress(f"spark {label}", len(todo), progress, unit="shards")
    tracker = spark.sparkContext.statusTracker()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(done.collect)
        try:
            while not job.done():
                stages = [tracker.getStageInfo(i) for i in tracker.getActiveStageIds()]
                bar.advance_to(sum(s.numCompletedTasks for s in stages if s is not None))
                wait([job], timeout=0.5)
        except BaseException:  # e.g. Ctrl-C: stop the job rather than wait for it
            spark.sparkContext.cancelAllJobs()
            raise
        results = job.result()
    for row in results:
        bar.update(ShardDone.decode(row["done"]))
    bar.advance_to(len(results))
    bar.close()
    return bar.kept


def _process(ctx: RunContext, segment: int, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    ctx = worker_context(ctx)
    for batch in batches:
        for shard_id in batch.column("shard").to_pylist():
            done = process_shard(ctx, ctx.reader.shards[shard_id], segment).encode()
            yield pa.record_batch({"shard": pa.array([shard_id], pa.int64()), "done": pa.array([done], pa.string())})
