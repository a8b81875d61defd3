"""Per-process state of engine workers (Ray tasks, Spark Python workers), which receive fresh
pickled copies of the run for every task: the run context and set-up stages are kept here, once
per process."""

from __future__ import annotations

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


def worker_context(run_id: str, ctx: RunContext) -> tuple[RunContext, set[str]]:
    """The first copy of run ``run_id``'s context this process received (its stages stay set up
    and its decisions read), with the names of its set-up stages."""
    return _CONTEXTS.setdefault(run_id, (ctx, set()))
