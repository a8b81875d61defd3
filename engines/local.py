"""The in-process engine: shards in a local process pool, global steps in the driver.

A pipeline is cut into segments at its global stages. Each segment runs shard by shard; a segment
that ends in a global stage leaves its shard's rows in ``OUT/_work/segN/`` and the global step writes
its decision to ``OUT/_work/globalN.parquet``. The last segment writes the final files, the done
marker last. Every file is atomic and every step skips what a previous run finished, so a run
killed at any point and started again gives the same output as one that was never interrupted.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa
from tqdm import tqdm

from mmcurate.engines.core import run_segment, shard_stats, start_ledger
from mmcurate.engines.intermediate import kept_rows
from mmcurate.engines.run import RunContext, finish_run, start_run
from mmcurate.pipelines.config import Pipeline
from mmcurate.shards.readers import Reader, ShardPlan
from mmcurate.shards.writers import write_shard

# Per-worker state: the run context with its stages, set up lazily once per worker.
_CONTEXT: RunContext | None = None
_READY: set[str] = set()
PARENT_POLL_SECONDS = 0.5


def _init_worker(pipeline: Pipeline, reader: Reader, parent: int | None = None) -> None:
    """Set up a worker's run context; a pool worker (``parent`` given) exits when its parent dies."""
    global _CONTEXT
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="mmcurate-parent-watch").start()
    _CONTEXT = RunContext.create(pipeline, reader)
    _READY.clear()


def _exit_with_parent(parent: int) -> None:
    """Poll the parent's pid: once the parent is gone (even killed with SIGKILL, which runs no
    clean-up), the worker is re-parented and leaves at once instead of working on for nobody."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _process_shard(plan: ShardPlan, segment_index: int) -> int:
    return process_shard(_CONTEXT, plan, segment_index, _READY)


def process_shard(ctx: RunContext, plan: ShardPlan, segment_index: int, ready: set[str]) -> int:
    """Run one segment of the pipeline on one shard; write its intermediate or final files.

    ``ready`` names the stages of ``ctx`` already set up in this worker (the Spark engine runs
    shards through this same function).
    """
    segment = ctx.segments[segment_index]
    for stage in segment.stages:
        if stage.name not in ready:
            stage.setup()
            ready.add(stage.name)
    out = ctx.out
    if segment_index == 0:
        table = start_ledger(ctx.reader.read(plan))
    else:
        table = out.read_parquet(ctx.work_path(segment_index - 1, plan.shard_id, ".parquet"))
    decisions = ctx.decisions(segment_index - 1) if segment_index else None
    table = run_segment(segment, table, decisions)
    if segment_index == len(ctx.segments) - 1:
        stats = shard_stats(plan.shard_id, table, ctx.stages)
        write_shard(out, ctx.pipeline.output, plan.shard_id, table, ctx.columns, stats)
    else:
        out.write_parquet(ctx.work_path(segment_index, plan.shard_id, ".parquet"), table)
    return plan.rows


def run_local(pipeline: Pipeline, progress: bool = True) -> dict:
    """Run ``pipeline`` with a pool of ``pipeline.workers`` processes; return the run summary."""
    ctx = start_run(pipeline, "local")
    if ctx.finished:
        return finish_run(ctx)
    pool = None
    if pipeline.workers > 1 and len(ctx.pending()) > 1:
        pool = ProcessPoolExecutor(
            pipeline.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(ctx.pipeline, ctx.reader, os.getpid())
        )
    else:
        _init_worker(ctx.pipeline, ctx.reader)
    try:
        for index, segment in enumerate(ctx.segments):
            todo = ctx.pending(index)
            _map(pool, todo, index, f"segment {index + 1}/{len(ctx.segments)}" if len(ctx.segments) > 1 else "shards", progress)
            if ctx.needs_global(index):
                stage = segment.global_stage
                stage.setup()
                parts = [kept_rows(ctx, index, stage, p.shard_id) for p in ctx.reader.shards]
                table = pa.concat_tables(parts) if parts else pa.table({"key": pa.array([], pa.string())})
                ctx.out.write_parquet(ctx.global_path(index), stage.decide(table))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return finish_run(ctx)


def _map(pool: ProcessPoolExecutor | None, todo: list[ShardPlan], segment: int, label: str, progress: bool) -> None:
    bar = tqdm(total=sum(p.rows for p in todo), unit="rows", desc=label, disable=not progress or None, file=sys.stderr)
    run: Callable[[ShardPlan], int] = lambda plan: _process_shard(plan, segment)  # noqa: E731
    results: Iterable[int]
    if pool is None:
        results = map(run, todo)
    else:
        results = pool.map(_process_shard, todo, [segment] * len(todo))
    for rows in results:
        bar.update(rows)
    bar.close()
