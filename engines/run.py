"""What every engine does around its shard loop: plan, record the run, resume, summarise."""

from __future__ import annotations

import datetime as dt
import platform
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa

from mmcurate import __version__
from mmcurate.engines.core import Segment, segments
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import Pipeline, check_columns, output_columns
from mmcurate.schemas import BY_NAME, SCHEMA_VERSION
from mmcurate.shards.layout import OutputDir, open_parquet, shard_name
from mmcurate.shards.readers import Reader, ShardPlan, plan_input
from mmcurate.stages.base import Stage

_VERSIONED = ("pyarrow", "numpy", "pillow", "aiohttp", "ray", "pyspark", "torch", "open_clip_torch", "transformers", "onnxruntime")


@dataclass
class RunContext:
    """A planned run: the input's shards, the built stages cut into segments, the output folder."""

    pipeline: Pipeline
    reader: Reader
    stages: list[Stage]
    out: OutputDir
    segments: list[Segment] = field(init=False)
    columns: list[str] = field(init=False)
    _decisions: dict[int, pa.Table] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.segments = segments(self.stages)
        self.columns = output_columns(self.stages, self.reader.format, carried_columns(self.reader))

    @classmethod
    def create(cls, pipeline: Pipeline, reader: Reader | None = None) -> RunContext:
        out = OutputDir.open(pipeline.output.path)
        stages = pipeline.build_stages()  # before planning writes parsed URL lists into the output folder
        reader = reader or plan_input(pipeline.input, pipeline.output.rows_per_shard, out)
        check_columns(stages, reader.format)
        return cls(pipeline, reader, stages, out)

    def work_path(self, segment: int, shard_id: int, ext: str) -> str:
        return self.out.path("_work", f"seg{segment}", shard_name(shard_id) + ext)

    def global_path(self, segment: int) -> str:
        return self.out.path("_work", f"global{segment}.parquet")

    def pending(self, segment: int | None = None) -> list[ShardPlan]:
        """Shards without a done marker (and, for an inner segment, without its intermediate)."""
        todo = [p for p in self.reader.shards if not self.out.is_done(p.shard_id)]
        if segment is not None and segment < len(self.segments) - 1:
            todo = [p for p in todo if not self.out.exists(self.work_path(segment, p.shard_id, ".parquet"))]
        return todo

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
    return {"input": config["input"], "stages": config["stages"], "output": {k: v for k, v in config["output"].items() if k != "path"}}


def start_run(pipeline: Pipeline, engine: str) -> RunContext:
    """Refuse to mix two pipelines in one output folder (before writing anything), plan the run, write ``run.json``."""
    out = OutputDir.open(pipeline.output.path)
    run_json = out.path("run.json")
    config = pipeline.as_dict()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    previous = out.read_json(run_json) if out.exists(run_json) else None
    if previous is not None:
        if _comparable(previous["pipeline"]) != _comparable(config):
            raise UsageError(f"{pipeline.output.path} holds the output of a different pipeline; use a new output folder")
        started = previous.get("started", started)
        out.remove_partial_writes()
    ctx = RunContext.create(pipeline)
    if previous is not None and previous["shards"] != len(ctx.reader.shards):
        raise UsageError(f"the input changed since {pipeline.output.path} was started ({previous['shards']} shards then, {len(ctx.reader.shards)} now); use a new output folder")
    ctx.out.write_json(run_json, {
        "mmcurate_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "engine": engine,
        "pipeline": config,
        "versions": versions(),
        "started": started,
        "finished": None,
        "shards": len(ctx.reader.shards),
    })
    return ctx


def summarise(out: OutputDir) -> dict:
    """Totals over every ``_stats`` file: rows in, kept, rejected by stage and by reason."""
    totals = {"shards": 0, "rows_in": 0, "kept": 0, "rejected": 0}
    by_stage: dict[str, dict] = {}
    for shard_id in out.shard_ids("_stats"):
        stats = out.read_json(out.shard_path("_stats", shard_id, ".json"))
        totals["shards"] += 1
        for key in ("rows_in", "kept", "rejected"):
            totals[key] += stats[key]
        for entry in stats["stages"]:
            agg = by_stage.setdefault(entry["stage"], {"rows_in": 0, "rejected": 0, "reasons": Counter(), "seconds": 0.0})
            agg["rows_in"] += entry["rows_in"]
            agg["rejected"] += entry["rejected"]
            agg["reasons"].update(entry["reasons"])
            agg["seconds"] += entry["seconds"]
    for agg in by_stage.values():
        agg["reasons"] = dict(agg["reasons"].most_common())
        agg["seconds"] = round(agg["seconds"], 3)
    return {**totals, "stages": by_stage}


def write_sizes(out: OutputDir) -> None:
    """``shards/sizes.json``: samples per tar, which open_clip's training reads for the dataset size."""
    sizes = {f"{shard_name(i)}.tar": out.read_json(out.shard_path("_stats", i, ".json"))["kept"] for i in out.shard_ids("_stats")}
    out.write_json(out.path("shards", "sizes.json"), sizes)


def finish_run(ctx: RunContext) -> dict:
    """Record the end of a finished run in ``run.json``; drop intermediates once every shard is done."""
    if ctx.pending():
        raise RuntimeError(f"{len(ctx.pending())} shards are unfinished")
    summary = summarise(ctx.out)
    if ctx.pipeline.output.format == "webdataset":
        write_sizes(ctx.out)
    run_json = ctx.out.path("run.json")
    record = ctx.out.read_json(run_json)
    record.update(finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), totals={k: summary[k] for k in ("rows_in", "kept", "rejected")})
    ctx.out.write_json(run_json, record)
    if ctx.out.exists(ctx.out.path("_work")):
        ctx.out.fs.rm(ctx.out.path("_work"), recursive=True)
    return summary
