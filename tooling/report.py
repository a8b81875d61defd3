"""``mmcurate report``: one self-contained HTML page of a finished output, and a JSON file of its figures beside it.

The page holds the filter funnel, histograms of every score and size column, a language table, duplicate
clusters, a grid of kept and rejected samples (thumbnails, captions, grounding boxes) and the run's record.
It reads the column data of every row (``meta/``, ``rejects/``, no image bytes) and the images of a bounded,
stratified sample only, so its cost and its weight do not grow with the dataset's size.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from mmcurate.errors import UsageError
from mmcurate.shards import jsontext
from mmcurate.shards.layout import OutputDir, is_unfinished, open_output
from mmcurate.shards.readers import index_tar, read_members
from mmcurate.shards.summary import output_summary
from mmcurate.tooling.plots import draw_funnel, draw_histogram, histogram, plt, png, score_table, score_values

ROW_COLUMNS = ("key", "reject_stage", "reject_reason", "duplicate_of", "language")
THUMBNAIL = 256  # longest side of an embedded thumbnail, pixels
MAX_CAPTION = 300  # characters of a caption shown
MAX_CANDIDATES = 6  # candidate captions shown per sample
CLUSTERS = 4  # duplicate clusters shown
CLUSTER_MEMBERS = 4  # removed rows shown per cluster
MAX_IMAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class Options:
    samples: int = 24  # samples in the grid (half kept, half rejected when there are enough)
    seed: int = 0


def figures_path(html_path: str) -> str:
    """Where the figures of the page ``html_path`` go: ``X.json`` beside ``X.html``."""
    return os.path.splitext(html_path)[0] + ".json"


FIGURES_KEYS = ("source", "summary", "histograms", "run")  # a figures file holds these: one a report wrote


def _check_figures_file(figures: str) -> None:
    """A UsageError when ``figures`` exists and is not the figures file of an earlier report: the page's
    name was given, not this file's, so a file of the user's there is never overwritten."""
    try:
        with open(figures, "rb") as f:
            held = json.loads(f.read())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        held = None
    if not (isinstance(held, dict) and all(k in held for k in FIGURES_KEYS)):
        raise UsageError(f"{figures} exists and is not a report's figures file (the page's figures go there): name the page otherwise")


def build_report(path: str, html_path: str, options: Options = Options()) -> dict:
    """Write the page to ``html_path`` and its figures to :func:`figures_path` beside it; return the figures."""
    out = open_output(path)
    html_dir = os.path.dirname(os.path.abspath(html_path))
    if os.path.commonpath([html_dir, os.path.abspath(path)]) == os.path.abspath(path):
        raise UsageError(f"{html_path}: the report goes outside the output folder {path}")
    if figures_path(html_path) == html_path:
        raise UsageError(f"{html_path}: the page's figures go to a .json file beside it; name the page .html")
    _check_figures_file(figures_path(html_path))
    record = out.run_record()
    summary = output_summary(out)
    rows = _rows(out)
    histograms = {name: dict(zip(("counts", "edges"), histogram(v), strict=True)) for name, v in score_values(rows).items()}
    clusters = _clusters(rows)
    chosen = _stratified(rows, options)
    details = _details(out, rows, set(chosen) | {k for c in clusters["largest"] for k in [c["keeper"], *c["removed"]]})
    figures = {
        "source": path,
        "summary": summary,
        "histograms": histograms,
        "languages": _languages(rows),
        "duplicate_clusters": {"sizes": clusters["sizes"], "shown": clusters["largest"]},
        "samples": [_sample_record(details[k]) for k in chosen if k in details],
        "run": record,
    }
    page = _page(figures, details, chosen)
    os.makedirs(html_dir, exist_ok=True)
    _write(html_path, page.encode())
    _write(figures_path(html_path), jsontext.dumps(figures, indent=2, default=str).encode())
    return figures


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _rows(out: OutputDir) -> pa.Table:
    """Column data of every row (no images), with ``_file`` (the Parquet file it lies in) and ``_kept``."""
    table = score_table(out, ROW_COLUMNS, with_file=True)
    if table.num_rows == 0:
        return pa.table({"key": pa.array([], pa.string()), "_file": pa.array([], pa.string()), "reject_reason": pa.array([], pa.string())})
    return table.append_column("_kept", pc.is_null(table.column("reject_reason")))


def _stratified(rows: pa.Table, options: Options) -> list[str]:
    """Keys of the grid: half kept rows, half rejected ones spread evenly over (stage, reason), drawn with the seed."""
    rng = np.random.default_rng(options.seed)
    keys = rows.column("key").to_pylist()
    strata: dict[tuple, list[int]] = defaultdict(list)
    reasons = zip(rows.column("reject_stage").to_pylist() if "reject_stage" in rows.column_names else [None] * len(keys),
                  rows.column("reject_reason").to_pylist(), strict=True)  # fmt: skip
    for i, (stage, reason) in enumerate(reasons):
        strata[(stage, reason) if reason is not None else ("kept",)].append(i)
    kept = strata.pop(("kept",), [])
    rejected = [list(rng.permutation(v)) for _, v in sorted(strata.items(), key=lambda kv: str(kv[0]))]
    quota = options.samples - min(len(kept), options.samples // 2 if rejected else options.samples)
    picked: list[int] = []
    while len(picked) < quota and any(rejected):  # round-robin over the reasons
        for members in rejected:
            if members and len(picked) < quota:
                picked.append(int(members.pop()))
    n_kept = min(len(kept), options.samples - len(picked))
    picked = sorted(int(i) for i in rng.choice(kept, n_kept, replace=False)) + picked if n_kept else picked
    return [keys[i] for i in picked]


def _clusters(rows: pa.Table) -> dict:
    """Duplicate clusters from the rejects' ``duplicate_of``: how many clusters of each size, and the largest few."""
    if "duplicate_of" not in rows.column_names:
        return {"sizes": {}, "largest": []}
    members: dict[str, list[str]] = defaultdict(list)
    for key, keeper in zip(rows.column("key").to_pylist(), rows.column("duplicate_of").to_pylist(), strict=True):
        if keeper is not None:
            members[keeper].append(key)
    sizes = Counter(1 + len(v) for v in members.values())
    largest = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:CLUSTERS]
    return {
        "sizes": {str(size): n for size, n in sorted(sizes.items())},
        "largest": [{"keeper": k, "size": 1 + len(v), "removed": sorted(v)[:CLUSTER_MEMBERS]} for k, v in largest],
    }


def _languages(rows: pa.Table) -> list[dict]:
    """Rows per language, kept and rejected, with the mean language score."""
    if "language" not in rows.column_names:
        return []
    scores = rows.column("language_score").to_pylist() if "language_score" in rows.column_names else [None] * rows.num_rows
    table: dict[str, dict] = {}
    for language, kept, score in zip(rows.column("language").to_pylist(), rows.column("_kept").to_pylist(), scores, strict=True):
        name = language or "(none)"
        entry = table.setdefault(name, {"language": name, "rows": 0, "kept": 0, "score_sum": 0.0, "scored": 0})
        entry["rows"] += 1
        entry["kept"] += int(kept)
        if score is not None:
            entry["score_sum"] += score
            entry["scored"] += 1
    result = []
    for entry in sorted(table.values(), key=lambda e: -e["rows"]):
        mean = entry.pop("score_sum") / entry["scored"] if entry["scored"] else None
        del entry["scored"]
        result.append({**entry, "rejected": entry["rows"] - entry["kept"], "mean_score": None if mean is None else round(mean, 4)})
    return result


def _details(out: OutputDir, rows: pa.Table, keys: set[str]) -> dict[str, dict]:
    """Whole rows of ``keys`` with a ``thumbnail`` (JPEG bytes, or None): only the files holding them are read,
    and of a tar only the members of those keys."""
    wanted = pc.is_in(rows.column("key"), pa.array(sorted(keys), pa.string()))
    found = rows.select(["key", "_file"]).filter(wanted)
    by_file: dict[str, set[str]] = defaultdict(set)
    for key, file in zip(found.column("key").to_pylist(), found.column("_file").to_pylist(), strict=True):
        by_file[file].add(key)
    details: dict[str, dict] = {}
    for file, file_keys in by_file.items():
        table = out.read_parquet(file)
        table = table.filter(pc.is_in(table.column("key"), pa.array(sorted(file_keys), pa.string())))
        images = _tar_images(out, file, file_keys)
        for row in table.to_pylist():
            data = row.pop("image", None) or images.get(row["key"])
            row["thumbnail"] = _thumbnail(data)
            details[row["key"]] = row
    return details


def _tar_images(out: OutputDir, parquet_file: str, keys: set[str]) -> dict[str, bytes]:
    """Images of ``keys`` from the tar beside a ``meta/`` file (none for other files)."""
    stem = parquet_file.rsplit("/", 1)[-1].split(".", 1)[0]
    if not stem.isdigit() or parquet_file != out.meta_path(int(stem)) or not out.exists(out.tar_path(int(stem))):
        return {}
    tar = out.tar_path(int(stem))
    with out.fs.open(tar, "rb") as f:
        index, _ = index_tar(f, tar)
        return {key: data for key, data in read_members(f, index, keys, MAX_IMAGE_BYTES) if not isinstance(data, str)}


def _thumbnail(data: bytes | None) -> bytes | None:
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            return buffer.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _sample_record(row: dict) -> dict:
    """What the figures (JSON) say of a shown sample."""
    fields = ("key", "caption", "reject_stage", "reject_reason", "duplicate_of", "captions", "grounding")
    return {k: row[k] for k in fields if row.get(k) is not None} | {"thumbnail": row["thumbnail"] is not None}


# --- the page -------------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:18px;margin-top:32px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots img{width:320px}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;background:#fafafa}.card.rejected{background:#fff3f3}
.frame{position:relative;display:inline-block;line-height:0}.frame img{max-width:256px;display:block}
.box{position:absolute;border:2px solid #e3342f;box-sizing:border-box}
.box span{position:absolute;left:0;top:0;background:#e3342f;color:#fff;font-size:10px;line-height:12px;padding:0 2px;white-space:nowrap}
.noimg{width:256px;height:64px;background:#eee;display:flex;align-items:center;justify-content:center;color:#888;line-height:1}
.why{color:#b00;font-weight:600}.small{font-size:12px;color:#555}pre{background:#f4f4f4;padding:8px;overflow:auto;max-height:480px}
.cluster{display:flex;gap:12px;align-items:flex-start;margin-bottom:12px}.cluster .card{width:272px}
"""


def _page(figures: dict, details: dict[str, dict], chosen: list[str]) -> str:
    esc = html.escape
    summary = figures["summary"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>mmcurate report: {esc(figures['source'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>mmcurate report: {esc(figures['source'])}</h1>",
        f"<p>{summary['rows_in']} rows in {summary['shards']} shards: {summary['kept']} kept, {summary['rejected']} rejected.</p>",
    ]
    if is_unfinished(figures["run"]):
        parts.append(
            "<p class='warn'><b>Unfinished run:</b> these figures cover the shards done so far; run its command again to finish it.</p>"
        )
    parts.append("<h2 id='funnel'>Filter funnel</h2>")
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * (1 + len(summary["stages"]))))
    draw_funnel(ax, summary)
    fig.tight_layout()
    parts.append(_img(png(fig, dpi=80), "image/png", "filter funnel"))
    parts.append("<table><tr><th>stage</th><th>rows in</th><th>rejected</th><th>reasons</th></tr>")
    for name, stage in summary["stages"].items():
        reasons = ", ".join(f"{esc(r)} {n}" for r, n in stage["reasons"].items())
        parts.append(f"<tr><td>{esc(name)}</td><td>{stage['rows_in']}</td><td>{stage['rejected']}</td><td>{reasons}</td></tr>")
    parts.append("</table>")
    parts.append("<h2 id='histograms'>Scores and sizes</h2><div class='plots'>")
    for name, h in figures["histograms"].items():
        fig, ax = plt.subplots(figsize=(4, 3))
        draw_histogram(ax, name, h["counts"], h["edges"])
        fig.tight_layout()
        parts.append(_img(png(fig, dpi=80), "image/png", f"histogram of {name}"))
    parts.append("</div>" + ("" if figures["histograms"] else "<p>No score or size column.</p>"))
    parts.append("<h2 id='samples'>Samples</h2>")
    parts.append("<p class='small'>A stratified sample: kept rows, and rejected rows spread over every stage and reason.</p>")
    parts.append("<div class='grid'>" + "".join(_card(details[k]) for k in chosen if k in details) + "</div>")
    if figures["languages"]:
        header = "".join(f"<th>{h}</th>" for h in ("language", "rows", "kept", "rejected", "mean score"))
        parts.append(f"<h2 id='languages'>Languages</h2><table><tr>{header}</tr>")
        for e in figures["languages"]:
            parts.append(
                f"<tr><td>{esc(e['language'])}</td><td>{e['rows']}</td><td>{e['kept']}</td><td>{e['rejected']}</td><td>{e['mean_score']}</td></tr>"
            )
        parts.append("</table>")
    clusters = figures["duplicate_clusters"]
    if clusters["sizes"]:
        parts.append("<h2 id='duplicates'>Duplicate clusters</h2><table><tr><th>cluster size</th><th>clusters</th></tr>")
        parts += [f"<tr><td>{size}</td><td>{n}</td></tr>" for size, n in clusters["sizes"].items()]
        parts.append("</table><p class='small'>Largest clusters: the kept sample, then the rows removed as its duplicates.</p>")
        for cluster in clusters["shown"]:
            members = [cluster["keeper"], *cluster["removed"]]
            parts.append("<div class='cluster'>" + "".join(_card(details[k]) for k in members if k in details) + "</div>")
    parts.append("<h2 id='run'>Configuration and provenance (run.json)</h2>")
    parts.append(f"<pre>{esc(json.dumps(figures['run'], indent=2, default=str))}</pre></body></html>")
    return "\n".join(parts)


def _img(data: bytes, mime: str, alt: str) -> str:
    return f"<img src='data:{mime};base64,{base64.b64encode(data).decode()}' alt='{html.escape(alt)}'>"


def _card(row: dict) -> str:
    esc = html.escape
    rejected = row.get("reject_reason") is not None
    if row["thumbnail"] is not None:
        boxes = "".join(
            f"<div class='box' style='left:{100 * x0:.2f}%;top:{100 * y0:.2f}%;width:{100 * (x1 - x0):.2f}%;height:{100 * (y1 - y0):.2f}%'>"
            f"<span>{esc(entry['phrase'] or '')}</span></div>"
            for entry in row.get("grounding") or ()
            for x0, y0, x1, y1 in entry["boxes"] or ()
        )
        image = f"<div class='frame'>{_img(row['thumbnail'], 'image/jpeg', row['key'])}{boxes}</div>"
    else:
        image = "<div class='noimg'>no image stored</div>"
    lines = [f"<div class='card{' rejected' if rejected else ''}'>", image, f"<div class='small'>{esc(row['key'])}</div>"]
    if rejected:
        why = f"{row.get('reject_stage')}: {row['reject_reason']}"
        if row.get("duplicate_of"):
            why += f" (duplicate of {row['duplicate_of']})"
        lines.append(f"<div class='why'>{esc(why)}</div>")
    lines.append(f"<div>{esc(_short(row.get('caption')))}</div>")
    candidates = row.get("captions") or ()
    if candidates:
        lines.append("<ul class='small'>" + "".join(
            f"<li>{esc(c['source'] or '')} {_score(c['score'])}: {esc(_short(c['text']))}</li>"
            for c in candidates[:MAX_CANDIDATES]) + "</ul>")  # fmt: skip
    scores = [f"{name} {row[name]:.3f}" for name in ("clip_score", "language_score", "nsfw_score") if row.get(name) is not None]
    if scores:
        lines.append(f"<div class='small'>{esc(', '.join(scores))}</div>")
    return "".join(lines) + "</div>"


def _short(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_CAPTION else text[: MAX_CAPTION - 1] + "…"


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
