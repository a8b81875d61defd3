"""The Ray engine: each segment of the pipeline is one streaming Ray Data plan.

```
shard ids -> [read, CPU stages] -> [GPU stage] -> [CPU stages, write per shard id]
```
Each bracket is one ``map_batches(batch_format="pyarrow")``: a :class:`Chain` of steps cut at GPU
stages. A chain whose stages have no ``setup()`` runs as Ray tasks; one with ``setup()`` or a GPU
runs as an actor pool whose ``__init__`` calls ``setup()``, sized from ``Stage.resources`` at the
start (GPU stages: one actor per ``gpus`` of the cluster; CPU chains: 1 to CPUs / ``cpus`` actors)
and growing with the cluster, within the pipeline's ``min_actors`` and ``max_actors`` (:func:`pool_limits`).

Model stages (:mod:`mmcurate.stages.model`) get an actor pool of their own: ``num_gpus`` from
their resources (their device is resolved for the cluster's GPUs on the driver), one actor on a
cluster without GPUs. They never see whole shards: the chain before one numbers each shard's rows
(kept rows first, as :func:`engines.core.apply_stage` orders them), a streaming repartition cuts
the blocks into pieces of ``batch_size`` rows, so several actors share a shard and an actor holds a
few batches, not shards; the chain after it hands its pieces to a :class:`ShardGather` actor,
which gives back each shard whole, in its rows' order, once its last piece is in. Every other
block is one whole shard: batches are whole blocks (``batch_size=None``; a stage's own
``batch_size`` slices inside :func:`engines.core.apply_stage`) and Ray's output-block splitting is
off, so the writer sees whole shards and writes the same files, per shard id, as the local runner.
Each row carries ``_shard`` and the ledger columns of :mod:`engines.core` (the position of the
stage that rejected it, its share of each stage's seconds), from which the writer derives the
shard's stats with the local runner's function.

Global stages run as Ray shuffles over the segment's intermediate files (see :mod:`ray_global`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from mmcurate.engines.core import REJECTED_AT, apply_decisions, apply_stage, shard_stats, start_ledger
from mmcurate.engines.progress import SegmentProgress, ShardDone, global_step
from mmcurate.engines.ray_connect import connect
from mmcurate.engines.ray_global import global_decisions, shard_dataset
from mmcurate.engines.ray_quiet import quiet_driver
from mmcurate.engines.ray_storage import check_nodes
from mmcurate.engines.run import RunContext, finish_run, start_run
from mmcurate.engines.worker_state import worker_context
from mmcurate.pipelines.config import Pipeline
from mmcurate.shards.writers import write_shard
from mmcurate.stages.base import Stage, set_column
from mmcurate.stages.model import ModelStage

SHARD = "_shard"
ORDER = "_order"  # a row's place in its shard, while the shard travels in pieces through a model stage


def run_ray(pipeline: Pipeline, progress: bool = True) -> dict:
    """Run ``pipeline`` on Ray and return the run summary.

    Connects to the cluster named by ``RAY_ADDRESS`` (set inside a Ray job), to an already
    initialised Ray, or starts a local Ray with ``pipeline.workers`` CPUs; then checks, before any
    work, that every node sees the input and the output (:func:`ray_storage.check_nodes`). An output
    that holds this run finished is only summarised, without Ray.
    """
    started = False

    def join(resolved: Pipeline) -> None:
        nonlocal started
        started = connect(resolved.workers)
        check_nodes(resolved.input.path, resolved.output.path)

    try:
        ctx = start_run(pipeline, "ray", check=join)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if ctx.finished:  # nothing to do: Ray was not started
        return finish_run(ctx)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    for stage in ctx.stages:
        if isinstance(stage, ModelStage):
            stage.place(gpus)  # the cluster's GPUs decide the device, not the driver's
    context = ray.data.DataContext.get_current()
    memory_check = context.issue_detectors_config.high_memory_detector_config
    saved = context.target_max_block_size, context.enable_progress_bars, memory_check.detection_time_interval_s
    context.target_max_block_size = None  # never split a shard's block
    context.enable_progress_bars = False
    # Ray Data warns when a worker uses more memory than it reserved: an mmcurate worker holds about
    # one shard besides its stages' state, which no stage declares (docs/cluster.md, batch sizes).
    memory_check.detection_time_interval_s = -1
    try:
        with quiet_driver():
            _run_segments(ctx, progress)
    finally:
        context.target_max_block_size, context.enable_progress_bars, memory_check.detection_time_interval_s = saved
        if started:
            ray.shutdown()
    return finish_run(ctx)


def _run_segments(ctx: RunContext, progress: bool) -> None:
    """Each segment's pending shards, then its global step (unless decided before a resume)."""
    for index in range(len(ctx.segments)):
        todo = [p.shard_id for p in ctx.pending(index)]
        kept = _run_segment(ctx, index, todo, progress) if todo else 0
        if ctx.needs_global(index):
            rows = kept if len(todo) == len(ctx.reader.shards) else None  # None: some shards ran before a resume
            with global_step(ctx.global_stage(index).label, rows, progress) as rejected:
                decision = global_decisions(ctx, index)
                rejected.append(decision.num_rows)
            ctx.write_decision(index, decision)


def _run_segment(ctx: RunContext, index: int, todo: list[int], progress: bool) -> int:
    """Run segment ``index`` on the shards ``todo``; return their rows still kept."""
    # A segment without stages only applies the previous decision and writes: its shards are cheap,
    # and Ray Data waits up to 0.1 s to notice a finished task, so such shards go a few per task.
    blocks = len(todo) if ctx.segments[index].stages else 2 * int(ray.cluster_resources().get("CPU", 1))
    ds = shard_dataset(todo, blocks)
    steps = chains(ctx, index)
    gathers = []
    for before, chain in zip([None, *steps], steps, strict=False):
        if before is not None and before.model is not None:  # the model stage's pieces become shards again
            chain.gather = ShardGather.remote({i: ctx.reader.shards[i].rows for i in todo})
            gathers.append(chain.gather)
        if chain.model is not None:
            ds = ds.repartition(target_num_rows_per_block=chain.model.config.batch_size)
        ds = _map_chain(ds, chain, alone=len(steps) == 1)
    try:
        return _consume(ctx, index, todo, ds, progress)
    finally:
        for gather in gathers:
            ray.kill(gather)


def _consume(ctx: RunContext, index: int, todo: list[int], ds: ray.data.Dataset, progress: bool) -> int:
    """Run the segment's plan, showing its shards as they are written; their rows still kept."""
    label = f"segment {index + 1}/{len(ctx.segments)}" if len(ctx.segments) > 1 else "shards"
    bar = SegmentProgress(f"ray {label}", sum(ctx.reader.shards[i].rows for i in todo), progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for done in batch.column("done").to_pylist():
            bar.update(ShardDone.decode(done))
    bar.close()
    return bar.kept


@dataclass
class Chain:
    """Consecutive steps of a segment that run in one Ray task or actor: the read (first chain),
    stages with their pipeline positions, the write (last chain)."""

    ctx: RunContext  # workers keep the first copy of a session: stages set up, decisions read once per process
    segment: int
    stages: list[tuple[Stage, int]]
    read: bool
    write: bool
    applies: int | None = None  # position of the global stage whose decision the read applies
    split: bool = False  # the next chain is a model stage: number each shard's rows for its pieces
    gather: Any = None  # after a model stage: the ShardGather actor that makes its pieces shards again

    @property
    def gpus(self) -> float:
        return max((s.resources.gpus for s, _ in self.stages), default=0.0)

    @property
    def cpus(self) -> float:
        return max((s.resources.cpus for s, _ in self.stages), default=1.0)

    @property
    def model(self) -> ModelStage | None:
        """The chain's model stage (a model stage is a chain of its own)."""
        stage = self.stages[0][0] if len(self.stages) == 1 else None
        return stage if isinstance(stage, ModelStage) else None

    @property
    def stateful(self) -> bool:
        """Stages that load state in ``setup()`` or want a GPU keep it in long-lived actors."""
        return any(type(s).setup is not Stage.setup or s.resources.gpus > 0 for s, _ in self.stages)

    def setup(self) -> None:
        ctx = worker_context(self.ctx)
        for _, position in self.stages:
            ctx.ready(position)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ctx = worker_context(self.ctx)
        if self.read and self.write:  # the whole segment: one shard at a time, whatever the block holds
            return pa.concat_tables([self._steps(ctx, batch.slice(i, 1)) for i in range(batch.num_rows)])
        if self.model is not None:  # pieces of shards: each shard's rows apart, so its events stay its own
            parts = [self._steps(ctx, part) for part in _by_shard(batch)]  # a part of rejected rows gains no columns
            return pa.concat_tables(parts, promote_options="permissive") if parts else batch
        if self.gather is not None:
            whole = ray.get(self.gather.add.remote(batch)) if batch.num_rows else []
            if not whole:
                return _written([], []) if self.write else batch.slice(0, 0)  # no shard whole yet
            batch = pa.concat_tables(whole, promote_options="permissive")
        return self._steps(ctx, batch)

    def _steps(self, ctx: RunContext, batch: pa.Table) -> pa.Table:
        if self.read:
            batch = _read(batch, ctx, self.segment, self.applies)
        for _, position in self.stages:
            batch = apply_stage(ctx.ready(position), batch, position)
        if self.split:
            batch = number_rows(batch)
        return _write(batch, ctx, self.segment) if self.write else batch


def chains(ctx: RunContext, index: int) -> list[Chain]:
    """Cut segment ``index`` at its GPU stages: CPU stages share a worker with the read and write
    next to them (no hand-over through the object store, and a small cluster's CPUs are not split
    between pools); each GPU stage gets its own actor pool. A model stage always has a chain on
    each side, which cuts shards into its pieces and makes them shards again."""
    segment = ctx.segments[index]
    positions = {id(stage): position for position, stage in enumerate(ctx.stages)}
    runs: list[list[tuple[Stage, int]]] = [[]]
    for stage in segment.stages:
        if stage.resources.gpus > 0 or isinstance(stage, ModelStage):
            runs += [[(stage, positions[id(stage)])], []]
        else:
            runs[-1].append((stage, positions[id(stage)]))

    def needed(i: int) -> bool:
        """CPU runs are the even ones, GPU stages the odd ones: an empty CPU run stays at either end and beside a model stage."""
        beside = [run[0][0] for run in runs[max(i - 1, 0) : i + 2] if run]
        return bool(runs[i]) or i in (0, len(runs) - 1) or any(isinstance(stage, ModelStage) for stage in beside)

    runs = [run for i, run in enumerate(runs) if needed(i)]
    applies = positions[id(segment.applies)] if segment.applies is not None else None
    result = [Chain(ctx, index, run, read=i == 0, write=i == len(runs) - 1, applies=applies) for i, run in enumerate(runs)]
    for chain, after in itertools.pairwise(result):
        chain.split = after.model is not None
    return result


def _map_chain(ds: ray.data.Dataset, chain: Chain, alone: bool) -> ray.data.Dataset:
    """One ``map_batches`` for ``chain``: Ray tasks, or an actor pool (:func:`pool_limits`).

    An actor holds at most two blocks (one running, one queued): no wait between them, and the last
    ones still spread over the pool. A block is a shard, or for a model stage a piece of ``batch_size`` rows.
    """
    cluster = ray.cluster_resources()
    cpus = min(chain.cpus, cluster.get("CPU", 1.0))  # a stage asking for more CPUs than there are still runs
    common: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": None, "num_cpus": cpus}
    memory = sum(s.resources.memory_gb for s, _ in chain.stages)  # the state of each stage the worker holds
    if memory:
        common["memory"] = memory * 2**30
    if not chain.stateful:
        return ds.map_batches(_run_chain, fn_kwargs={"chain": chain}, **common)
    size, gpus = pool_size(cpus, chain.gpus, cluster)
    start, most = (size if gpus or alone else 1), chain.ctx.pipeline.max_actors
    if chain.model is not None:
        common["batch_size"] = chain.model.config.batch_size  # blocks of batch_size rows (see _run_segment)
        if not gpus:  # on CPU one model copy per pool, unless max_actors asks for more
            start, most = 1, most or 1
    least, initial, most = pool_limits(start, chain.ctx.pipeline.min_actors, most)
    pool = ray.data.ActorPoolStrategy(min_size=least, initial_size=initial, max_size=most, max_tasks_in_flight_per_actor=2)
    return ds.map_batches(ChainActor, fn_constructor_kwargs={"chain": chain}, compute=pool, num_gpus=gpus, **common)


def pool_limits(start: int, min_actors: int | None, max_actors: int | None) -> tuple[int, int, int | None]:
    """(least, initial, most) actors of a pool that would start with ``start`` actors (planned from the cluster's size).

    The pool keeps at least ``min_actors`` (default: ``start``) and grows with the cluster, as nodes join
    (an autoscaler's, or by hand), up to ``max_actors`` (default None: no limit).
    """
    least = start if min_actors is None else min_actors
    initial = max(start, least)
    if max_actors is not None:
        least, initial = min(least, max_actors), min(initial, max_actors)
    return least, initial, max_actors


def pool_size(cpus: float, gpus: float, cluster: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor): as many actors as the cluster's GPUs (or CPUs) fit.

    A stage that asks for a GPU on a cluster without one runs on CPUs (stages pick their device).
    """
    gpus = gpus if cluster.get("GPU", 0) >= gpus > 0 else 0.0
    if gpus:
        return max(1, int(cluster["GPU"] // gpus)), gpus
    return max(1, int(cluster.get("CPU", 1) // max(cpus, 1e-3))), 0.0


def _run_chain(batch: pa.Table, chain: Chain) -> pa.Table:
    return chain(batch)


class ChainActor:
    """A chain held in a Ray actor: ``setup()`` of its stages runs once, then every block goes through."""

    def __init__(self, chain: Chain) -> None:
        chain.setup()
        self.chain = chain

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.chain(batch)


def number_rows(table: pa.Table) -> pa.Table:
    """Each shard's rows in the order :func:`engines.core.apply_stage` gives them (kept first, the
    rest after), numbered in ``_order``, before the shards go in pieces through a model stage."""
    rejected = pc.is_valid(table.column(REJECTED_AT)).cast(pa.int8())
    table = table.take(pc.sort_indices(pa.table({"s": table.column(SHARD), "r": rejected}), [("s", "ascending"), ("r", "ascending")]))
    return set_column(table, ORDER, np.arange(table.num_rows), pa.int64())


def _by_shard(table: pa.Table) -> list[pa.Table]:
    return [table.filter(pc.equal(table.column(SHARD), i)) for i in pc.unique(table.column(SHARD)).to_pylist()]


@ray.remote(num_cpus=0)
class ShardGather:
    """The pieces of each shard, from the chains after a model stage, until the shard is whole."""

    def __init__(self, rows: dict[int, int]) -> None:
        self.rows = rows  # rows of each shard
        self.pieces: dict[int, dict[int, pa.Table]] = {}  # per shard, its pieces by their first row's number

    def add(self, batch: pa.Table) -> list[pa.Table]:
        """Keep ``batch``'s pieces; return the shards they complete, each in its rows' order. A piece
        sent again (a task Ray retried after it had sent it) replaces itself: no row counts twice."""
        whole = []
        for piece in _by_shard(batch):
            shard = piece.column(SHARD)[0].as_py()
            pieces = self.pieces.setdefault(shard, {})
            pieces[pc.min(piece.column(ORDER)).as_py()] = piece
            if sum(p.num_rows for p in pieces.values()) == self.rows[shard]:
                table = pa.concat_tables(self.pieces.pop(shard).values(), promote_options="permissive")
                whole.append(table.take(pc.sort_indices(table.column(ORDER))).drop_columns([ORDER]))
        return whole


def _read(batch: pa.Table, ctx: RunContext, segment: int, applies: int | None) -> pa.Table:
    """The rows of the block's shards: from the reader, or the previous segment's intermediate
    files with the decision of the previous global stage (at position ``applies``) applied."""
    tables = []
    for shard_id in batch.column("shard").to_pylist():
        if segment == 0:
            table = start_ledger(ctx.reader.read(ctx.reader.shards[shard_id]))
        else:
            table = ctx.out.read_scratch(ctx.intermediate_path(segment - 1, shard_id))
            table = apply_decisions(ctx.segments[segment].applies, applies, table, ctx.decisions(segment - 1))
        tables.append(set_column(table, SHARD, np.full(table.num_rows, shard_id), pa.int64()))
    return pa.concat_tables(tables, promote_options="permissive")


def _write(batch: pa.Table, ctx: RunContext, segment: int) -> pa.Table:
    """Write every shard of the block (final files, or the segment's intermediate files); return
    per shard its :class:`ShardDone`, encoded."""
    last = segment == len(ctx.segments) - 1
    ids, done = pc.unique(batch.column(SHARD)).to_pylist(), []
    for shard_id in ids:
        table = batch.filter(pc.equal(batch.column(SHARD), shard_id))
        if table.num_rows != ctx.reader.shards[shard_id].rows:
            raise RuntimeError(
                f"shard {shard_id} reached the writer in pieces ({table.num_rows} of {ctx.reader.shards[shard_id].rows} rows)"
            )
        stats = shard_stats(shard_id, table, ctx.stages)
        if last:
            write_shard(ctx.out, ctx.pipeline.output, shard_id, table, ctx.columns, stats)
        else:
            ctx.out.write_scratch(ctx.intermediate_path(segment, shard_id), table)
        done.append(ShardDone.of(table.num_rows, stats, ctx.segments[segment], segment == 0).encode())
    return _written(ids, done)


def _written(ids: list[int], done: list[str]) -> pa.Table:
    return pa.table({"shard": pa.array(ids, pa.int64()), "done": pa.array(done, pa.string())})
