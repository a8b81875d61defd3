"""Per-process state of engine workers (Ray tasks, Spark Python workers), which receive fresh
pickled copies of the run for every task: the run context and set-up stages are kept here, once
per process."""

from __future__ import annotations

import dataclasses
from typing import Any

from mmcurate.dedup.cluster import ClusterStep
from mmcurate.engines.run import RunContext
from mmcurate.stages.base import Stage

_READY: dict[tuple[str, str], Stage] = {}
_CONTEXTS: dict[str, tuple[RunContext, set[str]]] = {}


def ready(stage: Stage) -> Stage:
    """``stage`` set up once per process: later copies of the same stage and config reuse it."""
    key = (type(stage).__qualname__, repr(stage.config))
    if key not in _READY:
        stage.setup()
        _READY[key] = stage
    return _READY[key]


def run_phase(step: ClusterStep, phase: str, *args: object) -> Any:
    """``step``'s ``phase`` in a worker, with its stage set up once per process."""
    return getattr(dataclasses.replace(step, stage=ready(step.stage)), phase)(*args)


def worker_context(run_id: str, ctx: RunContext) -> tuple[RunContext, set[str]]:
    """The first copy of run ``run_id``'s context this process received (its stages stay set up,
    its global decisions are read once), with the names of its set-up stages. A new run id drops
    the previous run's context, so a run into a reused output folder never sees stale decisions."""
    if run_id not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[run_id] = (ctx, set())
    return _CONTEXTS[run_id]
