"""``mmcurate run PIPELINE --retry-failed``: fetch again only the samples an earlier run failed to
download, run them through the pipeline's stages and merge them into the finished shards.

The rows retried are those a download stage (any of them: ``download#1``, ``download#2``) rejected,
but not those whose failure cannot change (``bad_url``, ``bad_scheme``, ``blocked_address``,
``opted_out`` and the size checks). Download options may differ from the earlier run (a longer
deadline, more retries); everything else must match, the input included. The retry holds the
output's lease (:mod:`shards.lease`) as a run does. A shard is rewritten whole, its done marker
removed first, so an interrupted retry leaves the shard to be recomputed by a plain re-run rather
than half merged. Pipelines with global stages (dedup, select) are refused: their decisions saw
the whole dataset without the retried rows.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.download.stage import Download
from mmcurate.engines.core import REJECTED_AT, run_segment, shard_stats, start_ledger
from mmcurate.engines.run import RunContext, finish_run
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import Pipeline
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.lease import acquire
from mmcurate.shards.writers import write_shard
from mmcurate.stages.base import set_column

NOT_RETRIED = frozenset(
    {
        "bad_url",
        "bad_scheme",
        "blocked_address",
        "opted_out",
        "image_too_small",
        "image_area_too_large",
        "aspect_ratio_too_large",
        "decompression_bomb",
    }
)
STAGE = Download.name  # the stage name download options are written under in a pipeline


def retry_failed(pipeline: Pipeline) -> dict:
    """Retry the failed downloads of the finished run in ``pipeline.output.path``, holding the output's
    lease; return the run summary."""
    out = OutputDir.open(pipeline.output.path)
    if not out.exists(out.run_json):
        raise UsageError(f"--retry-failed needs the output of an earlier run; {pipeline.output.path} has none")
    lease = acquire(out.fs, out.root)
    try:
        return _retry(pipeline)
    finally:
        lease.release()


def _retry(pipeline: Pipeline) -> dict:
    ctx = _open_finished_run(pipeline)
    for position in ctx.segments[0].positions:
        ctx.ready(position)
    labels = [stage.label for stage in ctx.stages if isinstance(stage, Download)]
    retried = recovered = 0
    for plan in ctx.reader.shards:
        counts = _retry_shard(ctx, plan.shard_id, labels)
        retried += counts[0]
        recovered += counts[1]
    run_json = ctx.out.run_json
    record = ctx.out.read_json(run_json)
    at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    download = [params for item in pipeline.as_dict()["stages"] for name, params in item.items() if name == STAGE]
    record.setdefault("retries", []).append({"at": at, "download": download, "retried": retried, "recovered": recovered})
    ctx.out.write_json(run_json, record)
    return finish_run(ctx)


def _open_finished_run(pipeline: Pipeline) -> RunContext:
    out = OutputDir.open(pipeline.output.path)
    if not any(spec.name == STAGE for spec in pipeline.stages):
        raise UsageError("--retry-failed needs a pipeline with a download stage")
    previous = out.read_json(out.run_json)["pipeline"]
    current = pipeline.as_dict()
    if _without_download(previous) != _without_download(current):
        raise UsageError(
            f"{pipeline.output.path} holds the output of a different pipeline (only download options may change for --retry-failed)"
        )
    out.claim()  # the input plan parses URL lists into the work folder
    try:
        ctx = RunContext.create(pipeline)
        if len(ctx.segments) > 1:
            raise UsageError("--retry-failed does not support pipelines with global stages (dedup, select): re-run them into a new output")
        if ctx.pending():
            raise UsageError(f"{len(ctx.pending())} shards are unfinished: run the pipeline without --retry-failed first")
    except BaseException:
        out.remove_work()
        raise
    return ctx


def _without_download(config: dict) -> dict:
    stages = [item if STAGE not in item else {STAGE: None} for item in config["stages"]]
    return {"input": config["input"], "stages": stages, "output": {k: v for k, v in config["output"].items() if k != "path"}}


def _retry_shard(ctx: RunContext, shard_id: int, labels: list[str]) -> tuple[int, int]:
    """Retry one shard's rows that the download stages labelled ``labels`` failed and rewrite it; (rows retried, rows now kept)."""
    out = ctx.out
    rejects = out.read_parquet(out.rejects_path(shard_id))
    failed = pc.and_(
        pc.is_in(rejects.column("reject_stage"), pa.array(labels, pa.string())),
        pc.invert(pc.is_in(rejects.column("reject_reason"), pa.array(sorted(NOT_RETRIED)))),
    )
    failed = pc.fill_null(failed, False)
    again = rejects.filter(failed)
    if again.num_rows == 0:
        return 0, 0
    for name in ("reject_stage", "reject_reason", "duplicate_of"):
        if name in again.column_names:
            again = again.set_column(again.column_names.index(name), name, pa.nulls(again.num_rows, pa.string()))
    again = run_segment(ctx.segments[0], start_ledger(again), None)
    kept = ctx.pipeline.output.writer().read(ctx.out, shard_id)  # as written, images included
    earlier = _ledger(pa.concat_tables([kept, rejects.filter(pc.invert(failed))], promote_options="permissive"), ctx)
    table = pa.concat_tables([earlier, again], promote_options="permissive")
    stats = shard_stats(shard_id, table, ctx.stages)
    previous = out.read_json(out.stats_path(shard_id))
    for entry, before in zip(stats["stages"], previous["stages"], strict=True):
        entry["seconds"] = round(entry["seconds"] + before["seconds"], 4)
    out.fs.rm(out.done_path(shard_id))
    write_shard(out, ctx.pipeline.output, shard_id, table, ctx.columns, stats)
    return again.num_rows, int(pc.sum(pc.is_null(again.column("reject_reason"))).as_py() or 0)


def _ledger(table: pa.Table, ctx: RunContext) -> pa.Table:
    """Rows as written (kept rows and rejects) with the ledger's ``_rejected_at``: the position of
    the stage labelled ``reject_stage``."""
    names = pa.array(["read", *(stage.label for stage in ctx.stages)])
    at = pc.subtract(pc.index_in(table.column("reject_stage"), value_set=names), 1)
    return set_column(table, REJECTED_AT, pc.if_else(pc.is_valid(table.column("reject_reason")), at, None), pa.int16())
