"""Per-process state of engine workers (Ray tasks and actors, Spark Python workers), which receive
fresh pickled copies of the run for every task: the first copy of a run's context is kept, once per
process, with its stages set up (:meth:`RunContext.ready`, keyed by pipeline position) and its global
decisions read once."""

from __future__ import annotations

import dataclasses
from typing import Any

from mmcurate.dedup.cluster import ClusterStep
from mmcurate.engines.run import RunContext

_CONTEXTS: dict[str, RunContext] = {}


def worker_context(ctx: RunContext) -> RunContext:
    """The first copy of ``ctx``'s session this process received. A new session drops the previous
    one's context, so a run into a reused output folder never sees stale decisions or set-up stages."""
    if ctx.session not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[ctx.session] = ctx
    return _CONTEXTS[ctx.session]


def run_phase(ctx: RunContext, segment: int, step: ClusterStep, phase: str, *args: object) -> Any:
    """``step``'s ``phase`` in a worker, with the global stage that ends ``segment`` set up once per process."""
    stage = worker_context(ctx).global_stage(segment)
    return getattr(dataclasses.replace(step, stage=stage), phase)(*args)
