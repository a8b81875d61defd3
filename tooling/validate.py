"""``mmcurate validate``: every shard against the declared schema, tars against their Parquet.

Each problem is one line naming the file, and where it applies the row and field.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.schemas import BY_NAME, METADATA_KEY
from mmcurate.shards.layout import OutputDir, detect_layout, open_parquet, reading
from mmcurate.shards.readers import READ_STAGE, TAR_ERRORS, index_tar, tar_members
from mmcurate.shards.storage import url_to_fs
from mmcurate.shards.summary import read_stats


def _read(fs, path: str, problems: list[str]) -> pa.Table | None:
    """The Parquet file at ``path``; None, its problem added to ``problems``, when it cannot be read."""
    try:
        with reading(fs, path), open_parquet(fs, path) as pf:
            return pf.read()
    except UsageError as e:
        problems.append(str(e))
        return None


def check_table(table: pa.Table, path: str, kept: bool) -> list[str]:
    """Declared columns have declared types; keys are present and dot-free; the ledger is consistent."""
    problems = []
    if METADATA_KEY not in (table.schema.metadata or {}):
        problems.append(f"{path}: no schema_version in the file metadata")
    for field in table.schema:
        declared = BY_NAME.get(field.name)
        if declared is not None and field.type != declared.type:
            problems.append(f"{path}: field {field.name}: type {field.type}, declared {declared.type}")
    if "key" not in table.column_names:
        return problems + [f"{path}: no key column"]
    keys = table.column("key").to_pylist()
    for row, key in enumerate(keys):
        if key is None or key == "":
            problems.append(f"{path}: row {row}, field key: empty")
        elif "." in key:
            problems.append(f"{path}: row {row}, field key: {key!r} contains a dot")
    if "captions" in table.column_names:
        for row, candidates in enumerate(table.column("captions").to_pylist()):
            bad = [c for c in candidates or () if c["source"] not in ("web", "synthetic") or not c["text"]]
            if bad:
                problems.append(f"{path}: row {row}, field captions: entry {bad[0]!r} needs a text and source web or synthetic")
    reasons = table.column("reject_reason") if "reject_reason" in table.column_names else pa.nulls(table.num_rows, pa.string())
    bad = pc.is_valid(reasons) if kept else pc.is_null(reasons)
    for row in pc.indices_nonzero(bad).to_pylist():
        problems.append(f"{path}: row {row}, field reject_reason: " + ("set on a kept row" if kept else "missing on a rejected row"))
    return problems


def _check_tar(fs, tar_path: str, meta: pa.Table) -> list[str]:
    problems = []
    members: dict[str, dict[str, bytes]] = {}
    try:
        with fs.open(tar_path, "rb") as f:
            for key, ext, data in tar_members(f, lambda ext: ext == "json"):
                members.setdefault(key, {})[ext] = data or b""
    except TAR_ERRORS as e:
        return [f"{tar_path}: unreadable tar ({e})"]
    keys = meta.column("key").to_pylist()
    formats = meta.column("image_format").to_pylist() if "image_format" in meta.column_names else [None] * len(keys)
    for row, (key, fmt) in enumerate(zip(keys, formats, strict=True)):
        found = members.pop(key, None)
        if found is None:
            problems.append(f"{tar_path}: row {row} of meta, key {key}: no sample in the tar")
            continue
        for ext in ("txt", "json"):
            if ext not in found:
                problems.append(f"{tar_path}: key {key}: no .{ext} member")
        if fmt is not None and fmt not in found:
            problems.append(f"{tar_path}: key {key}: no .{fmt} image though meta says image_format {fmt}")
        if "json" in found:
            try:
                if json.loads(found["json"]).get("key") != key:
                    problems.append(f"{tar_path}: key {key}: .json names another key")
            except ValueError:
                problems.append(f"{tar_path}: key {key}: .json is not valid JSON")
    for key in members:
        problems.append(f"{tar_path}: key {key}: sample in the tar but not in meta")
    return problems


def validate(path: str) -> list[str]:
    """All problems found in the dataset at ``path`` (empty list: valid)."""
    fs, root = url_to_fs(path)
    root = root.rstrip("/")
    layout = detect_layout(fs, root)
    if layout == "mmcurate":
        return _validate_mmcurate(fs, path)
    if layout == "img2dataset":
        return _validate_img2dataset(fs, root)
    paths = sorted(fs.glob(f"{root}/**/*.parquet")) if fs.isdir(root) else [root]
    if not paths:
        return [f"{root}: no dataset: not an mmcurate output (no run.json), nor an img2dataset output, and no Parquet file"]
    problems: list[str] = []
    for p in paths:
        table = _read(fs, p, problems)
        if table is not None:
            problems += check_table(
                table, p, kept="reject_reason" not in table.column_names or table.column("reject_reason").null_count == table.num_rows
            )
    return problems


def _run_problems(out: OutputDir) -> tuple[list[str], dict]:
    """Problems of the run record (missing, unreadable, unfinished) and the record (empty when there is none)."""
    try:
        record = out.run_record()
    except UsageError as e:
        return [str(e).split("; ")[0]], {}
    if record is None:
        return [f"{out.run_json}: missing"], {}
    problems = []
    if not record.get("finished"):
        done = sum(out.is_done(i) for i in range(record["shards"]))
        problems.append(f"{out.run_json}: the run is not finished ({done} of {record['shards']} shards done)")
    return problems, record


def _validate_mmcurate(fs, path: str) -> list[str]:
    out = OutputDir.open(path)
    problems, record = _run_problems(out)
    output = record.get("pipeline", {}).get("output")
    fmt = output.get("format") if isinstance(output, dict) else None
    seen: dict[str, str] = {}
    samples: dict[str, int] = {}  # samples per tar, as shards/sizes.json must list them
    for sid in sorted({*out.found_shard_ids(), *range(record.get("shards", 0))}):
        tar = out.tar_path(sid)
        webdataset = fmt == "webdataset" if fmt else fs.exists(tar)  # the run's format, else the files'
        kept_path = out.meta_path(sid) if webdataset else out.parquet_path(sid)
        files = {"kept": kept_path, "rejects": out.rejects_path(sid), "stats": out.stats_path(sid), "done": out.done_path(sid)}
        missing = [p for p in ([tar] if webdataset else []) + list(files.values()) if not fs.exists(p)]
        problems += [f"{p}: missing" for p in missing]
        if missing:
            continue
        if not out.is_done(sid):
            problems.append(f"{files['done']}: names another run or files that changed since")
        kept = _read(fs, kept_path, problems)
        rejects = _read(fs, files["rejects"], problems)
        if kept is None or rejects is None:
            continue
        problems += check_table(kept, kept_path, kept=True) + check_table(rejects, files["rejects"], kept=False)
        if webdataset:
            problems += _check_tar(fs, tar, kept)
            samples[tar.rsplit("/", 1)[-1]] = kept.num_rows
        problems += _repeated_keys(kept, kept_path, rejects, files["rejects"], seen)
        try:
            stats = read_stats(out, sid)
        except UsageError as e:
            problems.append(str(e))
            continue
        if stats["rows_in"] != stats["kept"] + stats["rejected"] or stats["kept"] != kept.num_rows or stats["rejected"] != rejects.num_rows:
            problems.append(
                f"{files['stats']}: rows_in {stats['rows_in']}, kept {stats['kept']}, rejected {stats['rejected']} "
                f"disagree with {kept.num_rows} kept and {rejects.num_rows} rejected rows on disk"
            )
    if record.get("finished") and fmt == "webdataset":
        problems += _check_sizes(out, samples)
    return problems


def _check_sizes(out: OutputDir, samples: dict[str, int]) -> list[str]:
    """``shards/sizes.json`` of a finished WebDataset run lists each tar's samples (open_clip reads it)."""
    path = out.sizes_path()
    try:
        with reading(out.fs, path):
            sizes = out.read_json(path)
    except UsageError as e:
        return [str(e)]
    if not isinstance(sizes, dict):
        return [f"{path}: not a JSON object of samples per tar"]
    return [f"{path}: lists {sizes.get(tar)} samples for {tar}, which holds {n}" for tar, n in samples.items() if sizes.get(tar) != n]


def _repeated_keys(kept: pa.Table, kept_path: str, rejects: pa.Table, rejects_path: str, seen: dict[str, str]) -> list[str]:
    """Keys the output holds twice. The reader rejects a key that an earlier row of its shard holds as
    ``read``/``duplicate_key`` (the first row goes on): such a row must repeat a key of another row of its
    shard; every other row's key is unique over the output (``seen``: key -> file, filled in)."""
    problems = []
    if {"reject_stage", "reject_reason"} <= set(rejects.column_names):
        at_read = pc.equal(rejects.column("reject_stage"), READ_STAGE)
        repeat = pc.fill_null(pc.and_(at_read, pc.equal(rejects.column("reject_reason"), "duplicate_key")), False)
    else:
        repeat = pa.array([False] * rejects.num_rows)
    for name, keys in ((kept_path, kept.column("key")), (rejects_path, rejects.filter(pc.invert(repeat)).column("key"))):
        for key in keys.to_pylist():
            if key in seen:
                problems.append(f"{name}: key {key} also in {seen[key]}")
            seen[key] = name
    for key in rejects.filter(repeat).column("key").to_pylist():
        if seen.get(key) not in (kept_path, rejects_path):
            problems.append(f"{rejects_path}: key {key} rejected as duplicate_key, but no other row of its shard holds it")
    return problems


def _validate_img2dataset(fs, root: str) -> list[str]:
    problems: list[str] = []
    for tar in sorted(fs.glob(f"{root}/*.tar")):
        parquet = tar[: -len(".tar")] + ".parquet"
        if not fs.exists(parquet):
            problems.append(f"{tar}: no Parquet beside it")
            continue
        table = _read(fs, parquet, problems)
        if table is None:
            continue
        ok = table.filter(pc.equal(table.column("status"), "success")) if "status" in table.column_names else table
        expected = set(ok.column("key").to_pylist())
        with fs.open(tar, "rb") as f:
            images, error = index_tar(f, tar)  # the member headers only: no image is read
        if error is not None:
            problems.append(error)
        found = set(images)
        problems += [f"{tar}: key {k}: status success in {parquet} but no image in the tar" for k in sorted(expected - found)]
        problems += [f"{tar}: key {k}: image in the tar but no success row in {parquet}" for k in sorted(found - expected)]
    return problems
