"""``mmcurate diff A B``: whether two outputs hold the same result, and where they differ.

Compared: the run record (pipeline options, totals, models) without what differs between runs of
one pipeline (paths, engine, workers, timings, versions, run ids); per shard the kept rows and the
rejects, by key: keys, columns and column types, values (floats within a tolerance, images by
their bytes); rejects counted by stage and reason; ``_stats`` without their seconds. Shards are
compared one by one when both outputs are cut alike, else as whole datasets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.shards.layout import DONE, OutputDir
from mmcurate.shards.writers import written_by

# run.json entries that differ between runs of one pipeline (``sources``: input files' modification times
# differ between copies of one input; a different content shows in the rows).
IGNORED_RUN = frozenset({"engine", "started", "finished", "versions", "mmcurate_version", "run_id", "sources"})
IGNORED_PIPELINE = frozenset({"engine", "workers", "min_actors", "max_actors"})
EXAMPLES = 3  # keys shown per kind of difference


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


def diff_outputs(a: str, b: str, tolerance: float = 1e-6) -> list[str]:
    """The differences between outputs ``a`` and ``b`` as readable lines; none when they agree.

    Floats agree when ``|x - y| <= tolerance * max(1, |x|, |y|)`` (NaN equals NaN)."""
    outs = [_open(path) for path in (a, b)]
    report = Report()
    runs = [out.run_record() for out in outs]
    for path in _dict_diff(_comparable(runs[0]), _comparable(runs[1])):
        report.lines.append(f"run.json {path}")
    ids = [out.shard_ids(DONE) for out in outs]
    if ids[0] == ids[1] and runs[0]["pipeline"]["output"]["rows_per_shard"] == runs[1]["pipeline"]["output"]["rows_per_shard"]:
        for shard_id in ids[0]:
            _compare_shards(report, outs, [[shard_id], [shard_id]], tolerance)
            stats = [_stats(out, shard_id) for out in outs]
            for path in _dict_diff(*stats):
                report.tally("stats differ", 1, [f"_stats/{shard_id:05d}.json {path}"])
    else:
        report.lines.append(f"shards: {len(ids[0])} in A, {len(ids[1])} in B (compared as whole datasets)")
        _compare_shards(report, outs, ids, tolerance)
    return report.summary()


def _open(path: str) -> OutputDir:
    out = OutputDir.open(path)
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
    stats = out.read_json(out.stats_path(shard_id))
    for entry in stats.get("stages", []):
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


def _compare_shards(report: Report, outs: list[OutputDir], ids: list[list[int]], tolerance: float) -> None:
    kept = [_concat([written_by(out, i).read(out, i) for i in shard_ids]) for out, shard_ids in zip(outs, ids, strict=True)]
    rejects = [_concat([out.read_parquet(out.rejects_path(i)) for i in shard_ids]) for out, shard_ids in zip(outs, ids, strict=True)]
    _compare_tables(report, "kept", kept, tolerance)
    _compare_tables(report, "rejected", rejects, tolerance)
    rows = [set(_keys(k)) | set(_keys(r)) for k, r in zip(kept, rejects, strict=True)]
    report.tally("rows only in A", len(rows[0] - rows[1]), sorted(rows[0] - rows[1]))
    report.tally("rows only in B", len(rows[1] - rows[0]), sorted(rows[1] - rows[0]))
    moved = [set(_keys(kept[0])) & set(_keys(rejects[1])), set(_keys(rejects[0])) & set(_keys(kept[1]))]
    reasons = [dict(zip(_keys(r), r.column("reject_reason").to_pylist(), strict=True)) for r in rejects]
    report.tally("kept in A, rejected in B", len(moved[0]), [f"{k} ({reasons[1][k]})" for k in sorted(moved[0])])
    report.tally("rejected in A, kept in B", len(moved[1]), [f"{k} ({reasons[0][k]})" for k in sorted(moved[1])])
    counts = [Counter(zip(r.column("reject_stage").to_pylist(), r.column("reject_reason").to_pylist(), strict=True)) for r in rejects]
    for stage, reason in sorted(set(counts[0]) | set(counts[1]), key=str):
        n = [c[(stage, reason)] for c in counts]
        if n[0] != n[1]:
            report.tally("rejects by stage and reason differ", abs(n[0] - n[1]), [f"{stage}/{reason}: {n[0]} in A, {n[1]} in B"])


def _compare_tables(report: Report, what: str, tables: list[pa.Table], tolerance: float) -> None:
    """Columns and, over the keys both tables hold, values (rows on one side only are counted by the caller)."""
    a, b = tables
    keys = [_keys(t) for t in tables]
    sets = [set(k) for k in keys]
    for name in sorted(set(a.column_names) ^ set(b.column_names)):
        report.tally(f"{what} columns only in {'A' if name in a.column_names else 'B'}", 1, [name])
    common = sorted(sets[0] & sets[1])
    if not common:
        return
    index = [dict(zip(k, range(len(k)), strict=True)) for k in keys]
    a = a.take(pa.array([index[0][k] for k in common], pa.int64()))
    b = b.take(pa.array([index[1][k] for k in common], pa.int64()))
    for name in [c for c in a.column_names if c in b.column_names and c != "key"]:
        x, y = a.column(name), b.column(name)
        if x.type != y.type:
            report.tally(f"{what} column types differ", 1, [f"{name}: {x.type} != {y.type}"])
            continue
        differ = np.flatnonzero(~_agree(x, y, tolerance))
        shown = [f"{common[i]}: {_show(x[int(i)].as_py())} != {_show(y[int(i)].as_py())}" for i in differ[:EXAMPLES]]
        report.tally(f"{what} values differ in {name}", len(differ), shown)


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


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({"key": pa.array([], pa.string())})


def _keys(table: pa.Table) -> list[str]:
    return table.column("key").to_pylist()


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
