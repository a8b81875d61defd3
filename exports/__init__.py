"""``mmcurate export FORMAT OUT DEST``: an mmcurate output to the files a grounded model trains on.

One canonical box store (the ``grounding`` column), many formats, each written as its consumer
reads it (:mod:`mmcurate.exports.text`, :mod:`mmcurate.exports.datasets`). The source is read shard
by shard (never the whole dataset in memory); keys are kept; each source shard ``id`` gives
``DEST/{id:05d}.*`` and ``DEST/images/{id:05d}/``. Rows are skipped, and counted by reason, when
they lack a caption, an image the format needs, or the format's least number of boxes (``min_boxes``:
1, and 0 for ``llava``), when their phrases' spans do not index their caption (``span_mismatch``),
or when their caption holds what the format's consumer reads as markup (``reserved_markup``: each
format's ``reserved`` pattern; such text is never escaped). ``DEST/export.json``, written last,
records the format, the counts and the quantisation error: the mean and lowest IoU between the boxes
and their quantised versions as the consumer decodes them. DEST must be a new or empty folder; a
source without the ``grounding`` column a format needs is refused.
"""

from __future__ import annotations

import tempfile
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.exports.base import ExportOptions, Format, Phrase, Sample
from mmcurate.exports.datasets import Grit, Llava
from mmcurate.exports.text import CogVLM, Florence2, Kosmos2, Qwen2VL, QwenVL
from mmcurate.shards.layout import OutputDir, detect_layout
from mmcurate.shards.readers import InputSpec, ShardPlan, plan_input

__all__ = ["FORMATS", "ExportOptions", "export", "needed_columns", "sample_of"]

FORMATS: dict[str, type[Format]] = {cls.name: cls for cls in (Kosmos2, QwenVL, Qwen2VL, CogVLM, Florence2, Grit, Llava)}
COLUMNS = ("key", "url", "caption", "width", "height", "image", "image_format", "grounding", "reject_reason")


def export(fmt: str, source: str, dest: str, options: ExportOptions | None = None) -> dict[str, Any]:
    """Export the kept rows of the mmcurate output ``source`` to ``dest`` as ``fmt``; the export.json record."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    options = options or ExportOptions()
    if not options.instructions:
        raise UsageError("export: the instruction list is empty")
    src = OutputDir.open(source)
    if detect_layout(src.fs, src.root) != "mmcurate":
        raise UsageError(f"{source} is not an mmcurate output (no run.json or _done)")
    src.check_whole()
    stored = src.stored_columns()
    for column, why in needed_columns(fmt).items():
        if stored and column not in stored:
            raise UsageError(f"{source} has no {column!r} column, which {why} needs")
    out = OutputDir.open(dest)
    if out.exists(out.root) and out.fs.ls(out.root, detail=False):
        raise UsageError(f"{dest} is not empty: export into a new or empty folder")
    with tempfile.TemporaryDirectory() as scratch:  # the planner's input record goes here, not into DEST
        reader = plan_input(InputSpec(source, format="mmcurate"), 1, OutputDir.open(scratch))
    with FORMATS[fmt](out, options) as writer:
        min_boxes = writer.min_boxes if options.min_boxes is None else options.min_boxes
        for index, file in enumerate(reader.files):
            shard_id = int(PurePosixPath(file.path).name.split(".", 1)[0])
            table = reader.read(ShardPlan(shard_id, ((index, 0, file.rows),)))
            writer.write_shard(shard_id, _samples(writer, shard_id, table, min_boxes))
            writer.counts.shards += 1
    record = {"format": fmt, "source": source, "min_boxes": min_boxes, **writer.counts.report()}
    record["quantisation"]["method"] = writer.quantisation
    out.write_json(out.path("export.json"), record)
    return record


def _samples(writer: Format, shard_id: int, table: pa.Table, min_boxes: int) -> list[Sample]:
    """The rows of one shard that ``writer`` exports; the others are counted as skipped."""
    present = [c for c in COLUMNS if c in table.column_names]
    samples = []
    for row in table.select(present).to_pylist():
        sample = sample_of(shard_id, row)
        if sample.caption is None:
            writer.counts.skip("caption_missing")
        elif writer.needs_image and (sample.image is None or row.get("reject_reason")):
            writer.counts.skip(row.get("reject_reason") or "image_missing")
        elif sample.num_boxes < min_boxes:
            writer.counts.skip("too_few_boxes")
        elif reason := writer.refusal(sample):
            writer.counts.skip(reason)
        else:
            samples.append(sample)
    return samples


def needed_columns(fmt: str) -> dict[str, str]:
    """The stored columns the targets of ``fmt`` need, each with what needs it (for the usage error)."""
    return {"grounding": f"{fmt} targets (run noun_phrases and grounding)"} if FORMATS[fmt].grounded else {}


def sample_of(shard_id: int, row: dict) -> Sample:
    """One stored row (a dict of its columns) as the formats see it: its phrases that have boxes."""
    phrases = tuple(_phrase(e) for e in row.get("grounding") or () if e["boxes"])
    return Sample(
        shard_id,
        row["key"],
        row.get("url"),
        row.get("caption"),
        row.get("width"),
        row.get("height"),
        row.get("image"),
        row.get("image_format"),
        phrases,
    )


def _phrase(entry: dict) -> Phrase:
    return Phrase(
        entry["phrase"],
        entry["start"],
        entry["end"],
        entry["expression_start"],
        entry["expression_end"],
        tuple(tuple(b) for b in entry["boxes"]),
        tuple(entry["scores"]),
    )
