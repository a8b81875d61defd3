"""What every engine does around its shard loop: plan, record the run, resume, summarise."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import platform
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa

from mmcurate import __version__, killpoints
from mmcurate.engines.core import Segment, segments
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import Pipeline, StageSpec, check_columns, output_columns
from mmcurate.schemas import BY_NAME, SCHEMA_VERSION
from mmcurate.shards.layout import INPUT, RUN_JSON, SHARD_FOLDERS, WORK, OutputDir, is_partial_write, open_parquet, shard_name
from mmcurate.shards.lease import LEASE, Lease, acquire
from mmcurate.shards.readers import Reader, ShardPlan, plan_input
from mmcurate.shards.summary import summarise
from mmcurate.stages.base import Stage
from mmcurate.stages.model import ModelStage

logger = logging.getLogger(__name__)
_VERSIONED = ("pyarrow", "numpy", "pillow", "aiohttp", "ray", "pyspark", "torch", "open_clip_torch", "transformers", "onnxruntime")


@dataclass
class RunContext:
    """A planned run: the input's shards, the built stages cut into segments, the output folder
    (``pipeline.output.format`` resolved: see :meth:`OutputSpec.resolved`).

    Engines send copies of it to their workers; a worker process keeps the first copy of a run
    (:func:`engines.worker_state.worker_context`) and sets its stages up through :meth:`ready`.
    """

    pipeline: Pipeline
    reader: Reader
    stages: list[Stage]
    out: OutputDir
    finished: bool = False  # the output held this run, finished, when it started: nothing to do
    segments: list[Segment] = field(init=False)
    columns: list[str] = field(init=False)
    # One per engine invocation (a resumed run is a new session): worker processes key their copies by it.
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    _decisions: dict[int, pa.Table] = field(default_factory=dict)
    _set_up: set[int] = field(default_factory=set)  # positions of the stages set up in this process

    def __post_init__(self) -> None:
        self.segments = segments(self.stages)
        self.columns = output_columns(self.stages, self.reader.format, carried_columns(self.reader))
        output = self.pipeline.output.resolved(carries_images(self.reader, self.stages))
        self.pipeline = dataclasses.replace(self.pipeline, output=output)

    @classmethod
    def create(cls, pipeline: Pipeline, reader: Reader | None = None) -> RunContext:
        out = OutputDir.open(pipeline.output.path)
        stages = pipeline.build_stages()  # before planning writes parsed URL lists into the output folder
        if reader is None:
            record = out.run_record()
            reader = plan_input(pipeline.input, pipeline.output.rows_per_shard, out, record.get("sources") if record else None)
        check_columns(stages, reader.format, input_holds(reader))
        return cls(pipeline, reader, stages, out)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_set_up": set()}  # a copy in another process sets its stages up again

    def ready(self, position: int) -> Stage:
        """The stage at pipeline ``position``, set up once in this process: the one set-up registry of
        every engine, keyed by position, so two stages of one name are two stages."""
        if position not in self._set_up:
            self.stages[position].setup()
            self._set_up.add(position)
        return self.stages[position]

    def global_stage(self, segment: int) -> Stage:
        """The global stage that ends ``segment``, set up."""
        return self.ready(self.segments[segment].positions[-1])

    def intermediate_path(self, segment: int, shard_id: int) -> str:
        """A shard's rows as ``segment`` left them, for its global step and the next segment (:meth:`OutputDir.write_scratch`)."""
        return self.out.work_path(f"seg{segment}", shard_name(shard_id) + ".arrow")

    def global_path(self, segment: int) -> str:
        return self.out.work_path(f"global{segment}.parquet")

    def pending(self, segment: int | None = None) -> list[ShardPlan]:
        """Shards without a done marker (and, for an inner segment, without its intermediate)."""
        todo = [p for p in self.reader.shards if not self.out.is_done(p.shard_id)]
        if segment is not None and segment < len(self.segments) - 1:
            todo = [p for p in todo if not self.out.exists(self.intermediate_path(segment, p.shard_id))]
        return todo

    def needs_global(self, segment: int) -> bool:
        """Whether the global step ending ``segment`` is still to run (some shard is unfinished, no decision yet)."""
        return self.segments[segment].global_stage is not None and bool(self.pending()) and not self.out.exists(self.global_path(segment))

    def write_decision(self, segment: int, decision: pa.Table) -> None:
        """Write the decision of the global stage that ends ``segment``."""
        killpoints.reached("global")
        self.out.write_parquet(self.global_path(segment), decision)

    def decisions(self, segment: int) -> pa.Table:
        """The decision of the global stage that ends ``segment`` (read once per worker)."""
        if segment not in self._decisions:
            self._decisions[segment] = self.out.read_parquet(self.global_path(segment))
        return self._decisions[segment]


def carried_columns(reader: Reader) -> tuple[str, ...]:
    """Declared columns an mmcurate input holds (e.g. ``clip_score`` of an earlier run), so a chained
    run writes them on instead of dropping them."""
    if reader.format != "mmcurate" or not reader.files:
        return ()
    with open_parquet(reader.fs, reader.files[0].path) as pf:
        return tuple(name for name in pf.schema_arrow.names if name in BY_NAME)


def input_holds(reader: Reader) -> tuple[str, ...]:
    """Columns the input holds besides those a reader of its format always provides, for
    :func:`check_columns`: an mmcurate input's declared ones and the first file's own (a Parquet input's
    extra columns; not read from an input with tars, whose read would index a tar)."""
    held = carried_columns(reader)
    if reader.files and not any(f.tar for f in reader.files):
        held += tuple(reader.read(ShardPlan(0, ((0, 0, 0),))).column_names)
    return held


def carries_images(reader: Reader, stages: list[Stage]) -> bool:
    """Whether the rows hold image bytes: a stage adds them (download) or the input has them."""
    if any("image" in s.adds for s in stages) or reader.format == "img2dataset" or any(f.tar for f in reader.files):
        return True
    return "image" in carried_columns(reader)


def versions() -> dict[str, str]:
    found = {"mmcurate": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _comparable(config: dict) -> dict:
    """The parts of a resolved config that decide the output (not engine, workers or output path)."""
    return {"input": config["input"], "output": {k: v for k, v in config["output"].items() if k != "path"}}


def _typed_stages(stages: list[dict]) -> list[tuple[str, dict]] | None:
    """A recorded pipeline's stages with their typed options (``--set`` strings parsed, defaults
    filled), or None if they no longer build."""
    try:
        return [_typed(StageSpec(name, dict(params or {})).build()) for item in stages for name, params in item.items()]
    except UsageError:
        return None


def _typed(stage: Stage) -> tuple[str, dict]:
    return stage.name, dataclasses.asdict(stage.config) if dataclasses.is_dataclass(stage.config) else dict(vars(stage.config))


def previous_run(out: OutputDir) -> dict | None:
    """The record of the run ``out`` holds, or None for an empty (or new) folder or one holding only
    mmcurate's leftovers of an interrupted start (its marked work folder, temporary files) or an input it
    generated (the demo's URL list, in its marked ``_input``); changes nothing.

    A folder holding anything else, a ``_work`` mmcurate did not create and a corrupt ``run.json`` are
    refused (UsageError).
    """
    names = out.entries()
    if RUN_JSON in names:
        record = out.run_record()
        out.check_work()
        return record
    ours = {name for name, owned in ((WORK, out.owns_work), (INPUT, out.owns_input)) if name in names and owned()}
    foreign = {n for n in names if not is_partial_write(n)} - {LEASE} - ours
    if foreign & set(SHARD_FOLDERS):
        raise UsageError(f"{out.root} holds shards but no run.json; use a new output folder")
    if foreign:
        raise UsageError(f"{out.root} is not empty and holds no mmcurate run ({min(foreign)}, ...); use an empty or new output folder")
    return None


def _same_pipeline(record: dict, config: dict, stages: list[Stage]) -> bool:
    """Whether a recorded run's pipeline is ``config`` with ``stages`` (compared on typed options)."""
    before = record["pipeline"]
    return _comparable(before) == _comparable(config) and _typed_stages(before["stages"]) == list(map(_typed, stages))


def resolved(pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with local input and output paths made absolute, so a resume from another directory finds them."""

    def absolute(path: str) -> str:
        return path if "://" in path else os.path.abspath(path)

    if not pipeline.output.path.strip():
        raise UsageError("the output path is empty")
    return dataclasses.replace(
        pipeline,
        input=dataclasses.replace(pipeline.input, path=absolute(pipeline.input.path)),
        output=dataclasses.replace(pipeline.output, path=absolute(pipeline.output.path)),
    )


_LEASES: dict[str, Lease] = {}  # the leases this process holds, by output root: taken by start_run, released by finish_run


def start_run(pipeline: Pipeline, engine: str, check: Callable[[Pipeline], None] | None = None) -> RunContext:
    """Take the output's lease (one writer per output: :mod:`shards.lease`), then start the run
    (:func:`_start`, which calls the engine's ``check``, e.g. joining Ray and checking that every node
    sees the storage, unless the output holds this run finished)."""
    pipeline = resolved(pipeline)
    out = OutputDir.open(pipeline.output.path)
    previous_run(out)  # a file or a folder that is not mmcurate's is refused before the lease is written into it
    existed = out.exists(out.root)
    lease = acquire(out.fs, out.root)
    try:
        ctx = _start(pipeline, engine, check)
    except BaseException:
        lease.release()
        if not existed and out.exists(out.root) and not out.entries():  # leave no trace of a run that never started
            out.fs.rmdir(out.root)  # (an object store has no empty folder: nothing is left once the lease is gone)
        raise
    _LEASES[ctx.out.root] = lease
    return ctx


def _start(pipeline: Pipeline, engine: str, check: Callable[[Pipeline], None] | None = None) -> RunContext:
    """Check the output folder, set up the run (stages, input plan), run ``check`` and only then write ``run.json``.

    An output folder is written into only when it is empty or holds a run of the same pipeline
    (compared on typed options); a finished run is left as it is (``ctx.finished``, without ``check``).
    The record of another pipeline's run that wrote no results (one stopped by a usage error at its
    start) is replaced, so that the corrected command runs.
    """
    pipeline = resolved(pipeline)
    out = OutputDir.open(pipeline.output.path)
    previous = previous_run(out)
    stages = pipeline.build_stages()
    for stage in stages:
        stage.check()
    config = pipeline.as_dict()
    if previous is not None and not _same_pipeline(previous, config, stages):
        if previous.get("finished") is not None or out.wrote_results():
            raise UsageError(f"{pipeline.output.path} holds the output of a different pipeline; use a new output folder")
        logger.warning("%s holds the record of another pipeline's run that wrote no results: starting this one in its place", out.root)
        out.fs.rm(out.run_json)
        previous = None
    if previous is None:  # a new run: leftovers of an interrupted start (its parsed input may be stale) go
        out.remove_work()
        out.remove_partial_writes()
    out.claim()
    try:
        if previous is not None:
            out.remove_partial_writes()
        reader = plan_input(pipeline.input, pipeline.output.rows_per_shard, out, previous.get("sources") if previous else None)
        check_columns(stages, reader.format, input_holds(reader))
        run_id = previous.get("run_id") if previous is not None else None
        ctx = RunContext(pipeline, reader, stages, dataclasses.replace(out, run_id=run_id or uuid.uuid4().hex))
        if previous is not None and previous.get("finished"):
            pending = ctx.pending()
            if not pending:
                ctx.finished = True
                out.remove_work()  # the input plan made to compare the input
                return ctx
            if len(ctx.segments) > 1:
                raise UsageError(
                    f"{len(pending)} shards of the finished run in {pipeline.output.path} were changed or removed, and its global step"
                    " cannot be redone; use a new output folder"
                )
        if check is not None:
            check(pipeline)
    except BaseException:
        if previous is None or previous.get("finished"):  # leave no trace of a run that never started (or a re-run refused)
            out.remove_work()
        raise
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    ctx.out.write_json(
        ctx.out.run_json,
        {
            "mmcurate_version": __version__,
            "schema_version": SCHEMA_VERSION,
            "run_id": ctx.out.run_id,
            "engine": engine,
            "pipeline": config,
            "versions": versions(),
            "models": [{"stage": stage.name, **stage.provenance()} for stage in ctx.stages if isinstance(stage, ModelStage)],
            "started": previous.get("started", started) if previous is not None else started,
            "finished": None,
            "shards": len(reader.shards),
            "sources": reader.sources,  # each input file's size, modification time and head hash: a re-run refuses a changed input
        },
    )
    if pipeline.output.format is None and ctx.pipeline.output.format == "parquet":
        logger.warning("the rows carry no image: writing Parquet shards (output.format=webdataset writes tars)")
    return ctx


def write_sizes(out: OutputDir, shard_ids: Iterable[int]) -> None:
    """``shards/sizes.json``: samples per tar, which open_clip's training reads for the dataset size."""
    sizes = {out.tar_path(i).rsplit("/", 1)[-1]: out.read_json(out.stats_path(i))["kept"] for i in shard_ids}
    out.write_json(out.sizes_path(), sizes)


def finish_run(ctx: RunContext) -> dict:
    """Record the end of a finished run in ``run.json``; drop intermediates once every shard is done.

    A run that was finished before it started (``ctx.finished``) is only summarised: no file changes.
    The output's lease is released in any case.
    """
    lease = _LEASES.pop(ctx.out.root, None)
    try:
        return _finish(ctx)
    finally:
        if lease is not None:
            lease.release()


def _finish(ctx: RunContext) -> dict:
    if ctx.pending():
        raise RuntimeError(f"{len(ctx.pending())} shards are unfinished")
    ids = [p.shard_id for p in ctx.reader.shards]
    summary = summarise(ctx.out, ids)
    if ctx.finished:
        return summary
    if ctx.pipeline.output.format == "webdataset":
        write_sizes(ctx.out, ids)
    run_json = ctx.out.run_json
    record = ctx.out.read_json(run_json)
    finished = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record.update(finished=finished, totals={k: summary[k] for k in ("rows_in", "kept", "rejected")})
    ctx.out.write_json(run_json, record)
    ctx.out.remove_work()
    return summary
