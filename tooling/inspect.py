"""``mmcurate inspect``: what a dataset holds — mmcurate output, img2dataset output or a URL list."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.schemas import METADATA_KEY
from mmcurate.shards.layout import DONE, detect_layout, open_output, open_parquet, reading
from mmcurate.shards.readers import tar_members
from mmcurate.shards.storage import url_to_fs


def _tables(fs, paths: list[str], columns: list[str] | None = None) -> pa.Table:
    tables = []
    for path in paths:
        with reading(fs, path), open_parquet(fs, path) as pf:
            tables.append(pf.read(columns=columns))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _describe(table: pa.Table, title: str, samples: int) -> list[str]:
    lines = [f"{title}: {table.num_rows} rows", "schema:"]
    version = (table.schema.metadata or {}).get(METADATA_KEY)
    for field in table.schema:
        nulls = table.column(field.name).null_count
        lines.append(f"  {field.name}: {field.type}  ({nulls} null)")
    if version:
        lines.append(f"schema_version: {version.decode()}")
    shown = [c for c in table.column_names if c != "image"]
    for row in table.select(shown).slice(0, samples).to_pylist():
        lines.append("sample: " + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if v is not None))
    return lines


def _captions_line(table: pa.Table) -> str:
    """How many candidate captions capfilt stored, by source, and where the kept rows' caption came from."""
    sources: Counter = Counter()
    chosen: Counter = Counter()
    for caption, candidates in zip(table.column("caption").to_pylist(), table.column("captions").to_pylist(), strict=True):
        sources.update(c["source"] for c in candidates or ())
        match = [c["source"] for c in candidates or () if c["text"] == caption]
        chosen[match[0] if match else "none"] += 1
    return (
        f"captions: {sum(sources.values())} candidates ({sources['web']} web, {sources['synthetic']} synthetic); "
        f"caption taken from: " + ", ".join(f"{source} {n}" for source, n in chosen.most_common())
    )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tar_samples(fs, paths: list[str]) -> tuple[int, Counter]:
    keys: set[str] = set()
    exts: Counter = Counter()
    for path in paths:
        with reading(fs, path), fs.open(path, "rb") as f:
            for key, ext, _ in tar_members(f, lambda ext: False):
                keys.add(f"{path}:{key}")
                exts[ext] += 1
    return len(keys), exts


def inspect_dataset(path: str, samples: int = 3) -> str:
    """A readable report of the dataset at ``path``."""
    fs, root = url_to_fs(path)
    root = root.rstrip("/")
    layout = detect_layout(fs, root)
    lines = [f"{path}: {layout} dataset"]
    if layout == "mmcurate":
        out = open_output(path)
        run = out.run_record()
        if run is not None:
            stages = ", ".join(next(iter(s)) for s in run["pipeline"]["stages"]) or "none"
            lines.append(f"run: engine {run['engine']}, stages {stages}, started {run['started']}, finished {run.get('finished')}")
        meta, tars = out.kept_files(), out.tar_files()
        done = sum(out.is_done(i) for i in out.shard_ids(DONE))
        lines.append(f"shards: {len(meta)} written, {done} done" + (f", {len(tars)} tars" if tars else ""))
        kept = _tables(fs, meta)
        lines += _describe(kept, "kept", samples)
        if "captions" in kept.column_names:
            lines.append(_captions_line(kept))
        if tars:
            count, exts = _tar_samples(fs, tars)
            lines.append(f"tar samples: {count} ({', '.join(f'{n} .{e}' for e, n in sorted(exts.items()))})")
        rejects = _tables(fs, out.rejects_files(), None)
        lines.append(f"rejected: {rejects.num_rows} rows")
        if rejects.num_rows:
            counts = Counter(zip(rejects.column("reject_stage").to_pylist(), rejects.column("reject_reason").to_pylist(), strict=True))
            lines += [f"  {stage}/{reason}: {n}" for (stage, reason), n in counts.most_common()]
    elif layout == "img2dataset":
        parquets = sorted(p for p in fs.glob(f"{root}/*.parquet"))
        tars = sorted(fs.glob(f"{root}/*.tar"))
        table = _tables(fs, parquets)
        count, exts = _tar_samples(fs, tars)
        lines.append(f"tar samples: {count} in {len(tars)} tars ({', '.join(f'{n} .{e}' for e, n in sorted(exts.items()))})")
        if "status" in table.column_names:
            by_status = Counter(table.column("status").to_pylist())
            lines.append("parquet rows by status: " + ", ".join(f"{s} {n}" for s, n in by_status.most_common()))
        lines += _describe(table, "parquet", samples)
    else:
        paths = sorted(fs.glob(f"{root}/**/*.parquet")) if fs.isdir(root) else [root]
        try:
            lines += _describe(_tables(fs, paths), "rows", samples)
        except (pa.ArrowException, OSError) as e:
            raise UsageError(f"{path}: not a Parquet file or a known dataset folder ({e})") from None
    return "\n".join(lines)
