"""Readers: URL lists, img2dataset output and mmcurate output, cut into shards of N input rows.

Planning lists the input files and their row counts and cuts the concatenated rows into fixed
slices. Text URL lists (csv, tsv, jsonl, txt) are parsed once at planning into Parquet under
``OUT/_work/input/`` so every shard reads its slice cheaply; malformed rows and invalid UTF-8 are
kept there as rows with a ``reject_reason``, never dropped. Every table a reader returns has
``key``, ``url``, ``caption``, ``reject_stage`` and ``reject_reason``, plus the source's other
columns (renamed ``source_NAME`` where a name clashes with a declared column or starts with ``_``,
which marks a stage's internal columns).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.options import bounded
from mmcurate.schemas import BY_NAME, IMAGE_EXTENSIONS
from mmcurate.shards.layout import OutputDir, open_parquet

logger = logging.getLogger(__name__)
URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
FORMATS = (*URL_LIST_FORMATS, "img2dataset", "mmcurate")
READ_STAGE = "read"
PARSE_CHUNK_ROWS = 100_000  # rows of a text URL list parsed and written at a time
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
# img2dataset columns with a declared counterpart.
_I2D_COLUMNS = ("key", "url", "caption", "width", "height", "original_width", "original_height", "sha256", "status")


@dataclass(frozen=True)
class InputSpec:
    """Where the input is and how to read it (column names as img2dataset's url_col/caption_col)."""

    path: str
    format: str | None = None
    url_col: str = "url"
    caption_col: str | None = "caption"
    max_caption_chars: int = bounded(65536, ge=0)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise UsageError(f"input format must be one of {', '.join(FORMATS)}, not {self.format!r}")


@dataclass(frozen=True)
class SourceFile:
    """One input file: its path, its path relative to the input root (for keys) and row count."""

    path: str
    rel: str
    rows: int
    format: str
    tar: str | None = None  # img2dataset / mmcurate tar beside the Parquet


@dataclass(frozen=True)
class ShardPlan:
    """A shard: slices ``(file index, start row, stop row)`` of the input, in input order."""

    shard_id: int
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def rows(self) -> int:
        return sum(stop - start for _, start, stop in self.pieces)


@dataclass
class Reader:
    """Reads shards of one input. Build it with :func:`plan_input`."""

    spec: InputSpec
    fs: fsspec.AbstractFileSystem
    files: list[SourceFile]
    format: str
    shards: list[ShardPlan] = field(default_factory=list)

    def read(self, plan: ShardPlan) -> pa.Table:
        """The normalised rows of one shard."""
        tables = [self._read_piece(self.files[i], start, stop) for i, start, stop in plan.pieces]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    def _read_piece(self, src: SourceFile, start: int, stop: int) -> pa.Table:
        table = _read_rows(self.fs, src.path, start, stop)
        if src.format == "img2dataset":
            return _from_img2dataset(table, self._images(src))
        if src.format == "mmcurate":
            return _from_mmcurate(table, self._images(src) if src.tar else None)
        if src.format == "normalised":
            return table
        return normalise(table, src.rel, start, self.spec)

    def _images(self, src: SourceFile) -> TarImages:
        with self.fs.open(src.tar, "rb") as f:
            images, error = read_tar_images(f, src.tar)
        if error is not None:
            logger.warning("%s; its rows without an image are rejected as tar_unreadable", error)
        return TarImages(images, "tar_unreadable" if error else "image_missing")


def plan_input(spec: InputSpec, rows_per_shard: int, out: OutputDir) -> Reader:
    """List the input, parse text URL lists into ``OUT/_work/input`` and cut rows into shards."""
    if rows_per_shard < 1:
        raise UsageError("output rows_per_shard must be at least 1")
    fs, root = fsspec.core.url_to_fs(spec.path)
    fmt, paths = _discover(fs, root.rstrip("/"), spec.format, out.root)
    base = _key_base(fs, root.rstrip("/"))
    files: list[SourceFile] = []
    for index, path in enumerate(paths):
        rel = path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]
        files.append(_source_file(fs, path, rel, fmt, spec, out, index))
    reader = Reader(spec, fs, files, fmt)
    reader.shards = _cut(files, rows_per_shard)
    return reader


def _key_base(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The folder that keys' relative paths start from: the input folder, a file's folder, or a
    glob's folder before its first wildcard (so ``a/x.csv`` and ``b/x.csv`` get different keys)."""
    if any(c in root for c in "*?["):
        parts = root.split("/")
        return "/".join(parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))])
    return root if fs.isdir(root) else root.rsplit("/", 1)[0]


def _discover(fs: fsspec.AbstractFileSystem, root: str, fmt: str | None, output: str) -> tuple[str, list[str]]:
    """The input format and files. Hidden and ``_`` files and folders, and the output folder (which
    may lie inside the input folder), are no input."""
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if not _within(p, output))
        if not paths:
            raise UsageError(f"no files match {root!r}")
    elif fs.isdir(root):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        if fmt in (None, "mmcurate") and ("run.json" in names or "_done" in names):
            return "mmcurate", _mmcurate_files(fs, root)
        paths = sorted(p for p in fs.find(root) if not _within(p, output) and not any(part.startswith((".", "_")) for part in p[len(root) + 1 :].split("/")))
        if fmt in (None, "img2dataset"):
            tars = {p for p in paths if p.endswith(".tar")}
            pairs = [p for p in paths if p.endswith(".parquet") and p[: -len(".parquet")] + ".tar" in tars]
            if pairs or fmt == "img2dataset":
                fmt, paths = "img2dataset", pairs
    elif fs.exists(root):
        paths = [root]
    else:
        raise UsageError(f"input {root!r} does not exist")
    if fmt is None:
        found = {_EXTENSIONS.get("." + p.rsplit(".", 1)[-1].lower()) for p in paths} - {None}
        if len(found) != 1:
            raise UsageError(f"cannot tell the input format of {root!r} (found {sorted(found) or 'no known extension'}); set input format")
        fmt = found.pop()
        paths = [p for p in paths if _EXTENSIONS.get("." + p.rsplit(".", 1)[-1].lower()) == fmt]
    if not paths:
        raise UsageError(f"no {fmt} files found at {root!r}")
    return fmt, paths


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _mmcurate_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    meta = sorted(fs.glob(f"{root}/meta/*.parquet"))
    return meta or sorted(fs.glob(f"{root}/shards/*.parquet"))


def _source_file(fs, path: str, rel: str, fmt: str, spec: InputSpec, out: OutputDir, index: int) -> SourceFile:
    if fmt == "img2dataset":
        return SourceFile(path, rel, _parquet_rows(fs, path), fmt, tar=path[: -len(".parquet")] + ".tar")
    if fmt == "mmcurate":
        tar = path.replace("/meta/", "/shards/")[: -len(".parquet")] + ".tar"
        return SourceFile(path, rel, _parquet_rows(fs, path), fmt, tar=tar if "/meta/" in path else None)
    if fmt == "parquet":
        table = _read_rows(fs, path, 0, 0)
        _check_columns(table.column_names, spec, path)
        return SourceFile(path, rel, _parquet_rows(fs, path), fmt)
    # Text URL list: parse once into Parquet with keys and read-time rejections.
    target = out.path("_work", "input", f"{index:05d}.parquet")
    if not out.exists(target):
        out.write_parquet_stream(target, _normalised_chunks(parse_text(fs, path, fmt, spec), rel, spec))
    return SourceFile(target, rel, _parquet_rows(out.fs, target), "normalised")


def _normalised_chunks(chunks: Iterable[pa.Table], rel: str, spec: InputSpec) -> Iterator[pa.Table]:
    start = 0
    for chunk in chunks:
        yield normalise(chunk, rel, start, spec)
        start += chunk.num_rows


def _parquet_rows(fs, path: str) -> int:
    try:
        with open_parquet(fs, path) as pf:
            return pf.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _read_rows(fs, path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    try:
        with open_parquet(fs, path) as pf:
            if stop <= start:
                return pf.schema_arrow.empty_table()
            groups, first, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < stop and offset + n > start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = pf.read_row_groups(groups)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    return table.slice(start - first, stop - start)


def _cut(files: list[SourceFile], n: int) -> list[ShardPlan]:
    shards: list[ShardPlan] = []
    pieces: list[tuple[int, int, int]] = []
    room = n
    for i, src in enumerate(files):
        pos = 0
        while pos < src.rows:
            take = min(room, src.rows - pos)
            pieces.append((i, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                shards.append(ShardPlan(len(shards), tuple(pieces)))
                pieces, room = [], n
    if pieces:
        shards.append(ShardPlan(len(shards), tuple(pieces)))
    return shards


# ---------------------------------------------------------------------------------------------
# URL lists


def _check_columns(columns: list[str], spec: InputSpec, path: str) -> None:
    if spec.url_col not in columns:
        raise UsageError(f"{path}: no url column {spec.url_col!r} (columns: {', '.join(columns)}); set url_col")
    if spec.caption_col is not None and spec.caption_col not in columns and spec.caption_col != "caption":
        raise UsageError(f"{path}: no caption column {spec.caption_col!r} (columns: {', '.join(columns)}); set caption_col")


def parse_text(fs, path: str, fmt: str, spec: InputSpec) -> Iterator[pa.Table]:
    """Parse a csv/tsv/jsonl/txt URL list, streaming, into tables of at most ``PARSE_CHUNK_ROWS``
    rows: the file's columns as strings plus ``reject_reason`` (malformed rows, invalid UTF-8)."""
    header = _jsonl_header(fs, path) if fmt == "jsonl" else None
    chunk: list[list[str | None]] = []
    reasons: list[str | None] = []
    with _open_text(fs, path) as text:
        if fmt == "txt":
            header, records = [spec.url_col], ([line.strip()] for line in text if line.strip())
        elif fmt == "jsonl":
            records = _jsonl_records(text, header)
        else:
            # Let a field be as long as it is: huge captions are rejected by max_caption_chars, as
            # rows, not by the csv module's 128 KiB default, which would stop the file.
            csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
            reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
            header = next(reader, None)
            if header is None:
                raise UsageError(f"{path}: empty file, no header row")
            records = reader
        _check_columns(header, spec, path)
        for record in records:
            reason = None
            if isinstance(record, str):  # a jsonl line that is not an object
                reason, record = record, [None] * len(header)
            elif len(record) != len(header):
                reason = "malformed_row"
                record = (list(record) + [None] * len(header))[: len(header)]
            if any(v is not None and _has_bad_utf8(v) for v in record):
                reason = reason or "invalid_utf8"
                record = [None if v is None else _repair(v) for v in record]
            chunk.append(record)
            reasons.append(reason)
            if len(chunk) == PARSE_CHUNK_ROWS:
                yield _string_table(header, chunk, reasons)
                chunk, reasons = [], []
    yield _string_table(header, chunk, reasons)


@contextmanager
def _open_text(fs, path: str) -> Iterator[io.TextIOWrapper]:
    """The file as text; bytes that are not UTF-8 survive as surrogates, to be found per row."""
    try:
        with fs.open(path, "rb") as raw:
            yield io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _string_table(header: list[str], rows: list[list[str | None]], reasons: list[str | None]) -> pa.Table:
    columns = {name: pa.array([row[i] for row in rows], pa.string()) for i, name in enumerate(header)}
    return pa.table({**columns, "reject_reason": pa.array(reasons, pa.string())})


def _jsonl_header(fs, path: str) -> list[str]:
    """Every key of every object in a jsonl file, in order of first appearance (a first pass)."""
    header: dict[str, None] = {}
    with _open_text(fs, path) as text:
        for line in text:
            try:
                obj = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(obj, dict):
                header.update(dict.fromkeys(obj))
    return list(header)


def _jsonl_records(text: Iterable[str], names: list[str]) -> Iterator[list[str | None] | str]:
    """Per non-blank line: its values under ``names``, or ``"malformed_row"``."""

    def cell(v: object) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):  # NaN / Infinity, which Python's json accepts, are no text
            return None
        return v if isinstance(v, str) or v is None else json.dumps(v)

    for line in text:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        yield [cell(obj.get(n)) for n in names] if isinstance(obj, dict) else "malformed_row"


def _has_bad_utf8(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _repair(value: str) -> str:
    return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def sample_key(rel: str, row: int) -> str:
    """The deterministic key of row ``row`` of input file ``rel``: 16 hex digits, no dots."""
    return hashlib.sha256(f"{rel}\0{row}".encode()).hexdigest()[:16]


def normalise(table: pa.Table, rel: str, start: int, spec: InputSpec) -> pa.Table:
    """Rename url/caption columns, add keys and read-time rejections; carry other columns through."""
    n = table.num_rows
    reasons = table.column("reject_reason") if "reject_reason" in table.column_names else pa.nulls(n, pa.string())
    url, bad_url = _as_string(table.column(spec.url_col))
    has_caption = spec.caption_col is not None and spec.caption_col in table.column_names
    caption, bad_caption = _as_string(table.column(spec.caption_col)) if has_caption else (pa.nulls(n, pa.string()), [False] * n)
    out = {
        "key": pa.array([sample_key(rel, start + i) for i in range(n)], pa.string()),
        "url": url,
        "caption": caption,
    }
    taken = {spec.url_col, spec.caption_col, "reject_reason"}
    for name in table.column_names:
        if name not in taken:
            out[source_name(name)] = table.column(name)
    bad_utf8 = pa.array([a or b for a, b in zip(bad_url, bad_caption, strict=True)], pa.bool_())
    reasons = pc.if_else(pc.and_(pc.is_null(reasons), bad_utf8), "invalid_utf8", reasons)
    missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(url), ""), True)  # null or blank
    reasons = pc.if_else(pc.and_(pc.is_null(reasons), missing), "missing_url", reasons)
    too_long = pc.fill_null(pc.greater(pc.utf8_length(caption), spec.max_caption_chars), False)
    reasons = pc.if_else(pc.and_(pc.is_null(reasons), too_long), "caption_too_long", reasons)
    out["reject_stage"] = pc.if_else(pc.is_null(reasons), pa.scalar(None, pa.string()), READ_STAGE)
    out["reject_reason"] = reasons
    return pa.table(out)


def source_name(name: str) -> str:
    """The output name of a source column: ``source_NAME`` where it would pass for a declared or internal column."""
    return f"source_{name}" if name in BY_NAME or name.startswith("_") else name


def _as_string(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[bool]]:
    """``column`` as text, and which values were bytes that are not UTF-8 (kept with U+FFFD in their place)."""
    clean = [False] * len(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string()), clean
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type) or pa.types.is_fixed_size_binary(column.type):
        values = column.to_pylist()
        text = [None if v is None else v.decode("utf-8", errors="replace") for v in values]
        bad = [v is not None and t.encode() != v for v, t in zip(values, text, strict=True)]
        return pa.chunked_array([pa.array(text, pa.string())]), bad
    if pa.types.is_floating(column.type):  # NaN is no text: treat it as missing
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    try:
        return column.cast(pa.string()), clean
    except pa.ArrowException:
        return pa.chunked_array([pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())]), clean


# ---------------------------------------------------------------------------------------------
# Tars: img2dataset and mmcurate WebDataset output


TAR_ERRORS = (tarfile.TarError, OSError, EOFError)


def tar_members(fileobj, read: Callable[[str], bool]) -> Iterator[tuple[str, str, bytes | None]]:
    """``(key, extension, bytes)`` of the regular-file members of a tar, in order, streamed: the
    key is the file name up to its first dot (webdataset's rule); bytes are read only for the
    extensions ``read`` accepts (None otherwise). Members with absolute or ``..`` paths, links and
    devices are skipped, and nothing is extracted to disk, so no tar can write anywhere. A corrupt
    or truncated tar raises one of ``TAR_ERRORS``."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or member.name.startswith("/") or ".." in parts:
                continue
            key, _, ext = parts[-1].partition(".")
            yield key, ext, tar.extractfile(member).read() if read(ext) else None


def read_tar_images(fileobj, name: str) -> tuple[dict[str, tuple[str, bytes]], str | None]:
    """``{key: (extension, bytes)}`` of the image members of a tar, read in memory, and the error
    that stopped the reading of a corrupt or truncated tar (None when it was read to the end)."""
    images: dict[str, tuple[str, bytes]] = {}
    try:
        for key, ext, data in tar_members(fileobj, lambda ext: ext.lower() in (*IMAGE_EXTENSIONS, "jpeg")):
            if data is not None:
                images[key] = ("jpg" if ext.lower() == "jpeg" else ext.lower(), data)
    except TAR_ERRORS as e:
        return images, f"{name}: not a readable tar ({e})"
    return images, None


@dataclass(frozen=True)
class TarImages:
    """The images of one tar, and the reason for a row whose image is not among them."""

    images: dict[str, tuple[str, bytes]]
    missing_reason: str = "image_missing"


def attach_images(table: pa.Table, images: dict[str, tuple[str, bytes]], wanted: list[bool]) -> tuple[pa.Table, list[bool]]:
    """Replace ``image``/``image_format`` by key from ``images`` where ``wanted``; also return, per
    row, whether a wanted image was missing."""
    keys = table.column("key").to_pylist()
    found = [images.get(k) if want else None for k, want in zip(keys, wanted, strict=True)]
    table = table.drop_columns([c for c in ("image", "image_format") if c in table.column_names])
    table = table.append_column("image", pa.array([f[1] if f else None for f in found], pa.binary()))
    table = table.append_column("image_format", pa.array([f[0] if f else None for f in found], pa.string()))
    return table, [want and f is None for want, f in zip(wanted, found, strict=True)]


def _attach_images(table: pa.Table, tar: TarImages, ok: list[bool]) -> tuple[pa.Table, list[str | None]]:
    """Add ``image``/``image_format`` by key; return reasons for ok rows whose image is missing."""
    table, missing = attach_images(table, tar.images, ok)
    return table, [tar.missing_reason if m else None for m in missing]


def _from_img2dataset(table: pa.Table, images: TarImages) -> pa.Table:
    """img2dataset rows: failed downloads are rejected as ``not_downloaded``; keys are kept."""
    status = table.column("status").to_pylist() if "status" in table.column_names else ["success"] * table.num_rows
    ok = [s == "success" for s in status]
    keep = {c: table.column(c) for c in table.column_names}
    out = {}
    for name in _I2D_COLUMNS:
        if name in keep:
            out[name] = keep.pop(name).cast(BY_NAME[name].type)
    out["key"] = pa.array([k.replace(".", "_") for k in out["key"].to_pylist()], pa.string())
    errors = keep["error_message"].to_pylist() if "error_message" in keep else [None] * table.num_rows
    out["status"] = pa.array(["ok" if good else (err or s or "failed") for good, s, err in zip(ok, status, errors, strict=True)], pa.string())
    out.update({source_name(k): v for k, v in keep.items()})
    result, missing = _attach_images(pa.table(out), images, ok)
    reasons = [None if good and m is None else (m or "not_downloaded") for good, m in zip(ok, missing, strict=True)]
    result = result.append_column("reject_stage", pa.array([None if r is None else READ_STAGE for r in reasons], pa.string()))
    return result.append_column("reject_reason", pa.array(reasons, pa.string()))


def _from_mmcurate(table: pa.Table, images: TarImages | None) -> pa.Table:
    """Kept rows of an earlier mmcurate run, images from its tar when it wrote WebDataset.

    Only rows whose ``image_format`` says the run stored an image expect one in the tar (a run on a
    URL list stores none).
    """
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    if images is not None:
        stored = table.column("image_format").to_pylist() if "image_format" in table.column_names else [None] * n
        table, reasons = _attach_images(table, images, [f is not None for f in stored])
    table = table.drop_columns([c for c in ("reject_stage", "reject_reason") if c in table.column_names])
    table = table.append_column("reject_stage", pa.array([None if r is None else READ_STAGE for r in reasons], pa.string()))
    return table.append_column("reject_reason", pa.array(reasons, pa.string()))
