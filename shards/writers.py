"""Writers: one finished shard to its output, rejects, stats and done marker, every file atomic."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.options import bounded
from mmcurate.schemas import CAPTION_EXTENSION, IMAGE_EXTENSIONS, JSON_EXTENSION, NOT_IN_JSON, conform
from mmcurate.shards.layout import OutputDir


@dataclass(frozen=True)
class OutputSpec:
    """Where and how to write: WebDataset tars (+ ``meta/`` Parquet) or Parquet with image bytes."""

    path: str
    format: Literal["webdataset", "parquet"] = "webdataset"
    rows_per_shard: int = bounded(10_000, ge=1)
    save_rejected_images: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("webdataset", "parquet"):
            raise UsageError(f"output format must be webdataset or parquet, not {self.format!r}")


def split_kept(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept rows, rejected rows) by ``reject_reason``."""
    rejected = pc.is_valid(table.column("reject_reason"))
    return table.filter(pc.invert(rejected)), table.filter(rejected)


def write_shard(out: OutputDir, spec: OutputSpec, shard_id: int, table: pa.Table, columns: list[str], stats: dict) -> None:
    """Write every file of a finished shard, the done marker last."""
    table = conform(table, columns)
    kept, rejected = split_kept(table)
    if spec.format == "webdataset":
        out.write_bytes(out.shard_path("shards", shard_id, ".tar"), tar_bytes(kept))
        out.write_parquet(out.shard_path("meta", shard_id, ".parquet"), _drop(kept, "image"))
    else:
        out.write_parquet(out.shard_path("shards", shard_id, ".parquet"), kept)
    if not spec.save_rejected_images:
        rejected = _drop(rejected, "image")
    out.write_parquet(out.shard_path("rejects", shard_id, ".parquet"), rejected)
    out.write_json(out.shard_path("_stats", shard_id, ".json"), stats)
    out.mark_done(shard_id)


def _drop(table: pa.Table, column: str) -> pa.Table:
    return table.drop_columns([column]) if column in table.column_names else table


def tar_bytes(table: pa.Table) -> bytes:
    """A WebDataset tar: per sample ``KEY.<image_format>``, ``KEY.txt`` and ``KEY.json``.

    Members are written in row order with fixed metadata so the same rows give the same bytes.
    """
    buf = io.BytesIO()
    json_columns = [c for c in table.column_names if c not in NOT_IN_JSON]
    rows = table.select(json_columns).to_pylist()
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist() if "image" in table.column_names else [None] * len(keys)
    formats = table.column("image_format").to_pylist() if "image_format" in table.column_names else [None] * len(keys)
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * len(keys)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, fmt, caption, row in zip(keys, images, formats, captions, rows, strict=True):
            if image is not None:
                ext = fmt if fmt in IMAGE_EXTENSIONS else "jpg"
                _add(tar, f"{key}.{ext}", image)
            _add(tar, f"{key}.{CAPTION_EXTENSION}", (caption or "").encode())
            _add(tar, f"{key}.{JSON_EXTENSION}", json.dumps({"key": key, **row}, ensure_ascii=False, default=_json_default).encode())
    return buf.getvalue()


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return None
    return str(value)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
