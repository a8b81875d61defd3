"""The one declared list of sample columns.

Everything that knows about columns reads it from here: the Arrow schema written to
Parquet (with ``schema_version`` in the file metadata), the WebDataset mapping, the
validator and the column reference in ``docs/schema.md`` (``mmcurate schema --markdown``).
Later work adds columns to :data:`FIELDS`, nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"
METADATA_KEY = b"mmcurate.schema_version"


@dataclass(frozen=True)
class Field:
    """One declared column: its Arrow type, who sets it and what it means; ``indexes``: the text column
    whose characters its spans index (a stage that rewrites that text leaves them pointing at the old one)."""

    name: str
    type: pa.DataType
    set_by: str
    doc: str
    indexes: str | None = None

    def arrow(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.name != "key")


_GROUNDING = pa.list_(
    pa.struct(
        [
            ("phrase", pa.string()),
            ("start", pa.int32()),
            ("end", pa.int32()),
            ("expression_start", pa.int32()),
            ("expression_end", pa.int32()),
            ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
            ("scores", pa.list_(pa.float32())),
        ]
    )
)
_CAPTIONS = pa.list_(pa.struct([("text", pa.string()), ("source", pa.string()), ("score", pa.float32())]))

FIELDS: tuple[Field, ...] = (
    Field(
        "key",
        pa.string(),
        "reader",
        "Deterministic sample id: 16 hex digits of sha256(relative input path, NUL, row); img2dataset keys are kept. Never contains a dot.",
    ),
    Field("url", pa.string(), "reader", "Source URL of the image."),
    Field("caption", pa.string(), "reader", "Source caption (alt-text)."),
    Field("image", pa.binary(), "download / img2dataset reader", "Encoded image bytes as stored."),
    Field(
        "image_format",
        pa.string(),
        "download / img2dataset reader",
        "Format of `image`: jpg, png or webp (read from the bytes of ingested images).",
    ),
    Field("width", pa.int32(), "download", "Width of the stored image in pixels."),
    Field("height", pa.int32(), "download", "Height of the stored image in pixels."),
    Field("original_width", pa.int32(), "download", "Width of the source image; size filters read this."),
    Field("original_height", pa.int32(), "download", "Height of the source image; size filters read this."),
    Field("sha256", pa.string(), "download", "sha256 of the original downloaded bytes (hex)."),
    Field("status", pa.string(), "download", "`ok`, or the reason the sample could not be fetched or decoded."),
    Field("reject_stage", pa.string(), "runner", "Stage that rejected the row; null when kept."),
    Field("reject_reason", pa.string(), "runner", "Why the row was rejected; null when kept."),
    Field(
        "duplicate_of",
        pa.string(),
        "dedup stages",
        "Key of the copy of this row that deduplication kept; after chained dedups, the copy the last one kept.",
    ),
    Field("caption_words", pa.int32(), "caption_quality", "Words in the normalised caption."),
    Field("caption_chars", pa.int32(), "caption_quality", "Characters in the normalised caption."),
    Field("language", pa.string(), "language", "fastText lid.176 top-1 language (ISO 639 code)."),
    Field("language_score", pa.float32(), "language", "Probability of the top-1 language."),
    Field("clip_score", pa.float32(), "clip_score", "Cosine similarity of CLIP image and caption embeddings."),
    Field("nsfw_score", pa.float32(), "nsfw", "Highest confidence over the detector's exposed-body-part classes."),
    Field("phash", pa.int64(), "phash_dedup", "64-bit perceptual hash of the image, as a signed integer."),
    Field("captions", _CAPTIONS, "capfilt", "Candidate captions with their source and score."),
    Field(
        "grounding",
        _GROUNDING,
        "noun_phrases, grounding",
        "Noun phrases of `caption`: `phrase` with its character span `start`..`end`, the span of its referring expression "
        "(`expression_start`..`expression_end`), and, after `grounding`, `boxes` (xyxy, normalised to [0, 1] of the stored image, "
        "exactly four numbers each) with their `scores`.",
        indexes="caption",
    ),
    Field("num_boxes", pa.int32(), "grounding", "Boxes in `grounding`, over all phrases (a scalar for select, stats and plots)."),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}

# WebDataset: one tar member per sample and extension.
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"
# Columns that are not written to the per-sample json member (they are members of their own, or the
# tar member name itself).
NOT_IN_JSON = ("key", "image", "caption")


def arrow_schema(columns: list[str] | None = None, extra: pa.Schema | None = None) -> pa.Schema:
    """The Arrow schema of a table holding ``columns`` (declared order) plus ``extra`` source columns."""
    names = set(columns) if columns is not None else None
    fields = [f.arrow() for f in FIELDS if names is None or f.name in names]
    if extra is not None:
        fields += [f for f in extra if f.name not in BY_NAME]
    return pa.schema(fields, metadata={METADATA_KEY: SCHEMA_VERSION.encode()})


def conform(table: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """Cast ``table`` to the declared schema: declared columns first in declared order, then extras.

    Declared columns named in ``columns`` but absent from ``table`` are added as nulls. Columns
    whose name starts with ``_`` are a stage's internal state (signatures for a global step) and
    are dropped.
    """
    present = set(table.column_names)
    wanted = list(columns) if columns is not None else [f.name for f in FIELDS if f.name in present]
    extra = pa.schema([table.schema.field(n) for n in table.column_names if n not in BY_NAME and not n.startswith("_")])
    schema = arrow_schema(wanted, extra)
    arrays = []
    for field in schema:
        if field.name in present:
            arrays.append(table.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def binary_array(values: Sequence[bytes | None]) -> pa.Array | pa.ChunkedArray:
    """``pa.array(values, pa.binary())`` made from one join of the bytes: Arrow's builder grows its
    buffer by reallocation, ten times slower for a shard's image column (a fresh 160 MB: 0.8 s against 0.08 s)."""
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    ends = np.cumsum(np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values)))
    if len(values) == 0 or ends[-1] >= 1 << 31:  # past int32 offsets Arrow's own builder chunks the column
        return pa.array(values, pa.binary())
    offsets = np.concatenate([np.zeros(1, np.int32), ends.astype(np.int32)])
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    data = pa.py_buffer(b"".join(v for v in values if v is not None))
    return pa.Array.from_buffers(pa.binary(), len(values), [bitmap, pa.py_buffer(offsets), data], null_count=int((~valid).sum()))


def markdown() -> str:
    """The column reference as a Markdown table (docs/schema.md is generated from this)."""
    lines = [
        f"# Sample schema (version {SCHEMA_VERSION})",
        "",
        "Generated by `mmcurate schema --markdown` from `schemas/__init__.py`; do not edit by hand.",
        "",
        "| column | Arrow type | set by | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{f.name}` | `{f.type}` | {f.set_by} | {f.doc} |" for f in FIELDS]
    lines += [
        "",
        "WebDataset tars hold, per sample, `KEY.jpg|png|webp` (the image), `KEY.txt` (the caption) and",
        "`KEY.json` (every other column, extra source columns included). `meta/ID.parquet` beside each tar",
        "holds every column but the image bytes.",
    ]
    return "\n".join(lines) + "\n"
