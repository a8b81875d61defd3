"""The in-process engine: shards in a local process pool, model stages in pools of their own,
global steps' phases in the pool (or in the driver without one).

A pipeline is cut into segments at its global stages. Each segment runs shard by shard; a segment
that ends in a global stage leaves its shard's rows in ``OUT/_work/segN/`` and the global step writes
its decision to ``OUT/_work/globalN.parquet``. The last segment writes the final files, the done
marker last. Every file is atomic and every step skips what a previous run finished, so a run
killed at any point and started again gives the same output as one that was never interrupted.

The CPU pool is forked before the run is planned, so its workers start with the engine imported
(:class:`ForkedPool`); where this process runs other threads, or cannot fork, it is spawned. With a
process pool, a segment's model stages (:class:`stages.model.ModelStage`) cut it into
steps: CPU stages run in the pool of ``workers`` processes, each model stage in a pool of its own
beside it, one worker per GPU, or on CPU one worker whose torch uses ``workers`` threads, so the
machine holds one copy of each model. A shard's table goes from step to step through the driver.
A dedup global step (:mod:`dedup.cluster`) runs its phases as tasks of the CPU pool, ``workers``
partitions each, their pieces passing between workers as files (:mod:`engines.pieces`), only their
names through the driver.

When whole shards would leave cores idle, a stage that splits rows (:attr:`Stage.split_rows`:
download) is spread over the workers instead (:func:`splits_shards`: a 4,000-row URL list is one
shard; 3 shards on 2 workers would end with one running alone): the driver then runs the
shards one after another, as with one worker, and cuts each shard's kept rows for that stage into
one piece per worker, one processed in the driver and the others in the pool at the same time,
their results passed back as files (:mod:`engines.pieces`). The pieces are joined in row order, so
the files are those of one worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Any

import numpy as np
import pyarrow as pa

from mmcurate import killpoints
from mmcurate.dedup import cluster
from mmcurate.dedup.cluster import ClusterStage, ClusterStep, InMemory
from mmcurate.engines.core import Process, Segment, process_here, run_segment, shard_stats, start_ledger
from mmcurate.engines.intermediate import columns_schema, kept_rows, next_segment_rows
from mmcurate.engines.pieces import StoredPiece, load, store
from mmcurate.engines.progress import SegmentProgress, ShardDone, global_step
from mmcurate.engines.run import RunContext, finish_run, start_run
from mmcurate.pipelines.config import Pipeline
from mmcurate.pipelines.registry import STAGES
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import Reader, ShardPlan
from mmcurate.shards.writers import write_shard
from mmcurate.stages.base import Stage
from mmcurate.stages.model import ModelStage

# Per-worker state: the run context, whose stages are set up lazily once per worker.
_CONTEXT: RunContext | None = None
PARENT_POLL_SECONDS = 0.5
# The kept rows of shards a pool worker read in a global step's phases, for its later phases (left
# and verify read again the shards bands read), at most STEP_ROWS_BYTES, the least recent dropped first.
_STEP_ROWS: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
STEP_ROWS_BYTES = 1 << 29


def _init_worker(pipeline: Pipeline, reader: Reader, registry: dict[str, str], devices: dict[int, str], parent: int | None = None) -> None:
    """Set up a worker's run context with the driver's stage registry and model devices; a pool
    worker (``parent`` given) exits when its parent dies."""
    global _CONTEXT
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="mmcurate-parent-watch").start()
    STAGES.update(registry)
    _CONTEXT = RunContext.create(pipeline, reader)
    for position, device in devices.items():
        _CONTEXT.stages[position].device = device


def _exit_with_parent(parent: int) -> None:
    """Poll the parent's pid: once the parent is gone (even killed with SIGKILL, which runs no
    clean-up), the worker is re-parented and leaves at once instead of working on for nobody."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _init_model_worker(worker: tuple, position: int, gpus: Any, threads: int) -> None:
    """A model pool's worker: its stage on the next free GPU, or on CPU with ``threads`` torch threads."""
    _init_worker(*worker)
    stage = _CONTEXT.stages[position]
    if stage.on_gpu and stage.device == "cuda":
        stage.device = f"cuda:{gpus.get()}"
    stage.threads = threads


def _run_step(plan: ShardPlan, segment_index: int, lo: int, hi: int, carried: pa.Table | None) -> Any:
    _STEP_ROWS.clear()  # shards run again: the global step is over
    return run_step(_CONTEXT, plan, segment_index, lo, hi, carried)


def _process_rows(position: int, rows: pa.Table, folder: str) -> tuple[StoredPiece, dict[str, int]]:
    """A piece of rows through a stage in a pool worker; the result stored in ``folder``."""
    _STEP_ROWS.clear()  # rows run again: the global step is over
    table, events = process_here(_CONTEXT.ready(position), position, rows)
    return store(table, folder), events


def _loaded(result: tuple[StoredPiece, dict[str, int]]) -> tuple[pa.Table, dict[str, int]]:
    """A pool worker's piece mapped from its file, which is removed (the mapping keeps its bytes)."""
    stored, events = result
    table = load(stored)
    os.unlink(stored.path)
    return table, events


def split_rows(pool: Executor, pieces: int, folder: str) -> Process:
    """Process a shard's kept rows in ``pieces`` pieces of consecutive rows at once, for the stages
    that :attr:`~Stage.split_rows`: the last piece in this process, the others in ``pool``, whose
    results come back as files in ``folder`` (:mod:`engines.pieces`: mapped, not piped); the
    results joined in row order. Other stages, and fewer rows than pieces, as :func:`process_here`."""

    def process(stage: Stage, position: int, kept: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        if not stage.split_rows or kept.num_rows < pieces:
            return process_here(stage, position, kept)
        size = -(-kept.num_rows // pieces)
        # Pieces taken, not sliced: a pickled slice carries all of its table's buffers.
        cut = [kept.take(np.arange(lo, min(lo + size, kept.num_rows))) for lo in range(0, kept.num_rows, size)]
        futures = [pool.submit(_process_rows, position, piece, folder) for piece in cut[:-1]]
        last = process_here(stage, position, cut[-1])
        results = [_loaded(future.result()) for future in futures] + [last]
        events: Counter[str] = Counter()
        for _, counts in results:
            events.update(counts)
        return pa.concat_tables([table for table, _ in results], promote_options="permissive"), dict(events)

    return process


def process_shard(ctx: RunContext, plan: ShardPlan, segment_index: int) -> ShardDone:
    """Run one segment of the pipeline on one shard; write its intermediate or final files (the
    Spark engine runs shards through this same function); return its :class:`ShardDone`."""
    return run_step(ctx, plan, segment_index, 0, len(ctx.segments[segment_index].stages), None)


def run_step(
    ctx: RunContext, plan: ShardPlan, segment_index: int, lo: int, hi: int, carried: pa.Table | None, process: Process = process_here
) -> Any:
    """Stages ``lo:hi`` of a segment on one shard (each set up once per process, run through
    ``process``): read it first (``carried`` is None) or take the table an earlier step returned;
    write its files after the segment's last stage (return its :class:`ShardDone`), else return the
    table for the next step."""
    segment = ctx.segments[segment_index]
    stages = [ctx.ready(position) for position in segment.positions[lo:hi]]
    out = ctx.out
    if carried is not None:
        table = carried
    elif segment_index == 0:
        table = start_ledger(ctx.reader.read(plan))
        killpoints.reached("read")
    else:
        table = next_segment_rows(ctx, segment_index - 1, plan.shard_id)
    decisions = ctx.decisions(segment_index - 1) if segment_index and carried is None else None
    applies = segment.applies if carried is None else None
    table = run_segment(Segment(stages, segment.start + lo, applies=applies), table, decisions, process)
    if hi < len(segment.stages):
        return table
    stats = shard_stats(plan.shard_id, table, ctx.stages)
    if segment_index == len(ctx.segments) - 1:
        write_shard(out, ctx.pipeline.output, plan.shard_id, table, ctx.columns, stats)
    else:
        out.write_scratch(ctx.intermediate_path(segment_index, plan.shard_id), table)
    return ShardDone.of(plan.rows, stats, segment, segment_index == 0)


def steps(segment: Segment) -> list[tuple[int, int]]:
    """The segment's stages as ``(lo, hi)`` ranges: each model stage alone, CPU stages between them."""
    models = [i for i, s in enumerate(segment.stages) if isinstance(s, ModelStage)]
    cuts = sorted({0, len(segment.stages), *models, *(i + 1 for i in models)})
    return list(itertools.pairwise(cuts)) or [(0, 0)]


def splits_shards(pending: int, workers: int, stages: list[Stage]) -> bool:
    """Whether to run the shards one after another, each one's rows spread over the workers: when a
    stage splits rows and a pool of whole shards would leave a worker idle at the end (fewer than
    ``2 * workers`` shards, not a multiple of ``workers``: 3 shards on 2 workers run 2, then 1 alone)."""
    return workers > 1 and pending < 2 * workers and pending % workers != 0 and any(stage.split_rows for stage in stages)


def usable_workers(workers: int, shards: int, split_rows: int | None) -> int:
    """Workers a run can use of ``workers``: one per shard (a pool's tasks are shards, or a global step's
    partitions, one per worker), or, where the rows of a shard are spread (:func:`splits_shards`), one per
    row of the largest pending shard (``split_rows``)."""
    return max(1, min(workers, shards if split_rows is None else split_rows))


def run_local(pipeline: Pipeline, progress: bool = True) -> dict:
    """Run ``pipeline`` with a pool of ``pipeline.workers`` processes, no more than it can use
    (:func:`usable_workers`), and one pool per model stage, or when :func:`splits_shards`, in this
    process with the rows of a download spread over the pool; return the run summary."""
    forked = ForkedPool(pipeline.workers) if ForkedPool.possible(pipeline.workers) else None
    pools: dict[int | None, Executor] = {}
    folders = contextlib.ExitStack()  # where the pool leaves the pieces of split shards, removed at the end
    try:
        ctx = start_run(pipeline, "local")
        if ctx.finished:
            return finish_run(ctx)
        pending = ctx.pending()
        split = splits_shards(len(pending), pipeline.workers, ctx.stages)
        workers = usable_workers(pipeline.workers, len(ctx.reader.shards), max((p.rows for p in pending), default=0) if split else None)
        ctx.pipeline = dataclasses.replace(ctx.pipeline, workers=workers)  # a global step's partitions, one per worker
        here: Process | None = process_here  # how shards run in this process; None: in the pools
        in_flight = workers  # shards in the pools at once, one per CPU worker and two per model worker: bounds memory
        devices = {position: stage.device for position, stage in enumerate(ctx.stages) if isinstance(stage, ModelStage)}
        worker = (ctx.pipeline, ctx.reader, dict(STAGES), devices)  # devices resolved here, on the driver
        spawn = multiprocessing.get_context("spawn")
        if split and workers > 1:
            pools[None] = forked.start(worker) if forked else _spawned_pool(workers - 1, worker)
            here = split_rows(pools[None], workers, folders.enter_context(_pieces_folder(ctx.out, "split")))
        elif workers > 1 and len(pending) > 1:
            here = None
            pools[None] = forked.start(worker) if forked else _spawned_pool(workers, worker)
            for position, stage in enumerate(ctx.stages):
                if isinstance(stage, ModelStage):
                    gpus = spawn.Queue()
                    size = _gpu_workers(stage)
                    for gpu in range(size):
                        gpus.put(gpu)
                    initargs = ((*worker, os.getpid()), position, gpus, pipeline.workers)
                    pools[position] = ProcessPoolExecutor(size, mp_context=spawn, initializer=_init_model_worker, initargs=initargs)
                    in_flight += 2 * size
        if here is not None:
            _init_worker(*worker)
        for index, segment in enumerate(ctx.segments):
            todo = ctx.pending(index)
            label = f"segment {index + 1}/{len(ctx.segments)}" if len(ctx.segments) > 1 else "shards"
            kept = _map(ctx, pools, in_flight, todo, index, label, progress, here)
            if ctx.needs_global(index):
                rows = kept if len(todo) == len(ctx.reader.shards) else None  # None: some shards ran before a resume
                with global_step(ctx.global_stage(index).label, rows, progress) as rejected:
                    decision = _decide(ctx, index, pools.get(None))
                    rejected.append(decision.num_rows)
                ctx.write_decision(index, decision)
    finally:
        if forked is not None:
            forked.close()
        for pool in pools.values():
            pool.shutdown(cancel_futures=True)
        folders.close()
    return finish_run(ctx)


def _spawned_pool(size: int, worker: tuple) -> ProcessPoolExecutor:
    """A CPU pool of ``size`` new interpreters, started now: they set up while this process goes on."""
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(size, mp_context=spawn, initializer=_init_worker, initargs=(*worker, os.getpid()))
    for _ in range(size):
        pool.submit(int)
    return pool


class ForkedPool:
    """The CPU pool forked first thing, before the run is planned: a forked worker has this process's
    imports (a spawned one starts an interpreter and imports everything again, about half a second
    each). Its workers wait for the run's context (:meth:`start`)."""

    def __init__(self, workers: int) -> None:
        # pyarrow imports pandas, where installed, at its first array: here, once, not in each worker.
        pa.array(np.zeros(1))
        fork = multiprocessing.get_context("fork")
        self.workers, self.contexts, self.started = workers, fork.SimpleQueue(), False
        self.pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=_init_forked, initargs=(self.contexts, os.getpid()))
        self.pool.submit(int)  # a fork pool starts all its workers at its first task

    @staticmethod
    def possible(workers: int) -> bool:
        """Whether to fork a pool of ``workers``: more than one and no more than the CPUs (forked before the
        run is planned, the pool cannot know how many workers the run can use; a larger one is spawned
        after planning, with no more workers than that), on a platform that forks safely (not macOS,
        whose system libraries may crash in a forked child), from a process running no other thread (a
        fork copies the locks other threads may hold, never released)."""
        forks = sys.platform != "darwin" and "fork" in multiprocessing.get_all_start_methods()
        return 1 < workers <= (os.cpu_count() or 1) and forks and threading.active_count() == 1

    def start(self, worker: tuple) -> ProcessPoolExecutor:
        """The pool, its workers set up with the run's ``worker`` arguments (of :func:`_init_worker`)."""
        for _ in range(self.workers):
            self.contexts.put(worker)
        self.started = True
        return self.pool

    def close(self) -> None:
        """Shut the pool down, started or not."""
        if not self.started:
            for _ in range(self.workers):
                self.contexts.put(None)
        self.pool.shutdown(cancel_futures=True)


def _init_forked(contexts: Any, parent: int) -> None:
    """A forked worker: it exits with its parent and waits for the run's context (None: the pool goes unused)."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="mmcurate-parent-watch").start()
    worker = contexts.get()
    if worker is not None:
        _init_worker(*worker)


def _decide(ctx: RunContext, index: int, pool: Executor | None) -> pa.Table:
    """The decision of the global stage that ends segment ``index``: a :class:`ClusterStage`'s phases
    in the worker pool (:class:`PoolExchange`), any other global stage on the kept rows here."""
    stage = ctx.global_stage(index)
    ids = [p.shard_id for p in ctx.reader.shards]
    if isinstance(stage, ClusterStage) and pool is not None and len(ids) > 1:
        step = ClusterStep(stage, functools.partial(kept_rows, ctx, index, stage), columns_schema(ctx, index, stage), ctx.pipeline.workers)
        with _pieces_folder(ctx.out, f"pieces{index}") as folder:
            return cluster.run_step(step, ids, PoolExchange(pool, index, folder), maps=ctx.pipeline.workers)
    parts = [kept_rows(ctx, index, stage, i) for i in ids]
    return stage.decide(pa.concat_tables(parts) if parts else pa.table({"key": pa.array([], pa.string())}))


@contextlib.contextmanager
def _pieces_folder(out: OutputDir, name: str) -> Iterator[str]:
    """A folder for pieces passed between local processes (a global step's, ``piecesN``; split shards',
    ``split``), removed after use: ``_work/NAME/`` of a local output (where a killed run leaves them, for
    its resume to empty or its finish to remove with the work folder), else a temporary folder."""
    folder = out.local_work_folder(name)
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="mmcurate-pieces-") as temporary:
            yield temporary
        return
    try:
        yield folder
    finally:
        out.fs.rm(folder, recursive=True)


class PoolExchange(InMemory):
    """The :class:`dedup.cluster.Exchange` of the local process pool: a phase's tasks run in the
    pool's workers, each with its own step over its run context (the global stage set up once per
    worker); the pieces they make are files in ``folder`` (:mod:`engines.pieces`), only their names
    pass through the driver."""

    def __init__(self, pool: Executor, segment: int, folder: str) -> None:
        self.pool, self.segment, self.folder = pool, segment, folder

    def run(self, step: ClusterStep, phase: str, tasks: list[tuple] | list[list], pieces: bool) -> list:
        folder = self.folder if pieces else None
        futures = [self.pool.submit(_run_phase, self.segment, step.columns, step.parts, phase, folder, *args) for args in tasks]
        return [future.result() for future in futures]


def _run_phase(segment: int, columns: pa.Schema, parts: int, phase: str, folder: str | None, *args: object) -> Any:
    """A phase task in a pool worker: its stored pieces read, the pieces it makes stored in ``folder`` (None: returned)."""
    stage = _CONTEXT.global_stage(segment)
    step = ClusterStep(stage, functools.partial(_step_rows, segment, stage), columns, parts)
    result = getattr(step, phase)(*(load(a) if isinstance(a, StoredPiece) else a for a in args))
    return result if folder is None else [store(piece, folder) for piece in result]


def _step_rows(segment: int, stage: Stage, shard_id: int, keys_only: bool = False) -> pa.Table:
    """:func:`kept_rows` of a global step's phase in a pool worker, kept for its next phases."""
    if (segment, shard_id) not in _STEP_ROWS:
        _STEP_ROWS[segment, shard_id] = kept_rows(_CONTEXT, segment, stage, shard_id)
        while len(_STEP_ROWS) > 1 and sum(t.nbytes for t in _STEP_ROWS.values()) > STEP_ROWS_BYTES:
            _STEP_ROWS.popitem(last=False)
    _STEP_ROWS.move_to_end((segment, shard_id))
    table = _STEP_ROWS[segment, shard_id]
    return table.select(["key"]) if keys_only else table


def _gpu_workers(stage: ModelStage) -> int:
    """Workers of a model stage's pool: one per GPU for ``cuda``, else one."""
    if stage.device != "cuda":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _map(
    ctx: RunContext,
    pools: dict[int | None, Executor],
    in_flight: int,
    todo: list[ShardPlan],
    segment: int,
    label: str,
    progress: bool,
    here: Process | None,
) -> int:
    """Every shard of ``todo`` through the segment's steps: in this process through ``here``, or
    (``here`` None) each step in its pool. Returns the rows of ``todo`` still kept."""
    bar = SegmentProgress(label, sum(p.rows for p in todo), progress)
    if here is not None:
        for plan in todo:
            bar.update(run_step(_CONTEXT, plan, segment, 0, len(ctx.segments[segment].stages), None, here))
        bar.close()
        return bar.kept
    stages = ctx.segments[segment].stages
    positions = {id(stage): position for position, stage in enumerate(ctx.stages)}
    ranges = steps(ctx.segments[segment])
    pool_of = [positions[id(stages[lo])] if hi == lo + 1 and isinstance(stages[lo], ModelStage) else None for lo, hi in ranges]
    queue, running = deque(todo), {}

    def submit(plan: ShardPlan, step: int, carried: pa.Table | None) -> None:
        future: Future = pools[pool_of[step]].submit(_run_step, plan, segment, *ranges[step], carried)
        running[future] = (plan, step)

    while queue or running:
        while queue and len(running) < in_flight:
            submit(queue.popleft(), 0, None)
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            plan, step = running.pop(future)
            if step == len(ranges) - 1:
                bar.update(future.result())
            else:
                submit(plan, step + 1, future.result())
    bar.close()
    return bar.kept
