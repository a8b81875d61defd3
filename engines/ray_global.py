"""Global stages on Ray.

A :class:`ClusterStage` (exact, pHash, MinHash dedup) runs the phases of its global step
(:mod:`dedup.cluster`) as Ray tasks: each task returns one object per partition (``num_returns``)
and each task of the next phase takes one object of every task before it, a shuffle through Ray's
object store. Tasks are at most ``MAX_MAPS`` x ``MAX_PARTS`` objects (Ray tracks each); ``parts``
is twice the cluster's CPUs up to ``MAX_PARTS``. Only the verified edges come back to the driver.

Other global stages (top-fraction selection) collect ``key`` + their few ``global_columns`` of the
kept rows on the driver and call ``decide``.
"""

from __future__ import annotations

import functools

import pyarrow as pa
import ray

from mmcurate.dedup.cluster import ClusterStage, ClusterStep, run_step
from mmcurate.engines.intermediate import columns_schema, kept_rows
from mmcurate.engines.run import RunContext
from mmcurate.engines.worker_state import run_phase
from mmcurate.stages.base import Stage, decisions

# The shuffle makes MAX_MAPS x MAX_PARTS objects at most: Ray tracks each one.
MAX_MAPS = 1024
MAX_PARTS = 256


def shard_dataset(ids: list[int], blocks: int | None = None) -> ray.data.Dataset:
    """The seed of every per-shard Ray Data plan: the shard ids in ``blocks`` blocks (default: one
    block per shard)."""
    return ray.data.from_items([{"shard": i} for i in ids], override_num_blocks=max(1, min(len(ids), blocks or len(ids))))


def global_decisions(ctx: RunContext, index: int) -> pa.Table:
    """The decision table of the global stage that ends segment ``index``."""
    stage = ctx.segments[index].global_stage
    if not ctx.reader.shards:  # an empty input: nothing to decide
        return decisions([], "")
    ids = [p.shard_id for p in ctx.reader.shards]
    if not isinstance(stage, ClusterStage):
        rows = shard_dataset(ids).map_batches(
            _kept_rows, fn_kwargs={"ctx": ctx, "segment": index, "stage": stage}, batch_format="pyarrow", batch_size=None
        )
        return ctx.global_stage(index).decide(_collect(rows, columns_schema(ctx, index, stage)))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    parts = max(1, min(len(ids), 2 * cpus, MAX_PARTS))
    step = ClusterStep(stage, functools.partial(kept_rows, ctx, index, stage), columns_schema(ctx, index, stage), parts)
    return run_step(step, ids, RayExchange(ctx, index, step), maps=min(4 * cpus, MAX_MAPS))


class RayExchange:
    """The :class:`dedup.cluster.Exchange` of Ray: a phase's pieces are the object refs of one task;
    the step and the run travel once, through the object store."""

    def __init__(self, ctx: RunContext, segment: int, step: ClusterStep) -> None:
        self.ref, self.ctx, self.segment = ray.put(step), ray.put(ctx), segment

    def scatter(self, step: ClusterStep, phase: str, inputs: list[tuple]) -> list[list[ray.ObjectRef]]:
        return [self._submit(step.parts, phase, *args) for args in inputs]

    def exchange(self, step: ClusterStep, phase: str, pieces: list[list[ray.ObjectRef]]) -> list[list[ray.ObjectRef]]:
        return [self._submit(step.parts, phase, *(refs[p] for refs in pieces)) for p in range(step.parts)]

    def gather(self, step: ClusterStep, phase: str, pieces: list[list[ray.ObjectRef]]) -> list:
        return ray.get([_phase.remote(self.ctx, self.segment, self.ref, phase, *(refs[p] for refs in pieces)) for p in range(step.parts)])

    def _submit(self, parts: int, phase: str, *args: object) -> list[ray.ObjectRef]:
        """Run ``phase`` as a task returning its ``parts`` pieces as objects; their refs."""
        refs = _pieces.options(num_returns=parts).remote(self.ctx, self.segment, self.ref, phase, *args)
        return refs if parts > 1 else [refs]


@ray.remote
def _pieces(ctx: RunContext, segment: int, step: ClusterStep, phase: str, *args: object) -> list | object:
    pieces = run_phase(ctx, segment, step, phase, *args)
    return pieces if len(pieces) > 1 else pieces[0]  # what a task with num_returns=len(pieces) returns


@ray.remote
def _phase(ctx: RunContext, segment: int, step: ClusterStep, phase: str, *args: object) -> object:
    return run_phase(ctx, segment, step, phase, *args)


def _collect(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.select(schema.names) for t in parts]) if parts else schema.empty_table()


def _kept_rows(batch: pa.Table, ctx: RunContext, segment: int, stage: Stage) -> pa.Table:
    return pa.concat_tables([kept_rows(ctx, segment, stage, i) for i in batch.column("shard").to_pylist()])
