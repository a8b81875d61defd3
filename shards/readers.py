"""Readers: URL lists, img2dataset output and mmcurate output, cut into shards of N input rows.

Planning lists the input files and their row counts and cuts the concatenated rows into fixed
slices. Text URL lists (csv, tsv, jsonl, txt) are parsed once at planning into Parquet under
``OUT/_work/input/`` so every shard reads its slice cheaply; malformed rows and invalid UTF-8 are
kept there as rows with a ``reject_reason``, never dropped. Each input file's identity (size,
modification time, hash of its head) is recorded in ``run.json``, and a re-run refuses a changed input.
Every table a reader returns has ``key``, ``url``, ``caption``, ``reject_stage`` and
``reject_reason``, plus the source's other columns (renamed ``source_NAME`` where a name clashes
with a declared column or starts with ``_``, which marks a stage's internal columns).

Images in img2dataset and mmcurate tars are read member by member (seeking by a per-tar index of
the member headers) and checked like downloaded ones (:mod:`mmcurate.shards.image_check`); a member
over ``max_image_bytes`` is rejected as ``too_large`` without being read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.options import bounded
from mmcurate.schemas import BY_NAME, IMAGE_EXTENSIONS, binary_array
from mmcurate.shards.image_check import MAX_PIXELS, check_image
from mmcurate.shards.layout import WORK_INPUT, OutputDir, holds_run, open_parquet, tar_beside
from mmcurate.shards.storage import url_to_fs

logger = logging.getLogger(__name__)
URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
FORMATS = (*URL_LIST_FORMATS, "img2dataset", "mmcurate")
READ_STAGE = "read"
PARSE_CHUNK_ROWS = 100_000  # rows of a text URL list parsed and written at a time
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
# img2dataset columns with a declared counterpart.
_NORMALISED_COLUMNS = {"key", "url", "caption", "reject_stage", "reject_reason"}  # the declared columns of a parsed URL list
_I2D_COLUMNS = ("key", "url", "caption", "width", "height", "original_width", "original_height", "sha256", "status")
HEAD_BYTES = 65536  # the head of an input file that its recorded identity hashes
TAR_INDEXES = 4  # tar indexes a reader keeps (consecutive shards mostly read the same tar)


@dataclass(frozen=True)
class InputSpec:
    """Where the input is and how to read it (column names as img2dataset's url_col/caption_col)."""

    path: str
    format: str | None = None
    url_col: str = "url"
    caption_col: str | None = "caption"
    max_caption_chars: int = bounded(65536, ge=0)
    max_image_bytes: int = bounded(32 * 1024 * 1024, ge=1)  # an img2dataset / mmcurate image over this is too_large, never read
    max_image_pixels: int = bounded(MAX_PIXELS, ge=1)  # decompression-bomb guard for ingested images, from the header

    def __post_init__(self) -> None:
        if not self.path.strip():  # an unset variable: never the current folder
            raise UsageError("the input path is empty")
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
    key_prefix: str = ""  # img2dataset files in a subfolder: its path, so merged runs keep their keys apart


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
    sources: dict[str, list] = field(default_factory=dict)  # identity of each input file, by path relative to the input
    work_fs: fsspec.AbstractFileSystem | None = None  # the output's filesystem, which holds parsed URL lists (``normalised``)
    carried: pa.Schema = field(default_factory=lambda: pa.schema([]))  # the source columns carried through, one type each
    _tar_indexes: OrderedDict[str, tuple[dict[str, TarMember], str | None]] = field(default_factory=OrderedDict, repr=False, compare=False)
    # The last row groups read that hold more rows than their shard: the next shards cut from them take them from here.
    _row_groups: dict[tuple, pa.Table] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_row_groups": {}}  # a copy in another process reads its own

    def read(self, plan: ShardPlan) -> pa.Table:
        """The normalised rows of one shard."""
        tables = [_conform(self._read_piece(self.files[i], start, stop), self.carried) for i, start, stop in plan.pieces]
        return _reject_repeated_keys(pa.concat_tables(tables, promote_options="permissive")) if tables else pa.table({})

    def _read_piece(self, src: SourceFile, start: int, stop: int) -> pa.Table:
        table = _read_rows(self._fs_of(src), src.path, start, stop, self._row_groups)
        if src.format == "img2dataset":
            return self._with_images(_from_img2dataset(table, src, start), src, src.key_prefix)
        if src.format == "mmcurate":
            return self._with_images(_from_mmcurate(table), src)
        if src.format == "normalised":
            return table
        return normalise(table, src.rel, start, self.spec)

    def _fs_of(self, src: SourceFile) -> fsspec.AbstractFileSystem:
        return self.work_fs or self.fs if src.format == "normalised" else self.fs

    def _with_images(self, table: pa.Table, src: SourceFile, prefix: str = "") -> pa.Table:
        """Attach and check the images of the kept rows that should hold one: from the tar beside
        the Parquet (looked up by key less ``prefix``; none where an img2dataset tar is missing), or
        already in an ``image`` column. Each
        image's ``image_format`` is read from its bytes. A row whose image is missing or fails a
        check is rejected at read, its ``status`` set to the reason."""
        kept = [r is None for r in table.column("reject_reason").to_pylist()]
        if src.tar is not None or src.format == "img2dataset":
            # An mmcurate run stores an image only where image_format says so (a run on a URL list stores none).
            stored = table.column("image_format").to_pylist() if "image_format" in table.column_names else [None] * table.num_rows
            wanted = [k and (s is not None or src.format == "img2dataset") for k, s in zip(kept, stored, strict=True)]
            keys = [k[len(prefix) :] for k in table.column("key").to_pylist()]
            images, missing = (
                self._tar_images(src.tar, [k for k, w in zip(keys, wanted, strict=True) if w]) if src.tar else ({}, "image_missing")
            )
        elif "image" in table.column_names:
            data = table.column("image").to_pylist()
            wanted = [k and d is not None for k, d in zip(kept, data, strict=True)]
            keys = [str(row) for row in range(table.num_rows)]  # by row: keys repeat until the shard rejects repeats
            images, missing = {key: self._checked(d) for key, d, w in zip(keys, data, wanted, strict=True) if w}, "image_missing"
        else:
            return table
        good = {k: v for k, v in images.items() if not isinstance(v, str)}
        table = attach_images(table, good, wanted, keys)[0]
        reasons = [_image_reason(images.get(k, missing)) if w else None for k, w in zip(keys, wanted, strict=True)]
        return _reject_at_read(table, reasons, set_status=True)

    def _tar_images(self, tar: str, keys: list[str]) -> tuple[dict[str, tuple[str, bytes] | str], str]:
        """``{key: (image_format, bytes)}`` of the checked images of ``keys`` in ``tar``, a rejection
        reason in place of one that fails a check, and the reason for a key not found."""
        index, error = self._tar_index(tar)
        found: dict[str, tuple[str, bytes] | str] = {}
        try:
            with self.fs.open(tar, "rb") as f:
                for key, member in read_members(f, index, keys, self.spec.max_image_bytes):
                    found[key] = member if isinstance(member, str) else self._checked(member)
        except TAR_ERRORS as e:
            error = error or f"{tar}: not a readable tar ({e})"
        return found, "tar_unreadable" if error else "image_missing"

    def _checked(self, data: bytes) -> tuple[str, bytes] | str:
        """``(image_format, data)``, the format read from the bytes, or the reason the image is rejected."""
        if len(data) > self.spec.max_image_bytes:
            return "too_large"
        ext, reason = check_image(data, self.spec.max_image_pixels)
        return (ext, data) if ext else reason

    def _tar_index(self, tar: str) -> tuple[dict[str, TarMember], str | None]:
        if tar not in self._tar_indexes:
            try:
                with self.fs.open(tar, "rb") as f:
                    self._tar_indexes[tar] = index_tar(f, tar)
            except OSError as e:
                self._tar_indexes[tar] = ({}, f"{tar}: cannot read ({e})")
            if self._tar_indexes[tar][1] is not None:
                logger.warning("%s; its rows without an image are rejected as tar_unreadable", self._tar_indexes[tar][1])
            while len(self._tar_indexes) > TAR_INDEXES:
                self._tar_indexes.popitem(last=False)
        self._tar_indexes.move_to_end(tar)
        return self._tar_indexes[tar]


def plan_input(spec: InputSpec, rows_per_shard: int, out: OutputDir, recorded: dict[str, list] | None = None) -> Reader:
    """List the input, parse text URL lists into ``OUT/_work/input`` and cut rows into shards.

    ``recorded``: the input's identities (:attr:`Reader.sources`) as the run in ``out`` recorded them; an
    input that differs is refused, and URL lists parsed under that record are reused.
    """
    if rows_per_shard < 1:
        raise UsageError("output rows_per_shard must be at least 1")
    fs, root = url_to_fs(spec.path)
    fmt, paths = _discover(fs, root.rstrip("/"), spec.format, out.root)
    base = _key_base(fs, root.rstrip("/"))
    rels = [path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1] for path in paths]
    tars = {path: _tar_of(fs, path, fmt) for path in paths}
    sources = _input_sources(fs, dict(zip(rels, paths, strict=True)), tars)
    if recorded is not None:
        _check_unchanged(recorded, sources, out.root)
    reuse = recorded is not None
    files = [
        _source_file(fs, path, rel, fmt, spec, out, i, reuse, tars[path]) for i, (path, rel) in enumerate(zip(paths, rels, strict=True))
    ]
    reader = Reader(spec, fs, files, fmt, sources=sources, work_fs=out.fs)
    reader.shards = _cut(files, rows_per_shard)
    if fmt != "mmcurate":  # an mmcurate run's files share its schema
        declared = {"parquet": {spec.url_col, spec.caption_col}, "img2dataset": set(_I2D_COLUMNS)}.get(fmt, _NORMALISED_COLUMNS)
        schemas = {src.rel: _read_rows(reader._fs_of(src), src.path, 0, 0).schema for src in files}
        reader.carried = pa.schema([(source_name(name), kind) for name, kind in _unify_carried(schemas, declared).items()])
    return reader


def _input_sources(fs, paths: dict[str, str], tars: dict[str, str | None]) -> dict[str, list]:
    """``[size, modification time, sha256 of the first HEAD_BYTES]`` of every input file (and of
    its tar, ``tars`` by path), by path relative to the input. The heads are read in one batch
    (concurrently on remote filesystems)."""
    paths = {**paths, **{rel[: -len(".parquet")] + ".tar": tars[path] for rel, path in paths.items() if tars[path] is not None}}
    files = list(paths.values())
    try:
        infos = [fs.info(path) for path in files]
        heads = fs.cat_ranges(files, [0] * len(files), [HEAD_BYTES] * len(files), on_error="raise")
    except OSError as e:
        raise UsageError(f"cannot read the input: {e}") from None
    sources = {}
    for rel, info, head in zip(paths, infos, heads, strict=True):
        modified = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated") if info.get(k) is not None), None)
        sources[rel] = [info["size"], None if modified is None else str(modified), hashlib.sha256(head).hexdigest()]
    return sources


def _check_unchanged(before: dict[str, list], now: dict[str, list], output: str) -> None:
    """Refuse an input whose files differ from those the run in ``output`` recorded (finished or not)."""
    changed = sorted(set(before) ^ set(now)) or sorted(rel for rel in now if before[rel] != now[rel])
    if changed:
        what = "added or removed" if set(before) != set(now) else "changed"
        raise UsageError(
            f"input file {changed[0]} was {what} since the run in {output} started (its output would mix inputs); use a new output folder"
        )


def _key_base(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The folder that keys' relative paths start from: the input folder, a file's folder, or a
    glob's folder before its first wildcard (so ``a/x.csv`` and ``b/x.csv`` get different keys)."""
    if _is_glob(fs, root):
        parts = root.split("/")
        return "/".join(parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))])
    return root if fs.isdir(root) else root.rsplit("/", 1)[0]


def _discover(fs: fsspec.AbstractFileSystem, root: str, fmt: str | None, output: str) -> tuple[str, list[str]]:
    """The input format and files. Hidden and ``_`` files and folders, and the output folder (which
    may lie inside the input folder), are no input."""
    if _is_glob(fs, root):
        paths = sorted(p for p in fs.glob(root) if not _within(p, output))
        if not paths:
            raise UsageError(f"no files match {root!r}")
    elif fs.isdir(root):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        if fmt in (None, "mmcurate") and holds_run(names):
            out = OutputDir.at(fs, root)
            out.check_whole()
            return "mmcurate", out.kept_files()
        paths = sorted(p for p in fs.find(root) if not _within(p, output) and not _hidden(p[len(root) + 1 :]))
        if fmt in (None, "img2dataset"):
            tars = {p for p in paths if p.endswith(".tar")}
            parquets = [p for p in paths if p.endswith(".parquet")]
            if fmt == "img2dataset" or any(p[: -len(".parquet")] + ".tar" in tars for p in parquets):
                _check_tars_paired(tars, parquets)
                fmt, paths = "img2dataset", parquets
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


def _check_tars_paired(tars: set[str], parquets: list[str]) -> None:
    """Refuse an img2dataset folder holding a tar without its Parquet file (which lists the tar's
    rows and the failed downloads; img2dataset writes one beside every tar)."""
    alone = sorted(tars - {p[: -len(".parquet")] + ".tar" for p in parquets})
    if alone:
        raise UsageError(
            f"{alone[0]}: an img2dataset tar without its Parquet file {alone[0][: -len('.tar')]}.parquet; restore it or move the tar out"
        )


def _is_glob(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether the input path is a pattern: it holds ``*``, ``?`` or ``[`` and names no file or folder
    (``in/a[1].csv`` that exists is that file)."""
    return any(c in root for c in "*?[") and not fs.exists(root)


def _hidden(rel: str) -> bool:
    """Whether a path below the input folder lies in (or is) a file or folder named ``.*`` or ``_*``."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _source_file(
    fs, path: str, rel: str, fmt: str, spec: InputSpec, out: OutputDir, index: int, reuse: bool, tar: str | None
) -> SourceFile:
    if fmt == "img2dataset":
        _check_img2dataset(_read_rows(fs, path, 0, 0).schema, path)
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        prefix = folder.replace("/", "_").replace(".", "_") + "_" if folder else ""
        return SourceFile(path, rel, _parquet_rows(fs, path), fmt, tar=tar, key_prefix=prefix)
    if fmt == "mmcurate":
        return SourceFile(path, rel, _parquet_rows(fs, path), fmt, tar=tar)
    if fmt == "parquet":
        table = _read_rows(fs, path, 0, 0)
        _check_columns(table.column_names, spec, path)
        return SourceFile(path, rel, _parquet_rows(fs, path), fmt)
    # Text URL list: parse once into Parquet with keys and read-time rejections.
    target = out.work_path(WORK_INPUT, f"{index:05d}.parquet")
    if not (reuse and out.exists(target)):
        out.write_parquet_stream(target, _normalised_chunks(parse_text(fs, path, fmt, spec), rel, spec))
    return SourceFile(target, rel, _parquet_rows(out.fs, target), "normalised")


def _tar_of(fs, path: str, fmt: str) -> str | None:
    """The tar that holds the images of an img2dataset or mmcurate Parquet file: None for other
    formats, for an mmcurate Parquet shard (which holds its images) and where an img2dataset tar is
    missing (its rows' images are then ``image_missing``)."""
    if fmt == "mmcurate":
        return tar_beside(path)
    tar = path[: -len(".parquet")] + ".tar"
    return tar if fmt == "img2dataset" and fs.exists(tar) else None


def _normalised_chunks(chunks: Iterable[tuple[pa.Table, pa.Array]], rel: str, spec: InputSpec) -> Iterator[pa.Table]:
    start = 0
    for chunk, reasons in chunks:
        yield normalise(chunk, rel, start, spec, reasons)
        start += chunk.num_rows


def _parquet_rows(fs, path: str) -> int:
    try:
        with open_parquet(fs, path) as pf:
            return pf.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _read_rows(fs, path: str, start: int, stop: int, cache: dict[tuple, pa.Table] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them; row groups
    with more rows than that stay in ``cache`` (one entry) for the next rows."""
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
            key = (path, tuple(groups))
            table = cache.get(key) if cache is not None else None
            if table is None:
                table = pf.read_row_groups(groups)
                if cache is not None and table.num_rows > stop - start:
                    cache.clear()
                    cache[key] = table
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    return table.slice(start - first, stop - start)


def _unify_carried(schemas: dict[str, pa.Schema], declared: set[str | None]) -> dict[str, pa.DataType]:
    """One type per source column carried through (those not in ``declared``) that every file's
    values cast to unchanged (int32 and int64 as int64, a column of nulls as the others' type), in
    order of first appearance; two types without one such (int and text, int64 and uint64) are
    refused, naming the column and the files (``schemas`` by path relative to the input)."""
    found: dict[str, pa.DataType] = {}
    for rel, schema in schemas.items():
        for name, kind in zip(schema.names, schema.types, strict=True):
            if name in declared:
                continue
            now = found.setdefault(name, kind)
            try:
                wider = (
                    pa.unify_schemas([pa.schema([(name, now)]), pa.schema([(name, kind)])], promote_options="permissive").field(name).type
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                wider = None
            if wider is None or not (_widens(now, wider) and _widens(kind, wider)):
                other = next(r for r, sch in schemas.items() if name in sch.names and sch.field(name).type != kind)
                raise UsageError(
                    f"column {name!r} holds {schemas[other].field(name).type} in {other} but {kind} in {rel}, and no one type holds both "
                    "without loss; store it as one type in every input file"
                )
            found[name] = wider
    return found


def _widens(kind: pa.DataType, wider: pa.DataType) -> bool:
    """Whether every value of type ``kind`` casts to ``wider`` unchanged."""
    t = pa.types
    if kind == wider or t.is_null(kind):
        return True
    if t.is_integer(kind) and t.is_integer(wider):
        if t.is_signed_integer(kind) and t.is_unsigned_integer(wider):
            return False
        return wider.bit_width > kind.bit_width or (
            wider.bit_width == kind.bit_width and t.is_signed_integer(kind) == t.is_signed_integer(wider)
        )
    if t.is_integer(kind) and t.is_floating(wider):
        return kind.bit_width < {16: 11, 32: 24, 64: 53}[wider.bit_width]  # bits of the float's mantissa
    if t.is_floating(kind) and t.is_floating(wider):
        return wider.bit_width >= kind.bit_width
    text, data = (t.is_string, t.is_large_string), (t.is_binary, t.is_large_binary)
    return any(any(f(kind) for f in group) and any(f(wider) for f in group) for group in (text, data))


def _conform(table: pa.Table, carried: pa.Schema) -> pa.Table:
    """A reader's ``table`` with the source columns of ``carried`` in its order before
    ``reject_stage``, cast to its types (nulls where ``table`` lacks one), so every shard has one schema."""
    if not carried.names:
        return table
    own = [name for name in table.column_names if name not in carried.names]
    at = own.index("reject_stage")
    names = [*own[:at], *carried.names, *own[at:]]
    kinds = dict(zip(carried.names, carried.types, strict=True))

    def column(name: str) -> pa.ChunkedArray | pa.Array:
        if name not in kinds:
            return table.column(name)
        return table.column(name).cast(kinds[name]) if name in table.column_names else pa.nulls(table.num_rows, kinds[name])

    return pa.table([column(name) for name in names], names=names)


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
    _check_names(columns, {spec.url_col: "url", spec.caption_col: "caption"}, path)


def _check_names(columns: list[str], declared: dict[str | None, str], path: str) -> None:
    """Refuse a column name given twice, and two source columns that would get one output name
    (``declared`` maps the columns taken as declared ones to their names)."""
    twice = [name for name, n in Counter(columns).items() if n > 1]
    if twice:
        raise UsageError(f"{path}: column {twice[0]!r} appears twice; name each column once")
    names = Counter(declared.get(name) or source_name(name) for name in columns)
    clash = [name for name, n in names.items() if n > 1]
    if clash:
        raise UsageError(f"{path}: two columns would both be stored as {clash[0]!r} (declared names are renamed source_NAME); rename one")


def parse_text(fs, path: str, fmt: str, spec: InputSpec) -> Iterator[tuple[pa.Table, pa.Array]]:
    """Parse a csv/tsv/jsonl/txt URL list, streaming, into tables of at most ``PARSE_CHUNK_ROWS``
    rows of the file's columns as strings, each with its rows' read-time rejection reasons
    (malformed rows, invalid UTF-8)."""
    header = _jsonl_header(fs, path) if fmt == "jsonl" else None
    chunk: list[list[str | None]] = []
    reasons: list[str | None] = []
    with _open_text(fs, path) as text:
        if fmt == "txt":
            header, records = [spec.url_col], (([line.strip()], None) for line in text if line.strip())
        elif fmt == "jsonl":
            records = _jsonl_records(text, header)
        else:
            records = _csv_records(text, "\t" if fmt == "tsv" else ",")
            header, reason = next(records, (None, None))
            if header is None:
                raise UsageError(f"{path}: empty file, no header row")
            if reason is not None or any(_has_bad_utf8(name) for name in header):
                raise UsageError(f"{path}: the header row is malformed (a quote left open, or bytes that are not UTF-8)")
        _check_columns(header, spec, path)
        for record, reason in records:
            if len(record) != len(header):
                reason = reason or "malformed_row"
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


def _string_table(header: list[str], rows: list[list[str | None]], reasons: list[str | None]) -> tuple[pa.Table, pa.Array]:
    columns = {name: pa.array([row[i] for row in rows], pa.string()) for i, name in enumerate(header)}
    return pa.table(columns), pa.array(reasons, pa.string())


class _Lines:
    """The lines of a text, one at a time, with those taken since :meth:`mark`; lines put back are
    taken again first."""

    def __init__(self, text: Iterable[str]) -> None:
        self._text = iter(text)
        self._back: list[str] = []
        self.taken: list[str] = []
        self.ran_out = False  # asked for a line past the end since :meth:`mark`

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._back:
            line = self._back.pop()
        else:
            try:
                line = next(self._text)
            except StopIteration:
                self.ran_out = True
                raise
        self.taken.append(line)
        return line

    def mark(self) -> None:
        self.taken, self.ran_out = [], False

    def put_back(self, lines: list[str]) -> None:
        self._back.extend(reversed(lines))


def _csv_records(text: Iterable[str], delimiter: str) -> Iterator[tuple[list[str], str | None]]:
    """Each record of a csv/tsv file, the header first, with its rejection reason (None if none).

    A quoted field may hold line breaks, as CSV allows. A quote that is never closed (the file ends
    inside it), or a record over several lines that breaks the quoting rules or holds another number
    of fields than the header, is a quote left open that swallowed the lines after it: its first
    line alone becomes a ``malformed_row`` and the lines after it are read again as rows of their
    own. A quoting error within one line (``"a" b``) is read leniently, as Python's csv does.
    """
    # Let a field be as long as it is: huge captions are rejected by max_caption_chars, as rows, not
    # by the csv module's 128 KiB default, which would stop the file.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    lines = _Lines(text)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    width = None
    while True:
        lines.mark()
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error:
            record = None
        spans = len(lines.taken) > 1
        # Broken: an error over several lines, the file ending inside a quote, or a field count that lines merged by a quote changed.
        broken = (spans or lines.ran_out) if record is None else spans and width is not None and len(record) != width
        if broken:
            lines.put_back(lines.taken[1:])
        if record is None or broken:
            record = next(csv.reader(lines.taken[:1], delimiter=delimiter))
        width = len(record) if width is None else width
        yield record, "malformed_row" if broken else None


def _jsonl_header(fs, path: str) -> list[str]:
    """Every key of every object in a jsonl file, in order of first appearance (a first pass); a key
    that is not valid UTF-8 is no column (its row is rejected as ``invalid_utf8``)."""
    header: dict[str, None] = {}
    with _open_text(fs, path) as text:
        for line in text:
            try:
                obj = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(obj, dict):
                header.update((key, None) for key in obj if not _has_bad_utf8(key))
    return list(header)


def _jsonl_records(text: Iterable[str], names: list[str]) -> Iterator[tuple[list[str | None], str | None]]:
    """Per non-blank line: its values under ``names`` and its rejection reason (``malformed_row`` for a
    line that is no object, ``invalid_utf8`` for an object with a key that is not valid UTF-8)."""

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
        if not isinstance(obj, dict):
            yield [None] * len(names), "malformed_row"
        else:
            yield [cell(obj.get(n)) for n in names], "invalid_utf8" if any(_has_bad_utf8(key) for key in obj) else None


# Any surrogate: a byte that is not UTF-8 (kept by surrogateescape as U+DC80..U+DCFF) or a lone
# surrogate written as a JSON escape ("\\ud800"), which no UTF-8 text can hold.
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _has_bad_utf8(value: str) -> bool:
    return _SURROGATE.search(value) is not None


def _repair(value: str) -> str:
    """``value`` with U+FFFD for each invalid byte sequence and lone surrogate."""
    return _LONE_SURROGATE.sub("\ufffd", value).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def sample_key(rel: str, row: int) -> str:
    """The deterministic key of row ``row`` of input file ``rel``: 16 hex digits, no dots."""
    return hashlib.sha256(f"{rel}\0{row}".encode()).hexdigest()[:16]


def normalise(table: pa.Table, rel: str, start: int, spec: InputSpec, reasons: pa.Array | None = None) -> pa.Table:
    """Rename url/caption columns, add keys and read-time rejections (``reasons``: those found while
    parsing); carry other columns through, a reserved name as ``source_NAME``."""
    n = table.num_rows
    reasons = pa.nulls(n, pa.string()) if reasons is None else reasons
    url, bad_url = _as_string(table.column(spec.url_col))
    has_caption = spec.caption_col is not None and spec.caption_col in table.column_names
    caption, bad_caption = _as_string(table.column(spec.caption_col)) if has_caption else (pa.nulls(n, pa.string()), [False] * n)
    out = {
        "key": pa.array([sample_key(rel, start + i) for i in range(n)], pa.string()),
        "url": url,
        "caption": caption,
    }
    taken = {spec.url_col, spec.caption_col}
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
        text = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
        return pa.chunked_array([pa.array(text, pa.string())]), clean


# ---------------------------------------------------------------------------------------------
# Tars: img2dataset and mmcurate WebDataset output


TAR_ERRORS = (tarfile.TarError, OSError, EOFError)


def _member_name(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(key, extension)`` of a regular-file member: the key is the file name up to its first dot
    (webdataset's rule). None for links, devices, sparse files and absolute or ``..`` paths."""
    parts = member.name.split("/")
    if not member.isfile() or member.issparse() or member.name.startswith("/") or ".." in parts:
        return None
    key, _, ext = parts[-1].partition(".")
    return key, ext


def image_extension(ext: str) -> str | None:
    """The image format an extension names (``jpeg`` as ``jpg``), None for no image."""
    ext = "jpg" if ext.lower() == "jpeg" else ext.lower()
    return ext if ext in IMAGE_EXTENSIONS else None


def tar_members(fileobj, read: Callable[[str], bool]) -> Iterator[tuple[str, str, bytes | None]]:
    """``(key, extension, bytes)`` of the regular-file members of a tar, in order, streamed;
    bytes are read only for the extensions ``read`` accepts (None otherwise). Links, devices and
    members with absolute or ``..`` paths are skipped, and nothing is extracted to disk, so no tar
    can write anywhere. A corrupt or truncated tar raises one of ``TAR_ERRORS``."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            name = _member_name(member)
            if name is not None:
                yield name[0], name[1], tar.extractfile(member).read() if read(name[1]) else None
            tar.members = []  # tarfile would keep every header read: memory in step with the tar's length


@dataclass(frozen=True)
class TarMember:
    """Where the bytes of an image member lie in its tar."""

    offset: int
    size: int


def index_tar(fileobj, name: str) -> tuple[dict[str, TarMember], str | None]:
    """The image members of an uncompressed tar by key, from the member headers alone (``tarfile``
    seeks over the data), and the error that stopped a corrupt or truncated tar (None when it was
    read to the end)."""
    index: dict[str, TarMember] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                found = _member_name(member)
                if found and image_extension(found[1]) is not None:
                    index[found[0]] = TarMember(member.offset_data, member.size)
    except TAR_ERRORS as e:
        return index, f"{name}: not a readable tar ({e})"
    return index, None


def read_members(fileobj, index: dict[str, TarMember], keys: Iterable[str], max_bytes: int) -> Iterator[tuple[str, bytes | str]]:
    """``(key, bytes)`` of the members of ``keys`` that ``index`` lists, in tar order,
    or ``(key, "too_large")`` for one over ``max_bytes``, which is not read. A member cut short by
    the end of the file is left out."""
    for key in sorted({k for k in keys if k in index}, key=lambda k: index[k].offset):
        member = index[key]
        if member.size > max_bytes:
            yield key, "too_large"
            continue
        fileobj.seek(member.offset)
        data = fileobj.read(member.size)
        if len(data) == member.size:
            yield key, data


def attach_images(
    table: pa.Table, images: dict[str, tuple[str, bytes]], wanted: list[bool], keys: list[str] | None = None
) -> tuple[pa.Table, list[bool]]:
    """Replace ``image``/``image_format`` from ``images`` where ``wanted``, looked up by ``keys``
    (default: the ``key`` column); also return, per row, whether a wanted image was missing."""
    keys = table.column("key").to_pylist() if keys is None else keys
    found = [images.get(k) if want else None for k, want in zip(keys, wanted, strict=True)]
    table = table.drop_columns([c for c in ("image", "image_format") if c in table.column_names])
    table = table.append_column("image", binary_array([f[1] if f else None for f in found]))
    table = table.append_column("image_format", pa.array([f[0] if f else None for f in found], pa.string()))
    return table, [want and f is None for want, f in zip(wanted, found, strict=True)]


def _image_reason(found: tuple[str, bytes] | str) -> str | None:
    """The rejection reason of a looked-up image: None for an image, else the reason given."""
    return found if isinstance(found, str) else None


def _reject_at_read(table: pa.Table, reasons: list[str | None], set_status: bool = False) -> pa.Table:
    """Reject at read the rows not yet rejected that have a reason; with ``set_status`` the reason
    also becomes their ``status`` (as for a failed download)."""
    given = pa.array(reasons, pa.string())
    fresh = pc.and_(pc.is_valid(given), pc.is_null(table.column("reject_reason")))
    if not pc.any(fresh).as_py():
        return table
    updates = {"reject_reason": given, "reject_stage": pa.scalar(READ_STAGE)}
    if set_status and "status" in table.column_names:
        updates["status"] = given
    for name, value in updates.items():
        index = table.column_names.index(name)
        table = table.set_column(index, name, pc.if_else(fresh, value, table.column(index)))
    return table


def _reject_repeated_keys(table: pa.Table) -> pa.Table:
    """Reject as ``duplicate_key`` every row whose key an earlier row of the shard holds, so no
    output file holds one key twice."""
    keys = table.column("key").to_pylist()
    if len(set(keys)) == len(keys):
        return table
    seen: set[str] = set()
    reasons = []
    for key in keys:
        reasons.append("duplicate_key" if key in seen else None)
        seen.add(key)
    return _reject_at_read(table, reasons)


def _check_img2dataset(schema: pa.Schema, path: str) -> None:
    """Refuse an img2dataset Parquet file without keys, or with a declared column of the wrong kind."""
    _check_names(schema.names, {name: name for name in _I2D_COLUMNS}, path)
    if "key" not in schema.names:
        raise UsageError(f"{path}: no key column, so not an img2dataset output (to read it as a URL list, set input format parquet)")
    for name in _I2D_COLUMNS:
        found = schema.field(name).type if name in schema.names else pa.null()
        numeric = pa.types.is_integer(BY_NAME[name].type)
        if numeric:
            fits = pa.types.is_integer(found) or pa.types.is_floating(found)
        else:
            fits = pa.types.is_string(found) or pa.types.is_large_string(found)
        if not (fits or pa.types.is_null(found)):
            raise UsageError(f"{path}: column {name!r} holds {found}, not {'numbers' if numeric else 'text'}")


def _as_declared(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """An img2dataset column as its declared type; a size that is NaN (pandas' missing value) or
    out of range becomes null."""
    target = BY_NAME[name].type
    if not pa.types.is_integer(target) or pa.types.is_null(column.type):
        return column.cast(target)
    values = column.cast(pa.float64())
    fits = pc.and_(pc.is_finite(values), pc.less_equal(pc.abs(values), 2**31 - 1))
    return pc.if_else(fits, values, pa.scalar(None, pa.float64())).cast(target, safe=False)


def _from_img2dataset(table: pa.Table, src: SourceFile, start: int) -> pa.Table:
    """img2dataset rows: failed downloads are rejected as ``not_downloaded``; keys are kept (dots
    replaced) behind the file's key prefix (a missing key becomes mmcurate's own)."""
    status = table.column("status").to_pylist() if "status" in table.column_names else ["success"] * table.num_rows
    ok = [s == "success" for s in status]
    keep = {c: table.column(c) for c in table.column_names}
    out = {name: _as_declared(keep.pop(name), name) for name in _I2D_COLUMNS if name in keep}
    keys = [k.replace(".", "_") if k else sample_key(src.rel, start + i) for i, k in enumerate(out["key"].to_pylist())]
    out["key"] = pa.array([src.key_prefix + k for k in keys], pa.string())
    errors = keep["error_message"].to_pylist() if "error_message" in keep else [None] * table.num_rows
    statuses = ["ok" if good else (err or s or "failed") for good, s, err in zip(ok, status, errors, strict=True)]
    out["status"] = pa.array(statuses, pa.string())
    out.update({source_name(k): v for k, v in keep.items()})
    reasons = pa.array([None if good else "not_downloaded" for good in ok], pa.string())
    out["reject_stage"] = pc.if_else(pc.is_null(reasons), pa.scalar(None, pa.string()), READ_STAGE)
    out["reject_reason"] = reasons
    return pa.table(out)


def _from_mmcurate(table: pa.Table) -> pa.Table:
    """Kept rows of an earlier mmcurate run; their images are attached by the reader."""
    table = table.drop_columns([c for c in ("reject_stage", "reject_reason") if c in table.column_names])
    table = table.append_column("reject_stage", pa.nulls(table.num_rows, pa.string()))
    return table.append_column("reject_reason", pa.nulls(table.num_rows, pa.string()))
