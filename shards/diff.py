"""``mmcurate diff A B``: whether two outputs hold the same result, and where they differ.

Compared: the run record (pipeline options, totals, models) without what differs between runs of
one pipeline (paths, engine, workers, timings, versions, run ids); per shard the kept rows and the
rejects, by key: keys, columns and column types, values (floats within a tolerance, images by
their bytes); rejects counted by stage and reason; keys a side holds twice; ``_stats`` without their seconds.
Shards are compared one by one when both outputs are cut alike, else as whole datasets.

Memory stays about ``bucket_bytes`` (of the outputs' files) whatever the outputs' size: a pair of
shards larger than that is streamed side by side, a batch at a time, when their keys come in the
same order (as runs of one pipeline write them); otherwise, and for outputs not cut alike, both
sides' rows are partitioned by a hash of their key into buckets of about that size, spilled as
Parquet to a temporary folder (``TMPDIR``; removed when done, also on an error), and compared
bucket by bucket.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mmcurate.errors import UsageError
from mmcurate.shards.layout import DONE, OutputDir, open_output
from mmcurate.shards.summary import read_stats
from mmcurate.shards.writers import READ_ROWS, parquet_batches, written_by

# run.json entries that differ between runs of one pipeline (``sources``: input files' modification times
# differ between copies of one input; a different content shows in the rows).
IGNORED_RUN = frozenset({"engine", "started", "finished", "versions", "mmcurate_version", "run_id", "sources"})
IGNORED_PIPELINE = frozenset({"engine", "workers", "min_actors", "max_actors"})
EXAMPLES = 3  # keys shown per kind of difference
BUCKET_BYTES = 128 << 20  # of the outputs' files compared at once (memory holds about that much, decoded)
FANOUT = 256  # bucket files one spill pass writes at once (an open Parquet writer each)
SIDES = (0, 1)
KINDS = ("kept", "rejected")
ROW_TALLIES = (
    "rows only in A",
    "rows only in B",
    "keys repeated in A",
    "keys repeated in B",
    "kept in A, rejected in B",
    "rejected in A, kept in B",
)
REJECT_KEYS = ["key", "reject_stage", "reject_reason"]
EMPTY = {"kept": pa.schema([("key", pa.string())]), "rejected": pa.schema([(name, pa.string()) for name in REJECT_KEYS])}  # no shards


@dataclass
class Tally:
    """Differences of one kind: how many, and the first few examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, n: int, examples: list[str]) -> None:
        self.count += n
        self.examples += examples[: max(0, EXAMPLES - len(self.examples))]


@dataclass
class Report:
    """Every difference found, grouped by kind (insertion order is the order of the summary)."""

    lines: list[str] = field(default_factory=list)
    tallies: dict[str, Tally] = field(default_factory=dict)

    def tally(self, kind: str, n: int, examples: list[str]) -> None:
        if n:
            self.tallies.setdefault(kind, Tally()).add(n, examples)

    def summary(self) -> list[str]:
        out = list(self.lines)
        for kind, t in self.tallies.items():
            out.append(f"{kind}: {t.count} (e.g. {'; '.join(t.examples)})")
        return out


def diff_outputs(a: str, b: str, tolerance: float = 1e-6, bucket_bytes: int = BUCKET_BYTES) -> list[str]:
    """The differences between outputs ``a`` and ``b`` as readable lines; none when they agree.

    Floats agree when ``|x - y| <= tolerance * max(1, |x|, |y|)`` (NaN equals NaN). ``bucket_bytes``:
    about the most of the outputs' files compared at once (see the module's docstring)."""
    outs = [_open(path) for path in (a, b)]
    report = Report()
    runs = [out.run_record() for out in outs]
    for path in _dict_diff(_comparable(runs[0]), _comparable(runs[1])):
        report.lines.append(f"run.json {path}")
    ids = [out.shard_ids(DONE) for out in outs]
    if ids[0] == ids[1] and runs[0]["pipeline"]["output"]["rows_per_shard"] == runs[1]["pipeline"]["output"]["rows_per_shard"]:
        for shard_id in ids[0]:
            _compare_unit(report, Unit(outs, [[shard_id], [shard_id]]), tolerance, bucket_bytes, in_step=True)
            stats = [_stats(out, shard_id) for out in outs]
            for path in _dict_diff(*stats):
                report.tally("stats differ", 1, [f"_stats/{shard_id:05d}.json {path}"])
    else:
        report.lines.append(f"shards: {len(ids[0])} in A, {len(ids[1])} in B (compared as whole datasets)")
        _compare_unit(report, Unit(outs, ids), tolerance, bucket_bytes, in_step=False)
    return report.summary()


def _open(path: str) -> OutputDir:
    out = open_output(path)
    if out.run_record() is None:
        raise UsageError(f"{path} is not an mmcurate output (no run.json)")
    return out


def _comparable(run: dict) -> dict:
    record = {k: v for k, v in run.items() if k not in IGNORED_RUN}
    pipeline = {k: v for k, v in run["pipeline"].items() if k not in IGNORED_PIPELINE}
    pipeline["input"] = {k: v for k, v in pipeline["input"].items() if k != "path"}
    pipeline["output"] = {k: v for k, v in pipeline["output"].items() if k != "path"}
    return {**record, "pipeline": pipeline}


def _stats(out: OutputDir, shard_id: int) -> dict:
    stats = read_stats(out, shard_id)
    for entry in stats["stages"]:
        entry.pop("seconds", None)
    return stats


def _dict_diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """``PATH: A != B`` for every leaf where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _dict_diff(a.get(key, "(absent)"), b.get(key, "(absent)"), f"{path}.{key}" if path else str(key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _dict_diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {_show(a)} != {_show(b)}"


class Unit:
    """Rows compared as one: the shards ``ids[0]`` of output A against the shards ``ids[1]`` of B."""

    def __init__(self, outs: list[OutputDir], ids: list[list[int]]) -> None:
        self.outs, self.ids = outs, ids
        self.schemas = {kind: [self._schema(side, kind) for side in SIDES] for kind in KINDS}

    def _schema(self, side: int, kind: str) -> pa.Schema:
        """The schema of a side's rows of one kind over all its shards, types promoted as ``pa.concat_tables`` does."""
        out = self.outs[side]
        found = []
        for i in self.ids[side]:
            if kind == "kept":
                found.append(written_by(out, i).schema(out, i))
            else:
                found.append(out.parquet_schema(out.rejects_path(i)))
        return pa.unify_schemas(found, promote_options="permissive") if found else EMPTY[kind]

    def shared(self, kind: str) -> list[tuple[str, pa.DataType, pa.DataType]]:
        """``(column, type in A, type in B)`` of the columns but ``key`` that both sides hold, in A's order."""
        a, b = self.schemas[kind]
        return [(f.name, f.type, b.field(f.name).type) for f in a if f.name in b.names and f.name != "key"]

    def compared(self, kind: str) -> list[str]:
        """The shared columns whose values are compared: those of one type on both sides."""
        return [name for name, x, y in self.shared(kind) if x == y]

    def nbytes(self) -> int:
        """The size of the unit's files in both outputs."""
        return sum(sum(out.shard_files(i).values()) for out, ids in zip(self.outs, self.ids, strict=True) for i in ids)

    def batches(self, side: int, kind: str) -> Iterator[pa.Table]:
        """A side's rows of one kind, a batch at a time, as the kind's schema."""
        out, schema = self.outs[side], self.schemas[kind][side]
        for i in self.ids[side]:
            found = written_by(out, i).batches(out, i) if kind == "kept" else parquet_batches(out.fs, out.rejects_path(i), READ_ROWS)
            for batch in found:
                yield _as_schema(batch, schema)

    def keys(self, side: int, kind: str) -> pa.Table:
        """A side's keys of one kind (with stage and reason for rejects), read without the rest of the rows."""
        out = self.outs[side]
        paths = [out.kept_path(i) if kind == "kept" else out.rejects_path(i) for i in self.ids[side]]
        return _concat([out.read_parquet(path, EMPTY[kind].names) for path in paths], EMPTY[kind])


@dataclass
class Found:
    """The differences of one unit, gathered a part at a time: counts, and the examples of the smallest keys."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    common: Counter[str] = field(default_factory=Counter)  # keys both sides hold, by kind of rows
    rejects: list[Counter] = field(default_factory=lambda: [Counter(), Counter()])  # (stage, reason) per side

    def add(self, kind: str, n: int, examples: Iterable[tuple[str, str]]) -> None:
        """``n`` differences of ``kind``; ``examples``: ``(key, text)`` of some of them."""
        if n:
            self.counts[kind] += n
            self.examples[kind] = heapq.nsmallest(EXAMPLES, itertools.chain(self.examples.get(kind, []), examples))

    def report(self, report: Report, unit: Unit) -> None:
        """Add the unit's differences to ``report`` in the summary's order: columns and values, rows, rejects."""
        for kind in KINDS:
            a, b = (s.names for s in unit.schemas[kind])
            for name in sorted(set(a) ^ set(b)):
                report.tally(f"{kind} columns only in {'A' if name in a else 'B'}", 1, [name])
            for name, x, y in unit.shared(kind) if self.common[kind] else []:
                if x != y:
                    report.tally(f"{kind} column types differ", 1, [f"{name}: {x} != {y}"])
                else:
                    self._emit(report, f"{kind} values differ in {name}")
        for kind in ROW_TALLIES:
            self._emit(report, kind)
        for stage, reason in sorted(set(self.rejects[0]) | set(self.rejects[1]), key=str):
            n = [c[(stage, reason)] for c in self.rejects]
            if n[0] != n[1]:
                report.tally("rejects by stage and reason differ", abs(n[0] - n[1]), [f"{stage}/{reason}: {n[0]} in A, {n[1]} in B"])

    def _emit(self, report: Report, kind: str) -> None:
        report.tally(kind, self.counts[kind], [text for _, text in self.examples.get(kind, [])])


def _compare_unit(report: Report, unit: Unit, tolerance: float, bucket_bytes: int, in_step: bool) -> None:
    """Compare a unit in about ``bucket_bytes`` of its files at a time: whole when it is that small, else
    streamed side by side (``in_step``: a pair of shards, whose keys fit in memory) when its keys allow,
    else bucket by bucket."""
    found = Found()
    buckets = -(-unit.nbytes() // bucket_bytes)
    if buckets <= 1:
        tables = {kind: [_concat(list(unit.batches(side, kind)), unit.schemas[kind][side]) for side in SIDES] for kind in KINDS}
        _compare_bucket(found, unit, tables, tolerance)
    elif not (in_step and _compare_in_step(found, unit, tolerance)):
        with tempfile.TemporaryDirectory(prefix="mmcurate-diff-") as folder:
            Buckets(found, unit, tolerance, buckets, bucket_bytes).compare(Path(folder))
    found.report(report, unit)


def _compare_bucket(found: Found, unit: Unit, tables: dict[str, list[pa.Table]], tolerance: float) -> None:
    """Compare rows held in memory, among them every row of their keys on both sides."""
    common = _compare_keys(found, tables["kept"], tables["rejected"])
    for kind in KINDS:
        keys = sorted(common[kind])
        index = [dict(zip(_keys(t), range(t.num_rows))) for t in tables[kind]]  # a repeated key: its last row
        rows = [pa.array([index[side][k] for k in keys], pa.int64()) for side in SIDES]
        a, b = tables[kind]
        columns = ((name, a.column(name).take(rows[0]), b.column(name).take(rows[1])) for name in unit.compared(kind))
        _compare_values(found, kind, pa.array(keys, pa.string()), columns, tolerance)


def _compare_in_step(found: Found, unit: Unit, tolerance: float) -> bool:
    """Compare a pair of shards streamed side by side, a batch at a time, when on each side the keys of
    a kind are unique and the keys both sides hold come in the same order (as runs of one pipeline
    write them); False, nothing compared, when they do not."""
    keys = {kind: [unit.keys(side, kind) for side in SIDES] for kind in KINDS}
    if not all(_in_step(*(_keys(t) for t in keys[kind])) for kind in KINDS):
        return False
    common = _compare_keys(found, keys["kept"], keys["rejected"])
    for kind in KINDS:
        wanted = pa.array(sorted(common[kind]), pa.string())
        sides = [(t.filter(pc.is_in(t.column("key"), value_set=wanted)) for t in unit.batches(side, kind)) for side in SIDES]
        for a, b in _paired(*sides):
            _compare_values(found, kind, a.column("key"), ((n, a.column(n), b.column(n)) for n in unit.compared(kind)), tolerance)
    return True


def _in_step(a: list[str], b: list[str]) -> bool:
    """Whether both key lists are free of repeats and list the keys they share in the same order."""
    shared = set(a) & set(b)
    return len(set(a)) == len(a) and len(set(b)) == len(b) and [k for k in a if k in shared] == [k for k in b if k in shared]


def _paired(a: Iterator[pa.Table], b: Iterator[pa.Table]) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Two streams of equally many rows as pairs of tables of equal length, row ``i`` of both from the same place."""
    held = [pa.table({}), pa.table({})]
    streams = [a, b]
    while True:
        for side in SIDES:
            while held[side].num_rows == 0:
                batch = next(streams[side], None)
                if batch is None:
                    return
                held[side] = batch
        n = min(t.num_rows for t in held)
        yield held[0].slice(0, n), held[1].slice(0, n)
        held = [t.slice(n) for t in held]


@dataclass
class Buckets:
    """Both sides' rows partitioned by a hash of their key into ``fanout ** levels`` (at least ``buckets``)
    Parquet files, spilled ``FANOUT`` files at a time at most (a pass per level), then compared one bucket at a time."""

    found: Found
    unit: Unit
    tolerance: float
    buckets: int
    bucket_bytes: int

    def __post_init__(self) -> None:
        self.levels = 1
        while FANOUT**self.levels < self.buckets:
            self.levels += 1
        self.fanout = math.ceil(self.buckets ** (1 / self.levels))

    def compare(self, folder: Path) -> None:
        sources = {(side, kind): functools.partial(self.unit.batches, side, kind) for side in SIDES for kind in KINDS}
        self._partition(sources, folder, 0)

    def _partition(self, sources: dict[tuple[int, str], Callable[[], Iterator[pa.Table]]], folder: Path, level: int) -> None:
        """Spill each source's rows by digit ``level`` of their keys' hashes, then compare each part or
        partition it by the next digit; every part is deleted once done with."""
        for (side, kind), batches in sources.items():
            self._spill(batches(), self.unit.schemas[kind][side], folder / f"{kind}{side}", level)
        for digit in range(self.fanout):
            parts = {(side, kind): folder / f"{kind}{side}" / f"{digit}.parquet" for side, kind in sources}
            if level + 1 == self.levels:
                tables = {kind: [_read_part(parts[side, kind], self.unit.schemas[kind][side]) for side in SIDES] for kind in KINDS}
                _compare_bucket(self.found, self.unit, tables, self.tolerance)
            else:
                self._partition({s: functools.partial(_part_batches, p) for s, p in parts.items()}, folder / str(digit), level + 1)
            for path in parts.values():
                path.unlink(missing_ok=True)

    def _spill(self, batches: Iterator[pa.Table], schema: pa.Schema, folder: Path, level: int) -> None:
        """Write rows to ``folder/DIGIT.parquet`` by digit ``level`` of their keys' hashes, half a bucket at a time."""
        folder.mkdir(parents=True, exist_ok=True)
        writers: dict[int, pq.ParquetWriter] = {}
        try:
            for chunk in _chunks(batches, self.bucket_bytes // 2):
                digits = _hashes(chunk.column("key")) // self.fanout**level % self.fanout
                counts = np.bincount(digits, minlength=self.fanout)
                chunk = chunk.take(np.argsort(digits, kind="stable"))
                for digit, start, n in zip(range(self.fanout), (np.cumsum(counts) - counts).tolist(), counts.tolist(), strict=True):
                    if n:
                        if digit not in writers:
                            writers[digit] = pq.ParquetWriter(folder / f"{digit}.parquet", schema, compression="lz4")
                        writers[digit].write_table(chunk.slice(start, n))
        finally:
            for writer in writers.values():
                writer.close()


def _hashes(keys: pa.ChunkedArray) -> np.ndarray:
    """A hash of each key, the same in every process."""
    return np.array([zlib.crc32(k.encode()) for k in keys.to_pylist()], np.int64)


def _chunks(batches: Iterator[pa.Table], nbytes: int) -> Iterator[pa.Table]:
    """The batches gathered into tables of about ``nbytes``."""
    held: list[pa.Table] = []
    size = 0
    for batch in batches:
        held.append(batch)
        size += batch.nbytes
        if size >= nbytes:
            yield pa.concat_tables(held)
            held, size = [], 0
    if held:
        yield pa.concat_tables(held)


def _part_batches(path: Path) -> Iterator[pa.Table]:
    if path.exists():
        yield from parquet_batches(LocalFileSystem(), str(path), READ_ROWS)


def _read_part(path: Path, schema: pa.Schema) -> pa.Table:
    return pq.read_table(path) if path.exists() else schema.empty_table()


def _compare_keys(found: Found, kept: list[pa.Table], rejects: list[pa.Table]) -> dict[str, set[str]]:
    """Tally the keys one side holds and the other does not, those a side holds twice, those kept on
    one side and rejected on the other, and count rejects by stage and reason; return the keys both
    sides hold, by kind of rows."""
    keys = [(_keys(k), _keys(r)) for k, r in zip(kept, rejects, strict=True)]
    rows = [set(k) | set(r) for k, r in keys]
    reasons = [dict(zip(_keys(r), r.column("reject_reason").to_pylist(), strict=True)) for r in rejects]
    for side, name in zip(SIDES, "AB", strict=True):
        only = rows[side] - rows[1 - side]
        found.add(f"rows only in {name}", len(only), ((k, k) for k in only))
        repeated = [(k, n) for k, n in Counter(keys[side][0] + keys[side][1]).items() if n > 1]
        found.add(f"keys repeated in {name}", len(repeated), ((k, f"{k} ({n} rows)") for k, n in repeated))
        found.rejects[side].update(zip(*(rejects[side].column(c).to_pylist() for c in ("reject_stage", "reject_reason")), strict=True))
    for side, label in ((0, "kept in A, rejected in B"), (1, "rejected in A, kept in B")):
        moved = set(keys[side][0]) & set(keys[1 - side][1])
        found.add(label, len(moved), ((k, f"{k} ({reasons[1 - side][k]})") for k in moved))
    common = {kind: set(keys[0][i]) & set(keys[1][i]) for i, kind in enumerate(KINDS)}
    for kind, shared in common.items():
        found.common[kind] += len(shared)
    return common


Columns = Iterable[tuple[str, pa.ChunkedArray, pa.ChunkedArray]]  # (name, values in A, values in B)


def _compare_values(found: Found, kind: str, keys: pa.Array | pa.ChunkedArray, columns: Columns, tolerance: float) -> None:
    """Tally the values that differ in rows aligned by ``keys`` (row ``i`` of both columns is key ``i``'s)."""
    if not len(keys):
        return
    for name, x, y in columns:
        differ = np.flatnonzero(~_agree(x, y, tolerance))
        first = sorted(zip(keys.take(pa.array(differ, pa.int64())).to_pylist(), differ.tolist(), strict=True))[:EXAMPLES]
        shown = [(k, f"{k}: {_show(x[i].as_py())} != {_show(y[i].as_py())}") for k, i in first]
        found.add(f"{kind} values differ in {name}", len(differ), shown)


def _agree(x: pa.ChunkedArray, y: pa.ChunkedArray, tolerance: float) -> np.ndarray:
    """Per row whether two columns of one type hold the same value (nulls equal nulls)."""
    if pa.types.is_floating(x.type):
        xs, ys = (c.to_numpy(zero_copy_only=False).astype(np.float64) for c in (pc.fill_null(x, np.nan), pc.fill_null(y, np.nan)))
        same = np.isclose(xs, ys, rtol=0, atol=0, equal_nan=True) | (
            np.abs(xs - ys) <= tolerance * np.maximum(1, np.maximum(np.abs(xs), np.abs(ys)))
        )
        return same & (x.is_null().to_numpy(zero_copy_only=False) == y.is_null().to_numpy(zero_copy_only=False))
    if pa.types.is_nested(x.type):
        return np.array([_close(u, v, tolerance) for u, v in zip(x.to_pylist(), y.to_pylist(), strict=True)], bool)
    equal = pc.fill_null(pc.equal(x, y), False).to_numpy(zero_copy_only=False)
    both_null = pc.and_(pc.is_null(x), pc.is_null(y)).to_numpy(zero_copy_only=False)
    return equal | both_null


def _close(u: Any, v: Any, tolerance: float) -> bool:
    """Equality of nested values, floats within the tolerance."""
    if isinstance(u, float) and isinstance(v, float):
        return (math.isnan(u) and math.isnan(v)) or abs(u - v) <= tolerance * max(1.0, abs(u), abs(v))
    if isinstance(u, list) and isinstance(v, list):
        return len(u) == len(v) and all(_close(p, q, tolerance) for p, q in zip(u, v, strict=True))
    if isinstance(u, dict) and isinstance(v, dict):
        return u.keys() == v.keys() and all(_close(u[k], v[k], tolerance) for k in u)
    return u == v


def _concat(tables: list[pa.Table], empty: pa.Schema) -> pa.Table:
    """The tables as one, types promoted; an ``empty`` table when there are none."""
    return pa.concat_tables(tables, promote_options="permissive") if tables else empty.empty_table()


def _as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns of ``schema``: its own cast to their promoted types, the others null
    (as ``pa.concat_tables`` promotes them)."""
    n = table.num_rows
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _keys(table: pa.Table) -> list[str]:
    return table.column("key").to_pylist()


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
