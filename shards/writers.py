"""Writers: one finished shard to its output, rejects, stats and done marker, every file atomic.

Each output format is a :class:`ShardWriter` subclass registered in :data:`WRITERS` by its ``name``
(the ``output.format`` option): a new format is a new class, not another branch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.spec import AbstractFileSystem

from mmcurate.errors import UsageError
from mmcurate.options import bounded
from mmcurate.schemas import CAPTION_EXTENSION, IMAGE_EXTENSIONS, JSON_EXTENSION, NOT_IN_JSON, conform
from mmcurate.shards import jsontext
from mmcurate.shards.layout import SHARDS, OutputDir, open_parquet, reading
from mmcurate.shards.readers import TAR_ERRORS, attach_images, image_extension, tar_members

READ_ROWS = 64  # rows per batch when a shard is read back
TAR_ROWS = 256  # rows whose tar members are built at a time when a shard is written


class ShardWriter:
    """How one output format writes a shard's kept rows, and reads them back (the ledger files are
    common to all)."""

    name: ClassVar[str]
    shard_ext: ClassVar[str]  # the extension of its file in ``shards/``

    def write(self, out: OutputDir, shard_id: int, kept: pa.Table) -> None:
        raise NotImplementedError

    def batches(self, out: OutputDir, shard_id: int, rows: int = READ_ROWS) -> Iterator[pa.Table]:
        """The shard's kept rows as written, images included, streamed ``rows`` at a time (at least
        one table, empty for a shard without rows)."""
        raise NotImplementedError

    def read(self, out: OutputDir, shard_id: int) -> pa.Table:
        """The shard's kept rows as written, images included, in one table."""
        return pa.concat_tables(self.batches(out, shard_id))

    def schema(self, out: OutputDir, shard_id: int) -> pa.Schema:
        """The schema of the shard's :meth:`batches`, read from the file metadata."""
        raise NotImplementedError


class WebDatasetWriter(ShardWriter):
    """``shards/ID.tar`` (per sample ``KEY.<image_format>``, ``KEY.txt``, ``KEY.json``) and
    ``meta/ID.parquet`` (every column but the image bytes), in the same row order: reading back
    streams both side by side, member by member."""

    name = "webdataset"
    shard_ext = ".tar"

    def write(self, out: OutputDir, shard_id: int, kept: pa.Table) -> None:
        with out.open_atomic(out.tar_path(shard_id)) as f:
            write_tar(f, kept)
        out.write_parquet(out.meta_path(shard_id), _drop(kept, "image"))

    def batches(self, out: OutputDir, shard_id: int, rows: int = READ_ROWS) -> Iterator[pa.Table]:
        tar, meta = out.tar_path(shard_id), out.meta_path(shard_id)
        position = {key: i for i, key in enumerate(out.read_parquet(meta, ["key"]).column("key").to_pylist())}
        with out.fs.open(tar, "rb") as f:
            members = _tar_images(f, tar)
            held: list[tuple[str, tuple[str, bytes] | None]] = []
            start = 0
            for batch in parquet_batches(out.fs, meta, rows):
                end = start + batch.num_rows
                images: dict[str, tuple[str, bytes]] = {}
                pending, held = itertools.chain(held, members), []
                for key, image in pending:
                    at = position.get(key, -1)
                    if at >= end:  # the next batch's member: the tar is in row order
                        held = [(key, image)]
                        break
                    if at >= start and image is not None:
                        images[key] = image
                yield attach_images(batch, images, [True] * batch.num_rows)[0]
                start = end

    def schema(self, out: OutputDir, shard_id: int) -> pa.Schema:
        return attach_images(out.parquet_schema(out.meta_path(shard_id)).empty_table(), {}, [])[0].schema


class ParquetWriter(ShardWriter):
    """``shards/ID.parquet``: every column, image bytes included, in row groups of about
    ``row_group_bytes`` (a reader streams the shard one row group at a time)."""

    name = "parquet"
    shard_ext = ".parquet"
    row_group_bytes: ClassVar[int] = 16 << 20

    def write(self, out: OutputDir, shard_id: int, kept: pa.Table) -> None:
        rows = max(1, self.row_group_bytes * kept.num_rows // max(kept.nbytes, 1))
        out.write_parquet(out.parquet_path(shard_id), kept, row_group_rows=rows)

    def batches(self, out: OutputDir, shard_id: int, rows: int = READ_ROWS) -> Iterator[pa.Table]:
        return parquet_batches(out.fs, out.parquet_path(shard_id), rows)

    def schema(self, out: OutputDir, shard_id: int) -> pa.Schema:
        return out.parquet_schema(out.parquet_path(shard_id))


def parquet_batches(fs: AbstractFileSystem, path: str, rows: int) -> Iterator[pa.Table]:
    """A Parquet file ``rows`` at a time, streamed (one empty table for a file without rows); UsageError
    naming a missing or damaged file."""
    with reading(fs, path), open_parquet(fs, path, stream=True) as pf:
        if pf.metadata.num_rows == 0:
            yield pf.schema_arrow.empty_table()
        for batch in pf.iter_batches(batch_size=rows):
            yield pa.Table.from_batches([batch])


def _tar_images(fileobj: BinaryIO, name: str) -> Iterator[tuple[str, tuple[str, bytes] | None]]:
    """``(key, (image_format, bytes))`` per image member of a tar and ``(key, None)`` per other member,
    in tar order, streamed; UsageError for a corrupt or truncated tar."""
    try:
        for key, ext, data in tar_members(fileobj, lambda ext: image_extension(ext) is not None):
            yield key, None if data is None else (image_extension(ext), data)
    except TAR_ERRORS as e:
        raise UsageError(f"{name}: not a readable tar ({e})") from None


WRITERS: dict[str, type[ShardWriter]] = {cls.name: cls for cls in (WebDatasetWriter, ParquetWriter)}


def written_by(out: OutputDir, shard_id: int) -> ShardWriter:
    """The writer of a finished shard, found by its file in ``shards/``."""
    for cls in WRITERS.values():
        if out.exists(out.shard_path(SHARDS, shard_id, cls.shard_ext)):
            return cls()
    raise UsageError(f"{out.root}: shard {shard_id} has no file in {SHARDS}/")


@dataclass(frozen=True)
class OutputSpec:
    """Where and how to write. ``format`` names a writer of :data:`WRITERS`; unset, it is
    ``webdataset`` when the rows carry images and ``parquet`` when they do not (see :meth:`resolved`)."""

    path: str
    format: str | None = None
    rows_per_shard: int = bounded(10_000, ge=1)
    save_rejected_images: bool = False

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in WRITERS:
            raise UsageError(f"output format must be one of {', '.join(WRITERS)}, not {self.format!r}")

    def resolved(self, carries_images: bool) -> OutputSpec:
        """This spec with its format set: as given, else by whether the rows carry images."""
        if self.format is not None:
            return self
        return dataclasses.replace(self, format="webdataset" if carries_images else "parquet")

    def writer(self) -> ShardWriter:
        if self.format is None:
            raise ValueError("the output format is not resolved yet (OutputSpec.resolved)")
        return WRITERS[self.format]()


def split_kept(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept rows, rejected rows) by ``reject_reason``; the table itself, not a copy, for a side that holds every row."""
    rejected = pc.is_valid(table.column("reject_reason"))
    count = pc.sum(rejected).as_py() or 0
    if count in (0, table.num_rows):
        return (table, table.slice(0, 0)) if count == 0 else (table.slice(0, 0), table)
    return table.filter(pc.invert(rejected)), table.filter(rejected)


def write_shard(out: OutputDir, spec: OutputSpec, shard_id: int, table: pa.Table, columns: list[str], stats: dict) -> None:
    """Write every file of a finished shard, the done marker last."""
    table = conform(table, columns)
    kept, rejected = split_kept(table)
    spec.writer().write(out, shard_id, kept)
    if not spec.save_rejected_images:
        rejected = _drop(rejected, "image")
    out.write_parquet(out.rejects_path(shard_id), rejected)
    out.write_json(out.stats_path(shard_id), stats)
    out.mark_done(shard_id)


def _drop(table: pa.Table, column: str) -> pa.Table:
    return table.drop_columns([column]) if column in table.column_names else table


# ---------------------------------------------------------------------------------------------
# WebDataset tars, built column-wise: JSON members with Arrow compute, tar headers with numpy.

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads an archive to whole records
# A USTAR header as Python's tarfile (3.11+) writes it for a regular file with mode 0644, uid/gid 0, mtime 0;
# per member only the name (bytes 0-100), the size (124-136) and the checksum (148-156) change.
_TEMPLATE = np.frombuffer(
    b"\0" * 100  # name
    + b"0000644\0"  # mode
    + b"0000000\0" * 2  # uid, gid
    + b"\0" * 12  # size
    + b"00000000000\0"  # mtime
    + b" " * 8  # checksum, counted as spaces
    + b"0"  # regular file
    + b"\0" * 100  # link name
    + b"ustar\x0000"  # magic and version
    + b"\0" * 247,  # user and group names, device numbers, name prefix, padding
    np.uint8,
)
_OCTAL = np.array([8**i for i in range(10, -1, -1)], np.int64)


def tar_bytes(table: pa.Table) -> memoryview:
    """A WebDataset tar: per sample ``KEY.<image_format>`` (when there is an image), ``KEY.txt`` and
    ``KEY.json`` (every column but key, image and caption), in row order; a view of the blocks it
    was built in (a shard's images are not copied once more).

    The bytes are those Python's tarfile writes (USTAR, mode 0644, mtime 0), so the same rows give
    the same tar; names longer than USTAR's 100 bytes are refused, as tarfile refuses them.
    """
    return _blocks(table, 0).data


def write_tar(f: BinaryIO, table: pa.Table, rows: int = TAR_ROWS) -> None:
    """Write :func:`tar_bytes` of ``table`` to ``f``, its members built ``rows`` rows at a time: the
    blocks of a few MB that come and go are reused, where one buffer the size of the shard is new
    memory each time (a 160 MB shard: 0.1-0.4 s of page faults)."""
    starts = list(range(0, table.num_rows, rows)) or [0]
    written = 0
    for start in starts[:-1]:
        part = _blocks(table.slice(start, rows), None)
        f.write(part.data)
        written += len(part) // _BLOCK
    f.write(_blocks(table.slice(starts[-1]), written).data)


def _blocks(table: pa.Table, end: int | None) -> np.ndarray:
    """The tar blocks of the rows' members, in row order; with the archive's end (two zero blocks,
    padded to a whole record after ``end`` blocks written before), or without (``end`` None)."""
    n = table.num_rows
    keys = table.column("key")
    kinds = []  # per member kind: (names, payloads), one row per sample; a null name: no member
    if "image" in table.column_names:
        image = table.column("image")
        fmt = table.column("image_format") if "image_format" in table.column_names else pa.nulls(n, pa.string())
        ext = pc.if_else(pc.fill_null(pc.is_in(fmt, pa.array(IMAGE_EXTENSIONS)), False), fmt, "jpg")
        kinds.append((pc.if_else(pc.is_valid(image), pc.binary_join_element_wise(keys, ext, "."), pa.scalar(None, pa.string())), image))
    caption = table.column("caption") if "caption" in table.column_names else pa.nulls(n, pa.string())
    kinds.append((pc.binary_join_element_wise(keys, CAPTION_EXTENSION, "."), pc.fill_null(pc.cast(caption, pa.string()), "")))
    kinds.append((pc.binary_join_element_wise(keys, JSON_EXTENSION, "."), json_rows(table)))
    present = np.stack([np.asarray(pc.is_valid(names), bool) for names, _ in kinds], axis=1)  # per sample and kind
    sizes = np.stack([pc.fill_null(pc.binary_length(data), 0).to_numpy() for _, data in kinds], axis=1).astype(np.int64) * present
    member_blocks = present * (1 + (sizes + _BLOCK - 1) // _BLOCK)  # a header, then the data padded to whole blocks
    first = (np.cumsum(member_blocks) - member_blocks.ravel()).reshape(member_blocks.shape)  # each member's header block
    used = int(member_blocks.sum())
    if end is not None:
        used += 2 + (-(end + used + 2) * _BLOCK) % _RECORD // _BLOCK  # two zero blocks end the archive, then padding
    blocks = np.zeros((used, _BLOCK), np.uint8)
    # Headers in sample order (kinds interleaved), absent members dropped; then each kind's data in place.
    order = pa.array(np.arange(n * len(kinds)).reshape(len(kinds), n).T.ravel())
    names = pa.concat_arrays([_flat(names) for names, _ in kinds]).take(order).filter(pa.array(present.ravel()))
    blocks[first[present]] = _headers(names, sizes[present])
    for kind, (_, data) in enumerate(kinds):
        _place(blocks.reshape(-1), data, (first[:, kind] + 1) * _BLOCK, present[:, kind])
    return blocks.reshape(-1)


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``values`` as one large_binary array (member names of any string or binary type, concatenated)."""
    values = pc.cast(values, pa.large_binary())
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _place(out: np.ndarray, values: pa.Array | pa.ChunkedArray, at: np.ndarray, present: np.ndarray) -> None:
    """Copy each present value of a binary or string array to ``out[at[row]:]``: one copy, no
    intermediate arrays (image payloads are most of a shard's bytes)."""
    row = 0
    for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
        rows = np.flatnonzero(present[row : row + len(chunk)])
        _, offsets, data = chunk.buffers()
        if data is not None and len(rows):
            width = 8 if pa.types.is_large_binary(chunk.type) or pa.types.is_large_string(chunk.type) else 4
            ends = np.frombuffer(offsets, f"<i{width}", len(chunk) + 1, chunk.offset * width).astype(np.int64)
            source = np.frombuffer(data, np.uint8)
            for start, end, to in zip(ends[rows].tolist(), ends[rows + 1].tolist(), at[row + rows].tolist()):
                out[to : to + end - start] = source[start:end]
        row += len(chunk)


def _buffer(values: pa.Array) -> np.ndarray:
    """The bytes of a (large) binary array without nulls, back to back."""
    offsets = np.frombuffer(values.buffers()[1], np.int64, len(values) + 1, values.offset * 8)
    data = values.buffers()[2]
    return np.frombuffer(data, np.uint8, int(offsets[-1] - offsets[0]), int(offsets[0])) if data is not None else np.empty(0, np.uint8)


def _headers(names: pa.Array, sizes: np.ndarray) -> np.ndarray:
    """USTAR headers, one 512-byte row per member."""
    lengths = pc.binary_length(names).to_numpy().astype(np.int64)
    if len(lengths) and lengths.max() > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {names[int(lengths.argmax())].as_py()[:120]!r}...")
    headers = np.tile(_TEMPLATE, (len(lengths), 1))
    flat = headers.reshape(-1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    flat[np.repeat(np.arange(len(lengths)) * _BLOCK - starts, lengths) + np.arange(int(lengths.sum()))] = _buffer(names)
    headers[:, 124:135] = (sizes[:, None] // _OCTAL % 8) + ord("0")
    checksum = headers.sum(axis=1, dtype=np.int64)  # the checksum field counts as eight spaces
    headers[:, 148:154] = (checksum[:, None] // _OCTAL[-6:] % 8) + ord("0")
    headers[:, 154] = 0
    return headers


def json_rows(table: pa.Table) -> pa.Array:
    """Per row the JSON member: ``{"key": ..., COLUMN: value, ...}`` over the columns not stored as
    members of their own, as ``jsontext.dumps(row, ensure_ascii=False)`` spells it (bytes, NaN and
    infinities as null)."""
    names = ["key", *(c for c in table.column_names if c not in NOT_IN_JSON)]
    pieces: list = []
    for i, name in enumerate(names):
        pieces += [("{" if i == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": ", _json_values(table.column(name))]
    pieces.append("}")
    if table.num_rows == 0:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(*[pa.scalar(p) if isinstance(p, str) else p for p in pieces], "")


def _json_values(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """The column's values as JSON text (null for nulls)."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _json_strings(column)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return pc.fill_null(pc.cast(column, pa.string()), "null")
    if pa.types.is_floating(kind):  # Python's repr, as json.dumps writes floats (Arrow's shortest form differs)
        return pa.array(["null" if v is None or not math.isfinite(v) else repr(v) for v in column.to_pylist()], pa.string())
    if pa.types.is_null(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pa.array(["null"] * len(column), pa.string())
    return pa.array([jsontext.dumps(v, ensure_ascii=False, default=_json_default) for v in column.to_pylist()], pa.string())


_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"), ("\f", "\\f"))


def _json_strings(column: pa.ChunkedArray) -> pa.Array:
    """JSON string literals; the rare strings with other control characters go through json.dumps."""
    text = column
    for raw, escaped in _ESCAPES:
        text = pc.replace_substring(text, raw, escaped)
    text = pc.binary_join_element_wise('"', text, '"', "")
    odd = pc.fill_null(pc.match_substring_regex(column, r"[\x00-\x07\x0b\x0e-\x1f]"), False)
    if pc.any(odd).as_py():
        values = column.to_pylist()
        fixed = [json.dumps(values[i], ensure_ascii=False) for i in np.flatnonzero(odd.to_numpy(zero_copy_only=False))]
        text = pa.array(text.to_pylist(), pa.string())
        text = pc.replace_with_mask(text, pa.array(odd.to_numpy(zero_copy_only=False)), pa.array(fixed, pa.string()))
    return pc.fill_null(text, "null")


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return None
    return str(value)
